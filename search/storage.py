"""Where studies live, and the perplexities their workers share.

``--storage`` takes any Optuna storage: an RDB URL (``sqlite:///runs/search/study.db``, the
default; ``postgresql://user@host/db``; ``mysql+pymysql://...``) or a journal file on a shared
filesystem (``journal:/shared/study.journal``, Optuna's ``JournalFileBackend``). Several
search workers, in one ``--workers N`` run or started separately with the same study name,
share a study there. Optuna keeps their trials apart; this module keeps their quality
evaluations apart: a sub-network's perplexity is claimed by the first worker that needs it
(an insert into a table of the same database, or an exclusively created file next to the
journal), the others wait for its value, so no candidate is evaluated twice. A claim whose
worker died (its process gone, on this host) or that is older than ``STALE_S`` is taken over."""

from __future__ import annotations

import json
import logging
import os
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from profiler.owner import owner_alive, owner_id
from subnets.errors import EdgenasError

log = logging.getLogger(__name__)

STALE_S = 1800.0  # a claim this old without a value belongs to a worker that is gone
POLL_S = 0.5
DRIVERS = {"postgresql": "\"psycopg[binary]\" (SQLAlchemy's default PostgreSQL driver)",
           "mysql": "pymysql (and a mysql+pymysql:// URL)"}


class StorageError(EdgenasError):
    """A study storage that cannot be used as given."""


class Claims(Protocol):
    """Perplexities by config hash, and who is computing one."""

    def value(self, key: str) -> float | None: ...
    def claim(self, key: str, owner: str) -> bool: ...
    def holder(self, key: str) -> tuple[str, float] | None: ...
    def take_over(self, key: str, old: tuple[str, float], owner: str) -> bool: ...
    def put(self, key: str, value: float) -> None: ...


@dataclass(frozen=True)
class StudyStorage:
    url: str  # an RDB URL, or journal:PATH
    described: str = ""

    @property
    def is_journal(self) -> bool:
        return self.url.startswith("journal:")

    @property
    def journal_path(self) -> Path:
        return Path(self.url[len("journal:"):])

    def optuna(self) -> Any:
        import optuna

        if self.is_journal:
            from optuna.storages.journal import JournalFileBackend

            self.journal_path.parent.mkdir(parents=True, exist_ok=True)
            return optuna.storages.JournalStorage(JournalFileBackend(str(self.journal_path)))
        kwargs: dict[str, Any] = {"pool_pre_ping": True}
        if self.url.startswith("sqlite"):  # several worker processes write one file: wait for the lock
            kwargs["connect_args"] = {"timeout": 60}
        return optuna.storages.RDBStorage(self.url, engine_kwargs=kwargs)

    def claims(self, quality_id: str) -> Claims:
        if self.is_journal:
            return FileClaims(Path(str(self.journal_path) + ".perplexity") / quality_id)
        return SqlClaims(self.url, quality_id)


def parse_storage(text: str | None, default_file: Path) -> StudyStorage:
    """``--storage`` (None: the local SQLite file), checked: the driver is installed and the
    server answers, so a bad URL fails before the model loads."""
    if not text:
        default_file.parent.mkdir(parents=True, exist_ok=True)
        return StudyStorage(f"sqlite:///{default_file}", str(default_file))
    if text.startswith("journal:") or text.endswith(".journal"):
        path = Path(text[len("journal:"):] if text.startswith("journal:") else text).expanduser()
        return StudyStorage(f"journal:{path.resolve()}", f"journal file {path}")
    if "://" not in text:
        raise StorageError(f"--storage {text!r} is neither a database URL nor a journal file",
                           "pass e.g. postgresql://user@host/db, sqlite:///study.db or journal:/shared/study.journal")
    _check_server(text)
    return StudyStorage(text, _redacted(text))


def _redacted(url: str) -> str:
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return url.split("@")[-1]


def _check_server(url: str) -> None:
    import sqlalchemy
    from sqlalchemy.exc import ArgumentError, NoSuchModuleError, OperationalError

    scheme = url.split("://", 1)[0]
    try:
        kwargs = {"connect_args": {"connect_timeout": 10}} if scheme.startswith(("postgresql", "mysql")) else {}
        engine = sqlalchemy.create_engine(url, **kwargs)
    except (NoSuchModuleError, ArgumentError) as e:
        raise StorageError(f"--storage {_redacted(url)}: {e}", "use a postgresql://, mysql+pymysql:// or sqlite:/// URL") \
            from None
    except ModuleNotFoundError as e:
        pkg = DRIVERS.get(scheme.split("+")[0], e.name or "the driver")
        raise StorageError(f"--storage {_redacted(url)} needs the database driver {e.name!r}, which is not installed",
                           f"pip install {pkg}") from None
    try:
        with engine.connect():
            pass
    except OperationalError as e:
        reason = str(e.orig).strip().splitlines()[0] if getattr(e, "orig", None) else str(e)[:200]
        raise StorageError(f"the study storage at {_redacted(url)} does not answer ({reason})",
                           "start the database server, or check the URL's host, port, user and database") from None
    finally:
        engine.dispose()


@dataclass
class SharedQuality:
    """A sub-network's perplexity, evaluated once across every worker of a study: the first
    to claim it computes it, the others wait for its value. ``seed`` holds values known from
    before (an older per-folder cache)."""

    claims: Claims
    fn: Callable[[Any], float]
    seed: dict[str, float] = field(default_factory=dict)
    owner: str = field(default_factory=owner_id)
    evaluations: int = 0
    waited: int = 0

    def __call__(self, config: Any) -> float:
        key = config.config_hash()
        if key in self.seed:
            return self.seed[key]
        while True:
            v = self.claims.value(key)
            if v is not None:
                return v
            if self.claims.claim(key, self.owner) or self._take_over(key):
                return self._evaluate(key, config)
            self.waited += 1
            time.sleep(POLL_S)

    def _take_over(self, key: str) -> bool:
        held = self.claims.holder(key)
        if held is None:
            return False
        owner, since = held
        if owner_alive(owner) and time.time() - since < STALE_S:
            return False
        log.info("taking over the perplexity of %s from %s (gone)", key[:10], owner)
        return self.claims.take_over(key, held, self.owner)

    def _evaluate(self, key: str, config: Any) -> float:
        v = float(self.fn(config))
        self.claims.put(key, v)
        self.evaluations += 1
        return v


class SqlClaims:
    """Claims in a table of the study's own database (SQLite, PostgreSQL, MySQL)."""

    def __init__(self, url: str, quality_id: str) -> None:
        import sqlalchemy as sa

        kwargs: dict[str, Any] = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {}
        self.engine = sa.create_engine(url, pool_pre_ping=True, **kwargs)
        meta = sa.MetaData()
        self.table = sa.Table("edgenas_perplexity", meta,
                              sa.Column("quality_id", sa.String(32), primary_key=True),
                              sa.Column("config_hash", sa.String(64), primary_key=True),
                              sa.Column("perplexity", sa.Float, nullable=True),
                              sa.Column("owner", sa.String(128), nullable=False),
                              sa.Column("claimed", sa.Float, nullable=False))
        meta.create_all(self.engine, checkfirst=True)
        self.qid = quality_id
        self.sa = sa

    def _where(self, key: str) -> Any:
        t = self.table
        return (t.c.quality_id == self.qid) & (t.c.config_hash == key)

    def value(self, key: str) -> float | None:
        with self.engine.connect() as c:
            return c.execute(self.sa.select(self.table.c.perplexity).where(self._where(key))).scalar()

    def claim(self, key: str, owner: str) -> bool:
        from sqlalchemy.exc import IntegrityError

        try:
            with self.engine.begin() as c:
                c.execute(self.table.insert().values(quality_id=self.qid, config_hash=key, perplexity=None,
                                                     owner=owner, claimed=time.time()))
            return True
        except IntegrityError:
            return False

    def holder(self, key: str) -> tuple[str, float] | None:
        t = self.table
        with self.engine.connect() as c:
            row = c.execute(self.sa.select(t.c.owner, t.c.claimed).where(self._where(key) & t.c.perplexity.is_(None))).first()
        return None if row is None else (row[0], float(row[1]))

    def take_over(self, key: str, old: tuple[str, float], owner: str) -> bool:
        t = self.table
        with self.engine.begin() as c:
            res = c.execute(t.update().where(self._where(key) & (t.c.owner == old[0]) & (t.c.claimed == old[1])
                                             & t.c.perplexity.is_(None)).values(owner=owner, claimed=time.time()))
        return res.rowcount == 1

    def put(self, key: str, value: float) -> None:
        with self.engine.begin() as c:
            c.execute(self.table.update().where(self._where(key)).values(perplexity=value))


class FileClaims:
    """Claims as files next to a journal, for a shared filesystem: ``HASH.claim`` created
    exclusively (O_EXCL), ``HASH.json`` written whole by rename."""

    def __init__(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.folder = folder

    def value(self, key: str) -> float | None:
        try:
            return float(json.loads((self.folder / f"{key}.json").read_text())["perplexity"])
        except (OSError, ValueError, KeyError):
            return None

    def claim(self, key: str, owner: str) -> bool:
        try:
            fd = os.open(self.folder / f"{key}.claim", os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            json.dump({"owner": owner, "claimed": time.time()}, f)
        return True

    def holder(self, key: str) -> tuple[str, float] | None:
        if self.value(key) is not None:
            return None
        try:
            d = json.loads((self.folder / f"{key}.claim").read_text())
            return str(d["owner"]), float(d["claimed"])
        except (OSError, ValueError, KeyError):
            return None  # being written: ask again

    def take_over(self, key: str, old: tuple[str, float], owner: str) -> bool:
        tmp = self.folder / f".{key}.{uuid.uuid4().hex}"
        try:  # only one taker wins the rename of the old claim away
            os.rename(self.folder / f"{key}.claim", tmp)
        except OSError:
            return False
        tmp.unlink(missing_ok=True)
        return self.claim(key, owner)

    def put(self, key: str, value: float) -> None:
        tmp = self.folder / f".{key}.{uuid.uuid4().hex}.json"
        tmp.write_text(json.dumps({"perplexity": value}))
        os.replace(tmp, self.folder / f"{key}.json")
