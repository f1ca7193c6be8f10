"""Fleets on this machine: sweep throughput with 1, 2 and 4 loopback boards, the scheduler's
own cost per job, and how long a killed sweep's jobs wait before another takes them.

    python benchmarks/fleet_throughput.py --samples 12 --boards 1,2,4
    python benchmarks/fleet_throughput.py --stores file,server --boards 2   # SQLite vs PostgreSQL store

Boards are real OpenSSH servers on loopback ports (tests/sshd.py), each with its own agent,
all on this 2-core CPU: the boards compete for the same two cores, so this measures the
scheduler (that every job is measured once, that boards are kept busy), not the speed-up a
shelf of real boards gives; say so with the figures. Scheduler overhead: the store's claim,
heartbeat and finish of a job, timed alone on a store of the sweep's size, and each board's
time not spent exporting, uploading, loading or timing. Takeover: two ``profile-device``
processes on one store, one SIGKILLed mid-sweep: the delay until the job the dead one held
is free again (its process is seen gone at the survivor's next job); and one SIGSTOPped, its
pid alive as a sweep on a host that went dark looks: the delay until its lease runs out.
``--stores file,server`` runs each part on an SQLite file and on a PostgreSQL store (a
throwaway Debian ``postgresql`` server on loopback, tests/pgserver.py), the store that sweeps
on several hosts share."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from profiler.fleet import run_fleet  # noqa: E402
from profiler.hosts import resolve_hosts  # noqa: E402
from profiler.store import Store  # noqa: E402
from profiler.sweep import SweepSpec  # noqa: E402
from profiler.targets import Timeouts, make_target  # noqa: E402
from subnets.workspace import Workspace  # noqa: E402
from tests.pgserver import PostgresServer, find_postgres  # noqa: E402
from tests.sshd import LoopbackSSHD  # noqa: E402


def boards_inventory(root: Path, n: int) -> tuple[Path, list[LoopbackSSHD]]:
    root = root / f"{n}-boards"
    servers = [LoopbackSSHD(root / f"sshd{i}") for i in range(n)]
    for s in servers:
        s.start()
    inv = root / f"inventory{n}.toml"
    inv.write_text("".join(s.inventory_entry(f"b{i}", sys.executable, root / f"remote{i}") for i, s in enumerate(servers)))
    return inv, servers


class Stores:
    """Fresh store locations: files under ``root``, or databases on one PostgreSQL server."""

    def __init__(self, root: Path, kind: str) -> None:
        self.root, self.kind, self.server, self.n = root, kind, None, 0
        if kind == "server":
            bindir = find_postgres()
            if bindir is None:
                raise SystemExit("--stores server needs Debian's postgresql (apt-get install postgresql)")
            self.server = PostgresServer(bindir)
            self.server.start()

    def new(self, name: str):
        self.n += 1
        if self.server is None:
            return self.root / f"{name}-{self.n}.db"
        return self.server.new_database(f"{name.replace('-', '_')}_{self.n}")

    def close(self) -> None:
        if self.server is not None:
            self.server.stop()


def throughput(ws: Workspace, n: int, samples: int, stores: Stores, root: Path, min_time: float) -> dict:
    inv, servers = boards_inventory(root, n)
    try:
        hosts, _ = resolve_hosts(",".join(f"b{i}" for i in range(n)), inv)
        spec = SweepSpec(seq_lens=(128,), past_lens=(128,), timing={"min_time_s": min_time, "max_time_s": 10 * min_time},
                         decode_min_time_s=3 * min_time, reference_every=0)
        timeouts = Timeouts(connect=15, handshake=120, measure=300, upload_stall=60)
        boards = [(make_target(h, timeouts, inventory=inv), spec) for h in hosts]
        configs = ws.space.sample(samples, 7, granularity="tapered", layer_ranking=ws.importance.layer_ranking())
        fleet = run_fleet(ws, boards, stores.new(f"m{n}"), configs)
    finally:
        for s in servers:
            s.stop()
    jobs = sum(s.measured for s in fleet.boards)
    other = sum(s.seconds["total"] - sum(s.seconds[k] for k in ("export", "upload", "session_load", "timing"))
                for s in fleet.boards)
    return {"boards": n, "seconds": fleet.seconds, "subnets_per_hour": samples * 3600 / fleet.seconds, "jobs": jobs,
            "per_board": [s.measured for s in fleet.boards], "other_s_per_job": other / max(jobs, 1)}


def store_overhead(n_jobs: int, stores: Stores) -> float:
    """ms per job of the store's part: claim, a heartbeat, finish."""
    store = Store(stores.new("overhead"))
    try:
        with store.tx():
            store.db.execute("INSERT INTO devices(name, fingerprint, info, first_seen, last_seen) VALUES('d','f','{}',0,0)")
            store.db.execute("INSERT INTO subnets VALUES('h','b','{}',1,'s')")
        store.add_jobs([{"job_key": f"k{i}", "device_id": 1, "subnet_hash": "h", "phase": "prefill", "batch": 1,
                         "seq_len": i, "past_len": 0, "backend": "ort-cpu", "threads": 1, "protocol": "p"}
                        for i in range(n_jobs)])
        jobs = store.jobs_by_key([f"k{i}" for i in range(n_jobs)])
        result = {"median_ms": 1.0, "raw_ms": [1.0] * 20, "settings": {}, "n": 20}
        t0 = time.perf_counter()
        for j in jobs:
            store.claim(j.id, "me", 30.0)
            store.renew("me", 30.0)
            store.finish_job(j, 1, result, "key")
        return (time.perf_counter() - t0) * 1000 / n_jobs
    finally:
        store.close()


def takeover(model: str, stores: Stores, sig: int, lease: float) -> float:
    """Seconds from signalling one of two sweeps until the survivor holds the job it held.
    SIGKILL: the process is gone, which the survivor sees on this host. SIGSTOP: the process
    hangs with its pid alive, as a sweep on a host that went dark looks: only its lease
    running out (no more heartbeats) frees the job."""
    db = stores.new(f"takeover-{sig}")
    Store(db).close()
    cmd = [sys.executable, "-m", "edgenas.commands.profile", "--host", "local", "--model", model, "--samples", "6", "--seed", "3",
           "--db", str(db), "--min-time", "0.5", "--max-time", "2", "--reference-every", "0", "--lease", str(lease)]
    first = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True, cwd=REPO)
    second = None
    try:
        _wait_for(lambda: _held_by(db, first.pid), 600)
        second = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=REPO)
        _wait_for(lambda: _held_by(db, second.pid), 600)  # the survivor is measuring too
        job, dead = _wait_for(lambda: _held_by(db, first.pid), 600)
        os.killpg(first.pid, sig)
        t_kill = time.perf_counter()
        if sig == signal.SIGKILL:
            first.wait()  # reaped, as a shell reaps a killed command (a zombie's pid still answers)
        _wait_for(lambda: _owner_of(db, job) not in (dead,), 300)
        return time.perf_counter() - t_kill
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)  # the sweep and its local agent
        if second is not None and second.poll() is None:
            second.kill()


def _wait_for(fn, timeout: float):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = fn()
        if v:
            return v
        time.sleep(0.02)
    raise TimeoutError("condition not met")


def _rows(db, sql: str, params: tuple = ()) -> list:
    store = Store(db)
    try:
        return [tuple(r) for r in store.db.execute(sql, params).fetchall()]
    finally:
        store.close()


def _held_by(db, pid: int):
    """(job, owner) of a job the sweep of process ``pid`` holds (owners are host:pid:id)."""
    rows = [r for r in _rows(db, "SELECT id, owner FROM jobs WHERE status='running' AND owner IS NOT NULL")
            if r[1].split(":")[1] == str(pid)]
    return rows[0] if rows else None


def _owner_of(db, job: int):
    owner, status = _rows(db, "SELECT owner, status FROM jobs WHERE id=?", (job,))[0]
    return owner if status != "done" else "done"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--samples", type=int, default=12)
    ap.add_argument("--boards", default="1,2,4")
    ap.add_argument("--min-time", type=float, default=0.3)
    ap.add_argument("--stores", default="file", help="file, server (PostgreSQL) or file,server")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    ws = Workspace.open(args.model)
    root = Path(tempfile.mkdtemp(prefix="edgenas-fleet-"))
    print(f"{args.samples} SmolLM2 sub-networks, prefill S=128 + decode P=128 each, 1 thread per board, all boards on "
          f"this {os.cpu_count()}-core CPU", flush=True)
    for kind in args.stores.split(","):
        stores = Stores(root, kind)
        try:
            run_kind(args, ws, stores, root)
        finally:
            stores.close()


def run_kind(args: argparse.Namespace, ws: Workspace, stores: Stores, root: Path) -> None:
    print(f"store: {'an SQLite file' if stores.kind == 'file' else 'a PostgreSQL server on loopback'}", flush=True)
    rows = []
    for n in args.boards.split(","):
        rows.append(throughput(ws, int(n), args.samples, stores, root / stores.kind, args.min_time))
        r = rows[-1]
        print(f"  {r['boards']} board(s): {r['seconds']:.0f} s, {r['subnets_per_hour']:.0f} sub-networks/hour "
              f"({r['subnets_per_hour'] / rows[0]['subnets_per_hour']:.2f}x one board); jobs per board {r['per_board']}; "
              f"unaccounted time per job {r['other_s_per_job'] * 1000:.0f} ms", flush=True)
    print(f"  store work per job (claim + heartbeat + finish, 1000-job store): {store_overhead(1000, stores):.2f} ms",
          flush=True)
    print(f"  takeover after SIGKILL (same host, --lease 30): {takeover(args.model, stores, signal.SIGKILL, 30):.2f} s",
          flush=True)
    print(f"  takeover after SIGSTOP (a hung sweep, pid alive: lease expiry, --lease 6): "
          f"{takeover(args.model, stores, signal.SIGSTOP, 6):.2f} s", flush=True)


if __name__ == "__main__":
    main()
