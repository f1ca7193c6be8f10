"""The measurement store: append-only for measurements, in an SQLite file (WAL mode) or on a
PostgreSQL server that sweeps on several hosts share (``profiler.database``).

A sweep is a set of jobs; a job is done when its measurement row exists, written in the same
transaction that marks the job done. Killing the host or the board at any moment therefore
loses no finished measurement, and rerunning the same command resumes where it stopped."""

from __future__ import annotations

import csv
import functools
import hashlib
import json
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from profiler.database import Database, Location, connect, describe, is_server
from profiler.errors import ErrorClass, StoreError
from profiler.fingerprint import device_fingerprint
from profiler.protocol import UNRECORDED, Protocol

log = logging.getLogger(__name__)
T = TypeVar("T")

SCHEMA_VERSION = 6
SCHEMA = """
CREATE TABLE IF NOT EXISTS meta(key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS devices(
  id INTEGER PRIMARY KEY, name TEXT NOT NULL, fingerprint TEXT NOT NULL UNIQUE, info TEXT NOT NULL,
  first_seen REAL NOT NULL, last_seen REAL NOT NULL);
CREATE TABLE IF NOT EXISTS subnets(
  hash TEXT PRIMARY KEY, base_id TEXT NOT NULL, config TEXT NOT NULL, params INTEGER NOT NULL, summary TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS jobs(
  id INTEGER PRIMARY KEY, job_key TEXT NOT NULL UNIQUE, device_id INTEGER NOT NULL REFERENCES devices(id),
  subnet_hash TEXT NOT NULL REFERENCES subnets(hash), phase TEXT NOT NULL, batch INTEGER NOT NULL,
  seq_len INTEGER NOT NULL, past_len INTEGER NOT NULL, backend TEXT NOT NULL, threads INTEGER NOT NULL,
  status TEXT NOT NULL DEFAULT 'pending', error_class TEXT, error_message TEXT,
  attempts INTEGER NOT NULL DEFAULT 0, created REAL NOT NULL, updated REAL NOT NULL,
  protocol TEXT NOT NULL DEFAULT 'unrecorded', owner TEXT, lease_until REAL);
CREATE TABLE IF NOT EXISTS measurements(
  id INTEGER PRIMARY KEY, job_id INTEGER UNIQUE REFERENCES jobs(id), device_id INTEGER NOT NULL,
  subnet_hash TEXT NOT NULL, phase TEXT NOT NULL, batch INTEGER NOT NULL, seq_len INTEGER NOT NULL,
  past_len INTEGER NOT NULL, backend TEXT NOT NULL, threads INTEGER NOT NULL, is_reference INTEGER NOT NULL,
  median_ms REAL NOT NULL, mean_ms REAL, p90_ms REAL, p99_ms REAL, std_ms REAL, cov REAL, n INTEGER,
  median_rel_ci REAL, load_ms REAL, peak_rss_mb REAL, unstable INTEGER NOT NULL, throttled INTEGER NOT NULL,
  stop_reason TEXT, export_key TEXT, raw_ms TEXT, telemetry TEXT, versions TEXT, settings TEXT, created REAL NOT NULL,
  companion_ms REAL, paired_ratio REAL, protocol TEXT NOT NULL DEFAULT 'unrecorded');
CREATE INDEX IF NOT EXISTS meas_device ON measurements(device_id, phase);
CREATE TABLE IF NOT EXISTS protocols(digest TEXT PRIMARY KEY, record TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS sweeps(
  id INTEGER PRIMARY KEY, device_id INTEGER, started REAL NOT NULL, finished REAL, args TEXT, summary TEXT);
CREATE TABLE IF NOT EXISTS repeats(
  id INTEGER PRIMARY KEY, job_id INTEGER NOT NULL REFERENCES jobs(id), board TEXT, median_ms REAL NOT NULL,
  median_rel_ci REAL, unstable INTEGER NOT NULL, created REAL NOT NULL);
CREATE TABLE IF NOT EXISTS rounds(
  id INTEGER PRIMARY KEY, job_id INTEGER REFERENCES jobs(id), device_id INTEGER NOT NULL, subnet_hash TEXT NOT NULL,
  phase TEXT NOT NULL, seq_len INTEGER NOT NULL, past_len INTEGER NOT NULL, protocol TEXT NOT NULL,
  pass_no INTEGER NOT NULL, round_batch TEXT NOT NULL, round_no INTEGER NOT NULL, board TEXT,
  median_ms REAL NOT NULL, n INTEGER, raw_ms TEXT, created REAL NOT NULL);
CREATE INDEX IF NOT EXISTS rounds_job ON rounds(job_id, pass_no);
"""
REPEATS_DDL = SCHEMA.split("CREATE TABLE IF NOT EXISTS repeats")[1].split(";")[0]
ROUNDS_DDL = SCHEMA.split("CREATE TABLE IF NOT EXISTS rounds")[1].split(";")[0]
JOB_COLUMNS = ("job_key", "device_id", "subnet_hash", "phase", "batch", "seq_len", "past_len", "backend", "threads",
               "protocol")
OWN_TABLES = {"meta", "devices", "subnets", "jobs", "measurements", "protocols", "sweeps", "repeats", "rounds"}

EXPORT_COLUMNS = ["id", "device", "fingerprint", "subnet_hash", "base_id", "params", "phase", "batch", "seq_len",
                  "past_len", "backend", "threads", "is_reference", "median_ms", "mean_ms", "p90_ms", "p99_ms",
                  "std_ms", "cov", "n", "median_rel_ci", "load_ms", "peak_rss_mb", "unstable", "throttled",
                  "stop_reason", "companion_ms", "paired_ratio", "protocol", "config", "created"]


def _migrate_1(db: Database) -> None:
    """v2 added the paired (companion-interleaved) timing of a cell."""
    db.execute("ALTER TABLE measurements ADD COLUMN companion_ms REAL")
    db.execute("ALTER TABLE measurements ADD COLUMN paired_ratio REAL")


def _migrate_2(db: Database) -> None:
    """v3 records each cell's measurement protocol and leases jobs to one sweep process, and
    takes the back-end out of the device fingerprint: devices that differed only by back-end
    become one (their measurements keep their back-end column)."""
    db.execute("CREATE TABLE IF NOT EXISTS protocols(digest TEXT PRIMARY KEY, record TEXT NOT NULL)")
    db.execute(f"ALTER TABLE jobs ADD COLUMN protocol TEXT NOT NULL DEFAULT '{UNRECORDED}'")
    db.execute("ALTER TABLE jobs ADD COLUMN owner TEXT")
    db.execute("ALTER TABLE jobs ADD COLUMN lease_until REAL")
    db.execute(f"ALTER TABLE measurements ADD COLUMN protocol TEXT NOT NULL DEFAULT '{UNRECORDED}'")
    keep: dict[str, int] = {}
    renamed: list[tuple[str, int]] = []
    for dev_id, info in db.execute("SELECT id, info FROM devices ORDER BY id").fetchall():
        hello = (json.loads(info) or {}).get("hello")
        if not hello:
            continue
        fp = device_fingerprint(hello)
        if fp not in keep:
            keep[fp] = dev_id
            renamed.append((fp, dev_id))
            continue
        for table in ("measurements", "jobs", "sweeps"):
            db.execute(f"UPDATE {table} SET device_id=? WHERE device_id=?", (keep[fp], dev_id))
        db.execute("UPDATE devices SET last_seen=MAX(last_seen, (SELECT last_seen FROM devices WHERE id=?)) WHERE id=?",
                   (dev_id, keep[fp]))
        db.execute("DELETE FROM devices WHERE id=?", (dev_id,))
    for fp, dev_id in renamed:
        db.execute("UPDATE devices SET fingerprint=? WHERE id=?", (fp, dev_id))


def _migrate_3(db: Database) -> None:
    """v4 digests protocols with the agent's timing defaults filled in (``normalized_timing``):
    a sweep that left a default out and one that sent it timed alike and are now one protocol.
    Records, measurements and jobs move to the new digests; where two jobs of one cell meet,
    the measured one keeps the key (the other stays under its old key, done or not)."""
    fps = dict(db.execute("SELECT id, fingerprint FROM devices").fetchall())
    for old, record in db.execute("SELECT digest, record FROM protocols").fetchall():
        proto = Protocol.from_dict(json.loads(record))
        new = proto.digest
        if new == old:
            continue
        db.execute("INSERT OR IGNORE INTO protocols VALUES(?,?)", (new, json.dumps(proto.to_dict())))
        db.execute("DELETE FROM protocols WHERE digest=?", (old,))
        db.execute("UPDATE measurements SET protocol=? WHERE protocol=?", (new, old))
        jobs = db.execute("SELECT id, device_id, subnet_hash, phase, batch, seq_len, past_len, backend, threads, "
                          "status FROM jobs WHERE protocol=? ORDER BY status='done' DESC, id", (old,)).fetchall()
        for jid, dev, h, phase, batch, seq, past, backend, threads, _status in jobs:
            key = job_key(fps.get(dev, ""), h, phase, batch, seq, past, backend, threads, new)
            taken = db.execute("SELECT id, status FROM jobs WHERE job_key=?", (key,)).fetchone()
            if taken is not None and taken[1] != "done" and not db.execute(
                    "SELECT 1 FROM measurements WHERE job_id=?", (taken[0],)).fetchone():
                db.execute("DELETE FROM jobs WHERE id=?", (taken[0],))
                taken = None
            db.execute("UPDATE jobs SET protocol=?" + (", job_key=?" if taken is None else "") + " WHERE id=?",
                       (new, key, jid) if taken is None else (new, jid))


def _migrate_4(db: Database) -> None:
    """v5 keeps re-measurements of done cells (a sweep's repeatability) beside the measurements."""
    db.create("CREATE TABLE IF NOT EXISTS repeats" + REPEATS_DDL)


def _migrate_5(db: Database) -> None:
    """v6 keeps the rounds of interleaved sweeps (``profiler.rounds``), each as it finishes."""
    db.create("CREATE TABLE IF NOT EXISTS rounds" + ROUNDS_DDL)
    db.execute("CREATE INDEX IF NOT EXISTS rounds_job ON rounds(job_id, pass_no)")


MIGRATIONS = {1: _migrate_1, 2: _migrate_2, 3: _migrate_3, 4: _migrate_4, 5: _migrate_5}


def job_key(fingerprint: str, config_hash: str, phase: str, batch: int, seq_len: int, past_len: int,
            backend: str, threads: int, protocol: str) -> str:
    """The identity of one cell under one protocol: a rerun finds its jobs by it."""
    ident = f"{fingerprint}|{config_hash}|{phase}|{batch}|{seq_len}|{past_len}|{backend}|{threads}|{protocol}"
    return hashlib.sha256(ident.encode()).hexdigest()[:24]


def _retried(method: Callable[..., T]) -> Callable[..., T]:
    """A store method run once more when the database says that may work: a server store
    whose link dropped (a restart, a network blip) reconnects, so a sweep of hours outlives
    it. Each method is one transaction or harmless to repeat."""
    @functools.wraps(method)
    def run(self: Store, *args: Any, **kwargs: Any) -> T:
        try:
            return method(self, *args, **kwargs)
        except self.db.errors as e:
            if not self.db.recover(e):
                raise
            log.warning("the measurement store %s: %s; reconnected, trying again", self.described, e)
            return method(self, *args, **kwargs)

    return run


@dataclass(frozen=True)
class Job:
    id: int
    subnet_hash: str
    phase: str
    batch: int
    seq_len: int
    past_len: int
    backend: str
    threads: int
    status: str
    attempts: int
    error_class: str | None
    protocol: str = UNRECORDED


class Store:
    def __init__(self, location: Location) -> None:
        self.location: Location = location if is_server(location) else Path(location)
        self.db = connect(self.location)
        try:
            self._check_schema()
        except self.db.errors as e:
            self.db.close()
            raise StoreError(f"{describe(self.location)} is not an edgenas measurement store ({e})",
                             "pass a new --db path (or the store a previous sweep wrote)") from None
        except BaseException:
            self.db.close()
            raise

    def _check_schema(self) -> None:
        # One write transaction for the check, the creation and any migration: a second
        # process opening the same new or old store waits, then finds it ready.
        with self.db.transaction(exclusive=True):
            tables = self.db.tables()
            if not tables & OWN_TABLES and (not tables or is_server(self.location)):
                for stmt in SCHEMA.split(";"):
                    if stmt.strip():
                        self.db.create(stmt)
                self.db.execute("INSERT INTO meta VALUES('schema_version', ?)", (str(SCHEMA_VERSION),))
                self.db.execute("INSERT INTO meta VALUES('created', ?)", (str(self.db.now()),))
                return
            if "meta" not in tables:
                raise StoreError(f"{describe(self.location)} holds tables that edgenas did not write",
                                 "pass a new --db path (on a server: another database, or a schema of its own)")
            row = self.db.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
            found = int(row[0]) if row else None
            while found in MIGRATIONS and found < SCHEMA_VERSION:
                MIGRATIONS[found](self.db)
                found += 1
                self.db.execute("UPDATE meta SET value=? WHERE key='schema_version'", (str(found),))
            if found != SCHEMA_VERSION:
                raise StoreError(
                    f"{describe(self.location)} was written by an incompatible edgenas (store schema {found}, this "
                    f"version reads {SCHEMA_VERSION})",
                    "use a new --db path, or export the old store with the edgenas version that wrote it",
                )

    @property
    def described(self) -> str:
        return describe(self.location)

    def tx(self) -> Any:
        return self.db.transaction()

    def close(self) -> None:
        self.db.close()

    # --- devices and sub-networks -------------------------------------------------------
    @_retried
    def upsert_device(self, name: str, fingerprint: str, info: dict[str, Any]) -> int:
        now = self.db.now()
        with self.tx():
            self.db.execute(
                "INSERT INTO devices(name, fingerprint, info, first_seen, last_seen) VALUES(?,?,?,?,?) "
                "ON CONFLICT(fingerprint) DO UPDATE SET last_seen=excluded.last_seen, name=excluded.name, info=excluded.info",
                (name, fingerprint, json.dumps(info), now, now))
        return int(self.db.execute("SELECT id FROM devices WHERE fingerprint=?", (fingerprint,)).fetchone()[0])

    @_retried
    def devices(self) -> list[Any]:
        return list(self.db.execute("SELECT * FROM devices ORDER BY id"))

    @_retried
    def find_devices(self, name: str) -> list[Any]:
        return list(self.db.execute("SELECT * FROM devices WHERE name=? OR fingerprint=? ORDER BY last_seen DESC", (name, name)))

    @_retried
    def add_subnet(self, config_hash: str, base_id: str, config_json: str, params: int, summary: str) -> None:
        self.db.execute("INSERT INTO subnets VALUES(?,?,?,?,?) ON CONFLICT DO NOTHING", (config_hash, base_id, config_json, params, summary))

    # --- jobs ---------------------------------------------------------------------------
    @_retried
    def add_protocol(self, protocol: Protocol) -> str:
        self.db.execute("INSERT INTO protocols VALUES(?,?) ON CONFLICT DO NOTHING", (protocol.digest, json.dumps(protocol.to_dict())))
        return protocol.digest

    @_retried
    def protocols(self) -> dict[str, Protocol]:
        return {r[0]: Protocol.from_dict(json.loads(r[1])) for r in self.db.execute("SELECT digest, record FROM protocols")}

    @_retried
    def add_jobs(self, rows: list[dict[str, Any]]) -> None:
        now = self.db.now()
        with self.tx():
            self.db.executemany(
                "INSERT INTO jobs(job_key, device_id, subnet_hash, phase, batch, seq_len, past_len, backend, threads, "
                "protocol, created, updated) VALUES(?,?,?,?,?,?,?,?,?,?,?,?) ON CONFLICT DO NOTHING",
                [[r[c] for c in JOB_COLUMNS] + [now, now] for r in rows])

    @_retried
    def jobs_by_key(self, keys: list[str]) -> list[Job]:
        out = []
        for i in range(0, len(keys), 500):
            chunk = keys[i : i + 500]
            q = f"SELECT * FROM jobs WHERE job_key IN ({','.join('?' * len(chunk))}) ORDER BY id"
            out += [self._job(r) for r in self.db.execute(q, chunk)]
        return out

    @staticmethod
    def _job(r: Any) -> Job:
        return Job(r["id"], r["subnet_hash"], r["phase"], r["batch"], r["seq_len"], r["past_len"], r["backend"],
                   r["threads"], r["status"], r["attempts"], r["error_class"], r["protocol"])

    @_retried
    def claim(self, job_id: int, owner: str, lease_s: float) -> int | None:
        """Start an attempt at a job unless it is done or another live sweep holds it: two
        sweeps of one store never measure the same cell, and a crashed sweep's lease expires."""
        now = self.db.now()
        with self.tx():
            cur = self.db.execute(
                "UPDATE jobs SET attempts=attempts+1, status='running', owner=?, lease_until=?, updated=? "
                "WHERE id=? AND status!='done' AND (owner IS NULL OR owner=? OR lease_until IS NULL OR lease_until<?)",
                (owner, now + lease_s, now, job_id, owner, now))
            if cur.rowcount != 1:
                return None
            return int(self.db.execute("SELECT attempts FROM jobs WHERE id=?", (job_id,)).fetchone()[0])

    @_retried
    def release(self, owner: str) -> None:
        """Give back a sweep's unfinished jobs (it stopped, or its process is gone)."""
        with self.tx():
            self.db.execute("UPDATE jobs SET owner=NULL, lease_until=NULL, "
                            "status=CASE status WHEN 'running' THEN 'pending' ELSE status END WHERE owner=?", (owner,))

    @_retried
    def renew(self, owner: str, lease_s: float) -> int:
        """A sweep's heartbeat: its running jobs stay its own for ``lease_s`` more seconds."""
        with self.tx():
            return self.db.execute("UPDATE jobs SET lease_until=? WHERE owner=? AND status='running'",
                                   (self.db.now() + lease_s, owner)).rowcount

    @_retried
    def job_states(self, job_ids: list[int]) -> dict[int, str]:
        out: dict[int, str] = {}
        for i in range(0, len(job_ids), 500):
            chunk = job_ids[i:i + 500]
            out.update(self.db.execute(f"SELECT id, status FROM jobs WHERE id IN ({','.join('?' * len(chunk))})",
                                       chunk).fetchall())
        return out

    @_retried
    def lease_owners(self) -> list[str]:
        return [r[0] for r in self.db.execute("SELECT DISTINCT owner FROM jobs WHERE owner IS NOT NULL")]

    @_retried
    def reset_attempts(self, job_ids: list[int]) -> None:
        """``--retry-failed``: a failed job gets the full number of attempts again."""
        with self.tx():
            self.db.executemany("UPDATE jobs SET attempts=0, status='pending' WHERE id=? AND status='failed'",
                                [(i,) for i in job_ids])

    @_retried
    def fail_job(self, job_id: int, error_class: ErrorClass, message: str, final: bool) -> None:
        with self.tx():
            self.db.execute("UPDATE jobs SET status=?, error_class=?, error_message=?, updated=?, owner=NULL WHERE id=?",
                            ("failed" if final else "pending", error_class.value, message[:2000], self.db.now(), job_id))

    @_retried
    def finish_job(self, job: Job, device_id: int, result: dict[str, Any], export_key: str) -> int | None:
        """Record a job's measurement; None when another sweep measured it first (this one's
        lease ran out while its heartbeat could not reach the store): one measurement per cell."""
        with self.tx():
            cur = self.db.execute("UPDATE jobs SET status='done', error_class=NULL, error_message=NULL, updated=?, "
                                  "owner=NULL WHERE id=? AND status!='done'", (self.db.now(), job.id))
            if cur.rowcount != 1:
                return None
            return self._insert_measurement(job.id, device_id, job.subnet_hash, job.phase, job.batch, job.seq_len,
                                            job.past_len, job.backend, job.threads, False, result, export_key,
                                            job.protocol)

    @_retried
    def add_reference(self, device_id: int, subnet_hash: str, phase: str, batch: int, seq_len: int, past_len: int,
                      backend: str, threads: int, result: dict[str, Any], export_key: str, protocol: str) -> int:
        with self.tx():
            return self._insert_measurement(None, device_id, subnet_hash, phase, batch, seq_len, past_len, backend,
                                            threads, True, result, export_key, protocol)

    def _insert_measurement(self, job_id: int | None, device_id: int, subnet_hash: str, phase: str, batch: int,
                            seq_len: int, past_len: int, backend: str, threads: int, is_ref: bool,
                            r: dict[str, Any], export_key: str, protocol: str) -> int:
        telemetry = {"before": r.get("telemetry_before"), "after": r.get("telemetry_after"),
                     "throttle_reasons": r.get("throttle_reasons")}
        settings = r.get("settings")
        if r.get("sessions"):  # a cell timed over several sessions: each one's median (and ratio)
            settings = dict(settings or {}, sessions=r["sessions"])
        if r.get("round_medians_ms"):  # interleaved rounds: both statistics, each round's median and drift
            settings = dict(settings or {}, rounds={k: r.get(k) for k in (
                "raw_median_ms", "raw_rel_ci", "normalized_median_ms", "normalized_rel_ci", "round_medians_ms",
                "drift_factors")})
        cur = self.db.execute(
            "INSERT INTO measurements(job_id, device_id, subnet_hash, phase, batch, seq_len, past_len, backend, threads, "
            "is_reference, median_ms, mean_ms, p90_ms, p99_ms, std_ms, cov, n, median_rel_ci, load_ms, peak_rss_mb, "
            "unstable, throttled, stop_reason, export_key, raw_ms, telemetry, versions, settings, created, companion_ms, "
            "paired_ratio, protocol) VALUES(?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?) RETURNING id",
            (job_id, device_id, subnet_hash, phase, batch, seq_len, past_len, backend, threads, int(is_ref),
             r["median_ms"], r.get("mean_ms"), r.get("p90_ms"), r.get("p99_ms"), r.get("std_ms"), r.get("cov"),
             r.get("n"), r.get("median_rel_ci"), r.get("load_ms"), r.get("peak_rss_mb"), int(bool(r.get("unstable"))),
             int(bool(r.get("throttled"))), r.get("stop_reason"), export_key, json.dumps(r.get("raw_ms")),
             json.dumps(telemetry), json.dumps(r.get("versions")), json.dumps(settings), self.db.now(),
             r.get("companion_median_ms"), r.get("paired_ratio"), protocol))
        return int(cur.fetchone()[0])

    @_retried
    def add_repeat(self, job_id: int, board: str, result: dict[str, Any]) -> None:
        """A done cell measured once more, under its protocol, later in a sweep."""
        with self.tx():
            self.db.execute("INSERT INTO repeats(job_id, board, median_ms, median_rel_ci, unstable, created) "
                            "VALUES(?,?,?,?,?,?)", (job_id, board, result["median_ms"], result.get("median_rel_ci"),
                                                    int(bool(result.get("unstable"))), self.db.now()))

    @_retried
    def repeated_jobs(self, job_ids: list[int]) -> set[int]:
        """Those of ``job_ids`` re-measured already."""
        if not job_ids:
            return set()
        marks = ",".join("?" * len(job_ids))
        return {int(r[0]) for r in self.db.execute(f"SELECT DISTINCT job_id FROM repeats WHERE job_id IN ({marks})",
                                                   job_ids)}

    @_retried
    def repeat_pairs(self, device: str | None = None) -> list[dict[str, Any]]:
        """Each re-measurement beside the cell's measurement: device, phase, back-end, threads,
        protocol, ``first_ms`` and ``again_ms``."""
        q = ("SELECT m.job_id, d.name AS device, m.phase, m.backend, m.threads, m.protocol, m.subnet_hash, m.seq_len, "
             "m.past_len, "
             "m.median_ms AS first_ms, r.median_ms AS again_ms FROM repeats r JOIN measurements m ON m.job_id=r.job_id "
             "JOIN devices d ON d.id=m.device_id")
        args: list[Any] = []
        if device is not None:
            q += " WHERE d.name=? OR d.fingerprint=?"
            args = [device, device]
        return [dict(r) for r in self.db.execute(q + " ORDER BY r.id", args)]

    # --- interleaved rounds -------------------------------------------------------------
    @_retried
    def add_round(self, row: dict[str, Any]) -> None:
        """One round of one cell (``job_id`` None: the round's reference), kept as it finishes."""
        cols = ("job_id", "device_id", "subnet_hash", "phase", "seq_len", "past_len", "protocol", "pass_no",
                "round_batch", "round_no", "board", "median_ms", "n", "raw_ms")
        with self.tx():
            self.db.execute(f"INSERT INTO rounds({', '.join(cols)}, created) VALUES({','.join('?' * (len(cols) + 1))})",
                            (*(json.dumps(row[c]) if c == "raw_ms" else row.get(c) for c in cols), self.db.now()))

    @_retried
    def rounds_of(self, job_ids: list[int], pass_no: int) -> list[dict[str, Any]]:
        """The stored rounds of ``job_ids`` in one pass, oldest first."""
        out: list[dict[str, Any]] = []
        for i in range(0, len(job_ids), 500):
            chunk = job_ids[i:i + 500]
            out += [dict(r) for r in self.db.execute(
                f"SELECT * FROM rounds WHERE pass_no=? AND job_id IN ({','.join('?' * len(chunk))}) ORDER BY id",
                [pass_no, *chunk])]
        for r in out:
            r["raw_ms"] = json.loads(r["raw_ms"]) if r["raw_ms"] else []
        return out

    @_retried
    def reference_rounds(self, device_id: int, protocol: str, batches: list[str] | None = None) -> list[dict[str, Any]]:
        """The reference's rounds on a device under a protocol (of ``batches`` only, if given), oldest first."""
        q = "SELECT * FROM rounds WHERE job_id IS NULL AND device_id=? AND protocol=?"
        args: list[Any] = [device_id, protocol]
        if batches is not None:
            if not batches:
                return []
            q += f" AND round_batch IN ({','.join('?' * len(batches))})"
            args += batches
        return [dict(r) for r in self.db.execute(q + " ORDER BY id", args)]

    # --- sweeps -------------------------------------------------------------------------
    @_retried
    def start_sweep(self, device_id: int, args: dict[str, Any]) -> int:
        with self.tx():
            cur = self.db.execute("INSERT INTO sweeps(device_id, started, args) VALUES(?,?,?) RETURNING id",
                                  (device_id, self.db.now(), json.dumps(args)))
            return int(cur.fetchone()[0])

    @_retried
    def finish_sweep(self, sweep_id: int, summary: dict[str, Any]) -> None:
        with self.tx():
            self.db.execute("UPDATE sweeps SET finished=?, summary=? WHERE id=?", (self.db.now(), json.dumps(summary), sweep_id))

    @_retried
    def references(self, device_id: int) -> list[Any]:
        return list(self.db.execute("SELECT * FROM measurements WHERE device_id=? AND is_reference=1 ORDER BY id", (device_id,)))

    # --- reading ------------------------------------------------------------------------
    def measurement_rows(self, device: str | None = None, phase: str | None = None,
                         include_reference: bool = False) -> Iterator[dict[str, Any]]:
        q = ("SELECT m.*, d.name AS device, d.fingerprint, s.base_id, s.params, s.config FROM measurements m "
             "JOIN devices d ON d.id=m.device_id JOIN subnets s ON s.hash=m.subnet_hash WHERE 1=1")
        args: list[Any] = []
        if device is not None:
            q += " AND (d.name=? OR d.fingerprint=?)"
            args += [device, device]
        if phase is not None:
            q += " AND m.phase=?"
            args.append(phase)
        if not include_reference:
            q += " AND m.is_reference=0"
        for r in self.db.execute(q + " ORDER BY m.id", args):
            yield dict(r)

    @_retried
    def phase_counts(self) -> list[tuple[str, str, str, int, float, float]]:
        """(device, fingerprint, phase, measurements, lowest median, highest median) per device and phase."""
        q = ("SELECT d.name, d.fingerprint, m.phase, COUNT(*), MIN(m.median_ms), MAX(m.median_ms) FROM measurements m "
             "JOIN devices d ON d.id=m.device_id WHERE m.is_reference=0 GROUP BY d.id, d.name, d.fingerprint, m.phase "
             "ORDER BY d.id, m.phase")
        return [tuple(r) for r in self.db.execute(q)]

    @_retried
    def count(self, table: str) -> int:
        if table not in ("measurements", "jobs", "devices", "subnets", "sweeps"):
            raise ValueError(table)
        return int(self.db.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0])

    def export_csv(self, path: Path) -> int:
        rows = list(self.measurement_rows(include_reference=True))
        with Path(path).open("w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=EXPORT_COLUMNS, extrasaction="ignore")
            w.writeheader()
            w.writerows(rows)
        return len(rows)

    def export_parquet(self, path: Path) -> int:
        try:
            import pyarrow as pa
            import pyarrow.parquet as pq
        except ImportError:
            raise StoreError("writing Parquet needs pyarrow, which is not installed",
                             "pip install pyarrow (or use --csv)") from None
        rows = list(self.measurement_rows(include_reference=True))
        table = pa.Table.from_pylist([{k: r.get(k) for k in EXPORT_COLUMNS} for r in rows])
        pq.write_table(table, str(path))
        return len(rows)
