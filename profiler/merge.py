"""Merging measurement stores made on different hosts into one.

A lab profiles its boards from several laptops; each keeps a store. Merged, they train one
predictor. Identity travels with the data, not with row ids: devices match by fingerprint,
sub-networks by config hash, a measured cell by its job key (device fingerprint, sub-network,
phase, shape, back-end, threads and timing protocol). A cell measured in both stores is kept
once (the target's, or the first source's); when the two medians differ by more than
``tolerance`` the pair is reported as a conflict, so a user sees boards or protocols that
disagree. Source files are read from copies: merging never migrates or changes them. Either side may
be a file or a PostgreSQL store (``postgresql://`` URL): a laptop's store merges into the lab's
server, or the server's into a file that travels."""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from profiler.database import Database, Location, describe, exists, is_server
from profiler.errors import StoreError
from profiler.store import Store


@dataclass
class MergeReport:
    into: str
    sources: list[str]
    devices_added: int = 0
    devices_matched: int = 0
    subnets_added: int = 0
    cells_added: int = 0
    cells_duplicate: int = 0
    references_added: int = 0
    jobs_pending_added: int = 0
    conflicts: list[dict[str, Any]] = field(default_factory=list)


def _insert(db: Database, table: str, row: dict[str, Any]) -> int:
    cols = list(row)
    cur = db.execute(f"INSERT INTO {table} ({', '.join(cols)}) VALUES ({', '.join('?' * len(cols))}) RETURNING id",
                     [row[c] for c in cols])
    return int(cur.fetchone()[0])


class _Merger:
    """One source store into the target (within the caller's transaction on the target)."""

    def __init__(self, target: Database, source: Database, report: MergeReport, tolerance: float) -> None:
        self.t = target
        self.s = source
        self.report = report
        self.tolerance = tolerance

    def merge(self) -> None:
        devices = self._devices()
        self._subnets()
        for digest, record in self.s.execute("SELECT digest, record FROM protocols").fetchall():
            self.t.execute("INSERT INTO protocols VALUES(?,?) ON CONFLICT DO NOTHING", (digest, record))
        jobs = self._jobs(devices)
        self._measurements(devices, jobs)
        self._repeats(jobs)
        self._rounds(devices, jobs)

    def _devices(self) -> dict[int, int]:
        out = {}
        for d in self.s.execute("SELECT * FROM devices").fetchall():
            hit = self.t.execute("SELECT id, first_seen, last_seen FROM devices WHERE fingerprint=?",
                                 (d["fingerprint"],)).fetchone()
            if hit:
                out[d["id"]] = hit[0]
                self.t.execute("UPDATE devices SET first_seen=?, last_seen=? WHERE id=?",
                               (min(hit[1], d["first_seen"]), max(hit[2], d["last_seen"]), hit[0]))
                self.report.devices_matched += 1
            else:
                out[d["id"]] = _insert(self.t, "devices", {k: d[k] for k in d.keys() if k != "id"})
                self.report.devices_added += 1
        return out

    def _subnets(self) -> None:
        for row in self.s.execute("SELECT hash, base_id, config, params, summary FROM subnets").fetchall():
            cur = self.t.execute("INSERT INTO subnets VALUES(?,?,?,?,?) ON CONFLICT DO NOTHING", tuple(row))
            self.report.subnets_added += max(cur.rowcount, 0)

    def _jobs(self, devices: dict[int, int]) -> dict[int, tuple[int, bool]]:
        """Source job id -> (target job id, whether the target had that cell measured already)."""
        out = {}
        for j in self.s.execute("SELECT * FROM jobs").fetchall():
            hit = self.t.execute("SELECT id, status FROM jobs WHERE job_key=?", (j["job_key"],)).fetchone()
            row = {k: j[k] for k in j.keys() if k not in ("id", "owner", "lease_until")}
            row["device_id"] = devices[j["device_id"]]
            if row["status"] == "running":  # a sweep was measuring it where it came from: not here
                row["status"] = "pending"
            if hit is None:
                out[j["id"]] = (_insert(self.t, "jobs", row), False)
                self.report.jobs_pending_added += int(j["status"] != "done")
            elif hit[1] != "done" and j["status"] == "done":  # the target's failed or pending cell, measured here
                self.t.execute("UPDATE jobs SET status='done', error_class=NULL, error_message=NULL, updated=? "
                               "WHERE id=?", (j["updated"], hit[0]))
                out[j["id"]] = (hit[0], False)
            else:
                out[j["id"]] = (hit[0], True)
        return out

    def _measurements(self, devices: dict[int, int], jobs: dict[int, tuple[int, bool]]) -> None:
        for m in self.s.execute("SELECT * FROM measurements ORDER BY id").fetchall():
            row = {c: m[c] for c in m.keys() if c != "id"}
            row["device_id"] = devices[m["device_id"]]
            if m["job_id"] is None:  # a drift reference: kept unless this very one is there
                dup = self.t.execute("SELECT 1 FROM measurements WHERE job_id IS NULL AND device_id=? AND subnet_hash=? "
                                     "AND phase=? AND created=? AND median_ms=?",
                                     (row["device_id"], m["subnet_hash"], m["phase"], m["created"], m["median_ms"]))
                if dup.fetchone() is None:
                    _insert(self.t, "measurements", row)
                    self.report.references_added += 1
                continue
            job_id, had = jobs[m["job_id"]]
            row["job_id"] = job_id
            if had:
                self._duplicate(m, job_id)
                continue
            _insert(self.t, "measurements", row)
            self.report.cells_added += 1

    def _repeats(self, jobs: dict[int, tuple[int, bool]]) -> None:
        """Re-measurements, on the target's job of the same cell (each once)."""
        for r in self.s.execute("SELECT * FROM repeats ORDER BY id").fetchall():
            row = {c: r[c] for c in r.keys() if c != "id"}
            row["job_id"] = jobs[r["job_id"]][0]
            dup = self.t.execute("SELECT 1 FROM repeats WHERE job_id=? AND created=? AND median_ms=?",
                                 (row["job_id"], r["created"], r["median_ms"])).fetchone()
            if dup is None:
                _insert(self.t, "repeats", row)

    def _rounds(self, devices: dict[int, int], jobs: dict[int, tuple[int, bool]]) -> None:
        """Interleaved rounds (a resumable cell's, and the references' drift), each once."""
        for r in self.s.execute("SELECT * FROM rounds ORDER BY id").fetchall():
            row = {c: r[c] for c in r.keys() if c != "id"}
            row["device_id"] = devices[r["device_id"]]
            if r["job_id"] is not None:
                row["job_id"] = jobs[r["job_id"]][0]
            dup = self.t.execute("SELECT 1 FROM rounds WHERE round_batch=? AND round_no=? AND pass_no=? AND "
                                 "subnet_hash=? AND phase=? AND seq_len=? AND past_len=?",
                                 (r["round_batch"], r["round_no"], r["pass_no"], r["subnet_hash"], r["phase"],
                                  r["seq_len"], r["past_len"])).fetchone()
            if dup is None:
                _insert(self.t, "rounds", row)

    def _duplicate(self, m: Any, job_id: int) -> None:
        self.report.cells_duplicate += 1
        kept = self.t.execute("SELECT median_ms FROM measurements WHERE job_id=?", (job_id,)).fetchone()
        if kept is None:
            return
        rel = abs(m["median_ms"] - kept[0]) / kept[0] if kept[0] else 0.0
        if rel > self.tolerance:
            self.report.conflicts.append({"subnet": m["subnet_hash"], "phase": m["phase"], "seq_len": m["seq_len"],
                                          "past_len": m["past_len"], "backend": m["backend"], "kept_ms": kept[0],
                                          "other_ms": m["median_ms"], "rel_diff": rel})


def _same(a: Location, b: Location) -> bool:
    if is_server(a) or is_server(b):
        return str(a) == str(b)
    return Path(a).resolve() == Path(b).resolve()


def _open_source(source: Location, copy: Path) -> Store:
    """A server store as it is; a file through a copy (with its WAL: a store still open
    elsewhere keeps recent rows there), brought up to this schema there."""
    if is_server(source):
        return Store(source)
    shutil.copyfile(source, copy)
    for ext in ("-wal", "-shm"):
        if Path(f"{source}{ext}").is_file():
            shutil.copyfile(f"{source}{ext}", f"{copy}{ext}")
    return Store(copy)


def merge_stores(sources: list[Location], into: Location, tolerance: float = 0.05) -> MergeReport:
    """Merge ``sources`` into ``into`` (created if absent), each source in one transaction."""
    for s in sources:
        if not exists(s):
            raise StoreError(f"measurement store {s} does not exist", "pass the stores' paths to --merge")
        if _same(s, into):
            raise StoreError(f"{describe(s)} is both a source and the target", "merge into a new file with --into")
    report = MergeReport(describe(into), [describe(s) for s in sources])
    target = Store(into)
    tmp = Path(tempfile.mkdtemp(prefix="edgenas-merge-"))
    try:
        for i, s in enumerate(sources):
            source = _open_source(s, tmp / f"src{i}.db")
            try:
                with target.db.transaction(exclusive=True):  # one source wholly merged, or not at all
                    _Merger(target.db, source.db, report, tolerance).merge()
            finally:
                source.close()
    finally:
        target.close()
        shutil.rmtree(tmp, ignore_errors=True)
    return report
