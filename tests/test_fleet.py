"""Many boards in one sweep, and several sweep processes on one store: real loopback sshd
"boards", real agents, the store's leases deciding who measures what."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from profiler.errors import HostError, StoreError
from profiler.fleet import device_names, run_fleet
from profiler.hosts import resolve_hosts
from profiler.store import Store
from profiler.sweep import SweepSpec
from profiler.targets import Timeouts, make_target
from tests.helpers import FAST_TIMING


@pytest.fixture
def two_boards(sshd, tmp_path):
    """Two boards: the session's sshd and a second one on another port, in one inventory with
    a group naming both."""
    from tests.sshd import LoopbackSSHD

    other = LoopbackSSHD(tmp_path / "sshd2")
    other.start()
    inv = tmp_path / "inventory.toml"
    inv.write_text(sshd.inventory_entry("b1", sys.executable, tmp_path / "r1")
                   + other.inventory_entry("b2", sys.executable, tmp_path / "r2")
                   + '[groups]\npair = ["b1", "b2"]\n')
    yield inv, other
    other.stop()


def _fleet(ws, inv: Path, host: str, db: Path, configs, **spec_kw):
    hosts, group = resolve_hosts(host, inv)
    timeouts = Timeouts(connect=10, handshake=60, measure=60, upload_stall=20)
    spec_kw = {"seq_lens": (16,), "past_lens": (16,), "timing": FAST_TIMING, "reference_every": 0, **spec_kw}
    boards = [(make_target(h, timeouts, inventory=inv), SweepSpec(**spec_kw)) for h in hosts]
    return run_fleet(ws, boards, db, configs, group=group)


def _measured_by(db: Path) -> dict[int, str]:
    """job id -> the board that measured it (each job must appear once)."""
    with sqlite3.connect(db) as c:
        rows = c.execute("SELECT job_id, settings FROM measurements WHERE is_reference=0").fetchall()
    jobs = [r[0] for r in rows]
    assert len(jobs) == len(set(jobs)), "a cell was measured twice"
    return {r[0]: json.loads(r[1])["board"] for r in rows}


def test_two_boards_share_one_sweep(tiny_ws, two_boards, tmp_path) -> None:
    """Boards of one fingerprint are one device (named for their group): every job measured
    exactly once, by one board or the other, both boards used."""
    inv, _ = two_boards
    db = tmp_path / "m.db"
    configs = tiny_ws.space.sample(6, 3, layer_ranking=tiny_ws.importance.layer_ranking())
    fleet = _fleet(tiny_ws, inv, "pair", db, configs)
    assert [s.board for s in fleet.boards] == ["b1", "b2"] and not any(s.stopped for s in fleet.boards)
    assert len(fleet.devices) == 1 and sorted(next(iter(fleet.devices.values()))) == ["b1", "b2"]
    by = _measured_by(db)
    assert len(by) == 12 and set(by.values()) == {"b1", "b2"}
    assert sum(s.measured for s in fleet.boards) == 12
    store = Store(db)
    try:
        assert [d["name"] for d in store.devices()] == ["pair"]
    finally:
        store.close()
    again = _fleet(tiny_ws, inv, "b1,b2", db, configs)
    assert sum(s.measured for s in again.boards) == 0 and all(s.already_done == 12 for s in again.boards)


def test_a_board_that_drops_out_has_its_jobs_finished_by_the_other(tiny_ws, two_boards, tmp_path) -> None:
    inv, other = two_boards
    db = tmp_path / "m.db"
    Store(db).close()
    configs = tiny_ws.space.sample(8, 4, layer_ranking=tiny_ws.importance.layer_ranking())
    out: dict = {}

    def sweep() -> None:
        out["fleet"] = _fleet(tiny_ws, inv, "b1,b2", db, configs, reconnect_attempts=1)

    th = threading.Thread(target=sweep)
    th.start()
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and "b2" not in _boards_so_far(db):
        time.sleep(0.1)
    other.drop()  # b2 falls off the network mid-sweep
    th.join(timeout=300)
    fleet = out["fleet"]
    b1, b2 = fleet.boards
    assert b2.stopped and not b1.stopped
    by = _measured_by(db)
    assert len(by) == 16 and "b2" in by.values() and list(by.values()).count("b1") == b1.measured
    with sqlite3.connect(db) as c:
        assert c.execute("SELECT COUNT(*) FROM jobs WHERE status!='done' OR owner IS NOT NULL").fetchone()[0] == 0


def _boards_so_far(db: Path) -> set[str]:
    try:
        with sqlite3.connect(db) as c:
            return {json.loads(s)["board"] for (s,) in c.execute("SELECT settings FROM measurements")}
    except sqlite3.OperationalError:
        return set()


def test_hosts_and_groups_resolve_and_an_unknown_group_is_named(two_boards) -> None:
    inv, _ = two_boards
    hosts, group = resolve_hosts("pair", inv)
    assert [h.name for h in hosts] == ["b1", "b2"] and group == "pair"
    hosts, group = resolve_hosts("b2,b1", inv)
    assert [h.name for h in hosts] == ["b2", "b1"] and group is None
    with pytest.raises(HostError, match="nor is it one of the inventory's groups"):
        resolve_hosts("orin", inv)
    with pytest.raises(HostError, match="names a board twice"):
        resolve_hosts("b1,b1", inv)
    assert device_names({"b1": "f1", "b2": "f1"}, "pair") == {"f1": "pair"}
    assert device_names({"b1": "f1", "b2": "f2", "b3": "f1"}, None) == {"f1": "b1", "f2": "b2"}


@pytest.fixture(params=["file", "server"])
def store_at(request, tmp_path):
    """A measurement store's location: an SQLite file, or a database on a PostgreSQL server."""
    return tmp_path / "m.db" if request.param == "file" else request.getfixturevalue("pg_store")


def _query(location, sql: str) -> list:
    store = Store(location)
    try:
        return [tuple(r) for r in store.db.execute(sql).fetchall()]
    finally:
        store.close()


def test_an_expired_lease_is_taken_over_and_a_heartbeat_keeps_one(store_at) -> None:
    """A sweep on another host whose process died stops renewing: its job is free once the
    lease runs out; a live sweep's heartbeat keeps its jobs. The late sweep's measurement of a
    cell taken over and measured meanwhile is not recorded: one measurement per cell."""
    store = Store(store_at)
    try:
        with store.tx():
            store.db.execute("INSERT INTO devices(name, fingerprint, info, first_seen, last_seen) VALUES('d','fp','{}',0,0)")
            store.db.execute("INSERT INTO subnets VALUES('h','b','{}',1,'s')")
        device = store.devices()[0]["id"]
        store.add_jobs([{"job_key": k, "device_id": device, "subnet_hash": "h", "phase": "prefill", "batch": 1,
                         "seq_len": s, "past_len": 0, "backend": "ort-cpu", "threads": 1, "protocol": "p"}
                        for k, s in (("a", 16), ("b", 32))])
        (a, b) = store.jobs_by_key(["a", "b"])
        assert store.claim(a.id, "elsewhere:1:dead", 0.5) == 1 and store.claim(b.id, "elsewhere:2:live", 0.5) == 1
        assert store.claim(a.id, "here", 30) is None  # held
        time.sleep(0.3)
        assert store.renew("elsewhere:2:live", 0.5) == 1
        time.sleep(0.3)
        assert store.claim(a.id, "here", 30) == 2  # expired: taken over
        assert store.claim(b.id, "here", 30) is None  # renewed: still held
        result = {"median_ms": 1.0}
        assert store.finish_job(a, device, result, "k") is not None
        assert store.finish_job(a, device, result, "k") is None  # the sweep that lost the lease, late
        assert store.count("measurements") == 1
    finally:
        store.close()


@pytest.mark.parametrize(("store_kind", "stop"), [("file", signal.SIGKILL), ("server", signal.SIGSTOP)],
                         ids=["file-killed", "server-frozen"])
def test_two_processes_on_one_store_and_a_stopped_one(tiny_dir, tmp_path, request, store_kind, stop) -> None:
    """Two profile-device processes on one store never measure a cell twice. One SIGKILLed
    mid-sweep (its leases end at once: its process is gone) or frozen by SIGSTOP (alive to
    this host, silent: as a crashed host looks from another, its leases run out) loses its
    jobs to the survivor, which measures them. On a PostgreSQL store, as sweeps on several
    hosts share one."""
    db = tmp_path / "m.db" if store_kind == "file" else request.getfixturevalue("pg_store")
    Store(db).close()
    cmd = [sys.executable, "-m", "edgenas.commands.profile", "--host", "local", "--model", str(tiny_dir), "--neuron-step", "16",
           "--samples", "6", "--seed", "9", "--db", str(db), "--phases", "prefill,decode", "--seq-len", "16",
           "--past-len", "16", "--min-time", "0.05", "--max-time", "0.3", "--reference-every", "0", "--lease", "3"]
    env = dict(os.environ, EDGENAS_LOG="WARNING")
    first = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env, start_new_session=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not _count(db, "jobs WHERE status='running'"):
        time.sleep(0.05)
    second = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    while time.monotonic() < deadline and _count(db, "measurements") < 2:
        time.sleep(0.05)
    os.killpg(first.pid, stop)  # the process and its local agent, mid-sweep
    try:
        out = second.communicate(timeout=300)[1].decode()
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()
    assert second.returncode == 0, out[-2000:]
    jobs = [r[0] for r in _query(db, "SELECT job_id FROM measurements WHERE is_reference=0")]
    assert len(jobs) == len(set(jobs)) == 12
    assert _count(db, "jobs WHERE status!='done'") == 0
    if stop == signal.SIGKILL:
        assert _count(db, "jobs WHERE owner IS NOT NULL") == 0


def _count(db, what: str) -> int:
    try:
        return int(_query(db, f"SELECT COUNT(*) FROM {what}")[0][0])
    except StoreError:  # a file store in the middle of being created
        return 0


def test_the_command_line_sweeps_a_group_and_reports_each_board(tiny_dir, tiny_ws, two_boards, tmp_path, capsys) -> None:
    from edgenas.commands.profile import main

    inv, _ = two_boards
    configs = tmp_path / "configs.jsonl"
    configs.write_text("".join(c.to_json() + "\n" for c in tiny_ws.space.sample(3, 8)))
    rc = main(["--host", "pair", "--inventory", str(inv), "--model", str(tiny_dir), "--neuron-step", "16",
               "--configs", str(configs), "--db", str(tmp_path / "m.db"), "--seq-len", "16", "--past-len", "16",
               "--min-time", "0.03", "--max-time", "0.3", "--reference-every", "0"])
    out = capsys.readouterr().out
    assert rc == 0, out[-3000:]
    assert "2 boards, 1 device(s)" in out and "b1" in out and "b2" in out
    assert len(_measured_by(tmp_path / "m.db")) == 6


def test_a_server_store_without_its_driver_names_the_package(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "psycopg", None)
    with pytest.raises(StoreError, match=r"needs the PostgreSQL driver") as e:
        Store("postgresql://nobody@127.0.0.1:1/db")
    assert 'pip install "psycopg[binary]"' in e.value.fix


def test_a_server_store_outlives_a_dropped_connection(pg_store) -> None:
    """The server ends the store's session (as a restart or a network blip would): the next
    call reconnects and runs, so a long sweep does not stop for it."""
    import psycopg

    store = Store(pg_store)
    try:
        store.upsert_device("d", "fp", {})
        with psycopg.connect(pg_store, autocommit=True) as admin:
            admin.execute("SELECT pg_terminate_backend(%s)", (store.db.conn.info.backend_pid,))
        assert [d["name"] for d in store.devices()] == ["d"]
        assert abs(store.db.now() - time.time()) < 5  # the server's clock, here the same host's
    finally:
        store.close()


def test_two_boards_share_an_interleaved_sweep_a_batch_each(tiny_ws, two_boards, tmp_path) -> None:
    """In rounds, a board claims a batch of cells: every cell measured once, all of its rounds
    on the board that claimed it, both boards used."""
    from profiler.rounds import RoundsPlan

    inv, _ = two_boards
    db = tmp_path / "m.db"
    configs = tiny_ws.space.sample(6, 5, layer_ranking=tiny_ws.importance.layer_ranking())
    fleet = _fleet(tiny_ws, inv, "pair", db, configs, rounds=RoundsPlan(min_rounds=2, max_rounds=2, batch_cells=3))
    by = _measured_by(db)
    assert len(by) == 12 and set(by.values()) == {"b1", "b2"} and sum(s.measured for s in fleet.boards) == 12
    with sqlite3.connect(db) as c:
        boards = c.execute("SELECT job_id, COUNT(DISTINCT board), COUNT(*) FROM rounds WHERE job_id IS NOT NULL "
                           "AND pass_no=0 GROUP BY job_id").fetchall()  # pass 1: each board's re-measurements
    assert len(boards) == 12 and all(n_boards == 1 and n == 2 for _, n_boards, n in boards)
    assert all(by[job] == b for job, b in _round_boards(db).items())


def _round_boards(db: Path) -> dict[int, str]:
    with sqlite3.connect(db) as c:
        return dict(c.execute("SELECT job_id, board FROM rounds WHERE job_id IS NOT NULL AND pass_no=0").fetchall())
