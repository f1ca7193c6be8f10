"""The measurement store's database: an SQLite file (the default: sweeps on one host, no
server) or a PostgreSQL server (sweeps on several hosts sharing one store live).

The store speaks one SQL: SQLite's, with ``?`` placeholders and the ``ON CONFLICT`` and
``RETURNING`` clauses both engines know. This module adapts it to PostgreSQL (placeholders,
64-bit column types), opens write transactions that serialize the way each engine can, and
gives PostgreSQL rows the by-name-or-position access of ``sqlite3.Row``. On a server, times
(leases above all) come from the server's clock, so hosts whose clocks differ agree on when a
lease runs out."""

from __future__ import annotations

import contextlib
import re
import sqlite3
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from profiler.errors import StoreError

SERVER_SCHEMES = ("postgresql://", "postgres://", "postgresql+psycopg://")
DRIVER = "\"psycopg[binary]\" (pip install \"psycopg[binary]\", or pip install \"edgenas[postgres]\")"
IDLE_IN_TRANSACTION_S = 30
_SCHEMA_LOCK = 0x6564676E  # any constant: the advisory lock under which one process creates the tables

Location = Path | str  # a file path, or a postgresql:// URL


def store_location(text: str | Path) -> Location:
    """``--db`` (and the API's ``db``): a path, or a server URL."""
    if isinstance(text, str) and "://" in text:
        if not text.startswith(SERVER_SCHEMES):
            raise StoreError(f"{text.split('://')[0]}:// is not a store a sweep can share",
                             "pass a file path or a postgresql://user@host/database URL")
        return text
    return Path(text).expanduser()


def is_server(location: Location) -> bool:
    return isinstance(location, str) and location.startswith(SERVER_SCHEMES)


def describe(location: Location) -> str:
    """The location as printed and recorded: a URL without its password."""
    if not is_server(location):
        return str(location)
    return re.sub(r"(://[^:/@]+):[^@]*@", r"\1:***@", str(location))


def exists(location: Location) -> bool:
    """Whether a store is there to read: a file, or a server (its tables made on first use)."""
    return is_server(location) or Path(location).is_file()


class Row(tuple):
    """A PostgreSQL row read by column name or position, as ``sqlite3.Row`` is."""

    _index: dict[str, int]

    def __new__(cls, values: Sequence[Any], index: dict[str, int]) -> Row:
        row = super().__new__(cls, values)
        row._index = index
        return row

    def __getitem__(self, key: Any) -> Any:  # type: ignore[override]
        return super().__getitem__(self._index[key] if isinstance(key, str) else key)

    def keys(self) -> list[str]:
        return list(self._index)


def _row_factory(cursor: Any) -> Any:
    index = {c.name: i for i, c in enumerate(cursor.description or ())}
    return lambda values: Row(values, index)


class Database:
    """One connection. ``execute`` takes the store's SQL and returns a DB-API cursor."""

    location: Location
    errors: tuple[type[BaseException], ...]

    def execute(self, sql: str, params: Sequence[Any] = ()) -> Any:
        raise NotImplementedError

    def executemany(self, sql: str, rows: list[Sequence[Any]]) -> None:
        raise NotImplementedError

    def transaction(self, exclusive: bool = False) -> contextlib.AbstractContextManager[None]:
        raise NotImplementedError

    def tables(self) -> set[str]:
        raise NotImplementedError

    def create(self, ddl: str) -> None:
        """A CREATE statement written for SQLite."""
        self.execute(ddl)

    def now(self) -> float:
        return time.time()

    def recover(self, error: BaseException) -> bool:
        """After ``error``, whether the failed work may be run again: the link to the server
        was lost and is made anew, or the server rolled back a transaction that lost a race."""
        return False

    def close(self) -> None:
        raise NotImplementedError


class SqliteDatabase(Database):
    """A file in WAL mode: readers never wait, one writer at a time (``BEGIN IMMEDIATE``)."""

    errors = (sqlite3.Error,)

    def __init__(self, path: Path) -> None:
        self.location = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self.conn = sqlite3.connect(str(path), timeout=30, isolation_level=None)
        try:
            self._wal()
            self.conn.execute("PRAGMA synchronous=FULL")
            self.conn.execute("PRAGMA foreign_keys=ON")
        except sqlite3.DatabaseError as e:
            self.conn.close()
            raise StoreError(f"{path} is not an edgenas measurement store ({e})",
                             "pass a new --db path (or the store a previous sweep wrote)") from None
        self.conn.row_factory = sqlite3.Row

    def _wal(self) -> None:
        """Into WAL mode. Two processes opening one new file can meet where SQLite answers
        "locked" at once rather than wait (the mode change needs the whole file, and the other
        holds a lock this one would have to wait on while holding its own): retry then."""
        deadline = time.monotonic() + 30
        while True:
            try:
                self.conn.execute("PRAGMA journal_mode=WAL")
                return
            except sqlite3.OperationalError as e:
                if "locked" not in str(e) or time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    def execute(self, sql: str, params: Sequence[Any] = ()) -> Any:
        return self.conn.execute(sql, params)

    def executemany(self, sql: str, rows: list[Sequence[Any]]) -> None:
        self.conn.executemany(sql, rows)

    @contextlib.contextmanager
    def transaction(self, exclusive: bool = False) -> Iterator[None]:
        self.conn.execute("BEGIN IMMEDIATE")  # a writer's lock from the start: no upgrade deadlock
        try:
            yield
        except BaseException:
            if self.conn.in_transaction:
                self.conn.execute("ROLLBACK")
            raise
        if self.conn.in_transaction:
            self.conn.execute("COMMIT")

    def tables(self) -> set[str]:
        return {r[0] for r in self.conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}

    def close(self) -> None:
        self.conn.close()


class PostgresDatabase(Database):
    """A PostgreSQL server through psycopg 3, in autocommit mode with explicit transactions.
    Row updates that race (two sweeps claiming one job) are decided by PostgreSQL's row locks:
    the later ``UPDATE ... WHERE`` waits, then re-reads the row and finds it taken."""

    def __init__(self, url: str) -> None:
        try:
            import psycopg
        except ModuleNotFoundError:
            raise StoreError(f"the measurement store {describe(url)} needs the PostgreSQL driver {DRIVER}, which is "
                             "not installed", "pip install \"psycopg[binary]\"") from None
        self.location = url
        self.errors = (psycopg.Error,)
        self._psycopg = psycopg
        self._connect()

    def _connect(self) -> None:
        psycopg = self._psycopg
        dsn = str(self.location).replace("postgresql+psycopg://", "postgresql://", 1)
        try:
            self.conn = psycopg.connect(dsn, autocommit=True, connect_timeout=10, row_factory=_row_factory)
        except psycopg.OperationalError as e:
            raise StoreError(f"the measurement store's server {describe(self.location)} does not answer "
                             f"({str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__})",
                             "start the server, or check the host, port, user and database in the --db URL") from None
        # A host that freezes inside a transaction would hold its rows' locks until its
        # connection dies; the server ends such a transaction instead (ours last milliseconds).
        self.conn.execute(f"SET idle_in_transaction_session_timeout = '{IDLE_IN_TRANSACTION_S}s'")
        self._offset = self._clock_offset()

    def _clock_offset(self) -> float:
        """The server's clock minus this host's, within half a round trip."""
        t0 = time.time()
        server = float(self.conn.execute("SELECT extract(epoch FROM clock_timestamp())").fetchone()[0])
        return server - (t0 + time.time()) / 2

    @staticmethod
    def _sql(sql: str) -> str:
        return sql.replace("%", "%%").replace("?", "%s")

    def execute(self, sql: str, params: Sequence[Any] = ()) -> Any:
        return self.conn.execute(self._sql(sql), params)  # type: ignore[arg-type]

    def executemany(self, sql: str, rows: list[Sequence[Any]]) -> None:
        with self.conn.cursor() as cur:
            cur.executemany(self._sql(sql), rows)  # type: ignore[arg-type]

    @contextlib.contextmanager
    def transaction(self, exclusive: bool = False) -> Iterator[None]:
        with self.conn.transaction():
            if exclusive:
                self.conn.execute("SELECT pg_advisory_xact_lock(%s)", (_SCHEMA_LOCK,))
            yield

    def create(self, ddl: str) -> None:
        ddl = re.sub(r"\bINTEGER PRIMARY KEY\b", "BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY", ddl)
        ddl = re.sub(r"\bINTEGER\b", "BIGINT", ddl)
        self.execute(re.sub(r"\bREAL\b", "DOUBLE PRECISION", ddl))

    def tables(self) -> set[str]:
        rows = self.conn.execute("SELECT table_name FROM information_schema.tables WHERE table_schema=current_schema()")
        return {r[0] for r in rows}

    def now(self) -> float:
        return time.time() + self._offset

    def recover(self, error: BaseException) -> bool:
        if self.conn.closed or self.conn.broken:
            with contextlib.suppress(Exception):
                self.conn.close()
            try:
                self._connect()
            except StoreError:
                return False
            return True
        return isinstance(error, self._psycopg.errors.TransactionRollbackError)

    def close(self) -> None:
        self.conn.close()


def connect(location: Location) -> Database:
    if is_server(location):
        return PostgresDatabase(str(location))
    return SqliteDatabase(Path(location))
