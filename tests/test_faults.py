"""Faults injected at a random point of a 30-job sweep over the loopback SSH "board": after
each, the sweep completes, every finished measurement is stored exactly once, and the faults
are recorded with their class."""

from __future__ import annotations

import random
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from profiler.targets import Timeouts
from tests.helpers import FAST_TIMING, sweep

N_CONFIGS = 15  # x 2 phases = 30 jobs
SLOW_CELLS = dict(FAST_TIMING, min_time_s=0.15, max_time_s=0.5)


class FaultAt(threading.Thread):
    """Runs ``action`` once, when the store holds ``after`` measurements."""

    def __init__(self, db: Path, after: int, action: Callable[[], None]) -> None:
        super().__init__(daemon=True)
        self.db, self.after, self.action = db, after, action
        self.fired = threading.Event()

    def run(self) -> None:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                with sqlite3.connect(self.db, timeout=1) as c:
                    n = c.execute("SELECT COUNT(*) FROM measurements WHERE is_reference=0").fetchone()[0]
            except sqlite3.Error:
                n = 0
            if n >= self.after:
                self.action()
                self.fired.set()
                return
            time.sleep(0.02)


def agent_pids(remote: Path) -> list[int]:
    out = subprocess.run(["pgrep", "-f", f"agent.py --root {remote}"], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def agent_idle_vmpeak_mb(root: Path) -> int:
    agent = Path(__file__).parent.parent / "device_agents" / "agent.py"
    p = subprocess.Popen([sys.executable, str(agent), "--root", str(root)], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, text=True)
    assert p.stdin and p.stdout
    p.stdin.write('{"id": 1, "verb": "hello"}\n')
    p.stdin.flush()
    p.stdout.readline()
    with open(f"/proc/{p.pid}/status") as f:
        peak_kb = next(int(line.split()[1]) for line in f if line.startswith("VmPeak:"))
    p.stdin.write('{"id": 2, "verb": "shutdown"}\n')
    p.stdin.flush()
    p.wait(timeout=30)
    return peak_kb // 1024


def check_store(db: Path, jobs: int = 2 * N_CONFIGS) -> list[tuple[int, str | None]]:
    with sqlite3.connect(db) as c:
        n = c.execute("SELECT COUNT(*) FROM measurements WHERE is_reference=0").fetchone()[0]
        distinct = c.execute("SELECT COUNT(DISTINCT job_id) FROM measurements WHERE is_reference=0").fetchone()[0]
        done = c.execute("SELECT COUNT(*) FROM jobs WHERE status='done'").fetchone()[0]
        attempts = c.execute("SELECT attempts, error_class FROM jobs ORDER BY id").fetchall()
    assert n == distinct == done == jobs, (n, distinct, done)
    return attempts


@pytest.fixture
def board(sshd, tmp_path):
    remote = tmp_path / "board-root"
    inv = sshd.inventory(tmp_path / "inventory.toml", sys.executable, remote)
    return {"inventory": inv, "ssh_config": sshd.ssh_config, "remote": remote}


def run_with_fault(tiny_ws, board, tmp_path, action: Callable[[], None], seed: int, **kw):
    db = tmp_path / "m.db"
    configs = tiny_ws.space.sample(N_CONFIGS, 100 + seed)
    fault = FaultAt(db, random.Random(seed).randint(3, 20), action)
    fault.start()
    kw.setdefault("timing", SLOW_CELLS)
    s = sweep(tiny_ws, "board", db, configs, board["inventory"], board["ssh_config"], **kw)
    fault.join(timeout=5)
    assert fault.fired.is_set(), "the fault never fired"
    return s, db


def test_agent_killed_mid_measurement(tiny_ws, board, tmp_path) -> None:
    def kill() -> None:
        for pid in agent_pids(board["remote"]):
            subprocess.run(["kill", "-9", str(pid)])

    s, db = run_with_fault(tiny_ws, board, tmp_path, kill, seed=1)
    assert s.measured == 30 and not s.failed and s.reconnects >= 1
    assert s.fault_counts().get("runtime_error", 0) >= 1 or s.fault_counts().get("connection_lost", 0) >= 1
    assert max(a for a, _ in check_store(db)) >= 2


def test_ssh_connection_cut(tiny_ws, board, sshd, tmp_path) -> None:
    def cut() -> None:  # the per-connection sshd processes die, as when a cable is pulled
        assert sshd.proc is not None
        subprocess.run(["pkill", "-9", "-P", str(sshd.proc.pid)])

    s, db = run_with_fault(tiny_ws, board, tmp_path, cut, seed=2)
    assert s.measured == 30 and not s.failed and s.reconnects >= 1
    assert s.fault_counts().get("connection_lost", 0) >= 1
    check_store(db)


def test_sshd_restarted(tiny_ws, board, sshd, tmp_path) -> None:
    def restart() -> None:  # the board's sshd goes away for a second, as in a reboot
        sshd.stop()
        time.sleep(1.0)
        sshd.start()

    s, db = run_with_fault(tiny_ws, board, tmp_path, restart, seed=3)
    assert s.measured == 30 and not s.failed and s.reconnects >= 1
    check_store(db)


def test_model_cache_deleted_mid_sweep(tiny_ws, board, tmp_path) -> None:
    removed: list[str] = []

    def wipe() -> None:
        removed.extend(p.name for p in (board["remote"] / "models").glob("*"))
        shutil.rmtree(board["remote"] / "models", ignore_errors=True)

    # the reference sub-network stays on the board and is measured again every 4 jobs, so a
    # job after the wipe always meets a model that is gone: a load error, the model re-sent
    s, db = run_with_fault(tiny_ws, board, tmp_path, wipe, seed=4, reference_every=4)
    assert removed, "the wipe found no model on the board: it tested nothing"
    assert s.measured == 30 and not s.failed
    assert set(s.fault_counts()) == {"load_error"}, s.fault_counts()
    check_store(db)


def test_hanging_measurement_times_out(tiny_ws, board, tmp_path) -> None:
    def freeze() -> None:  # the agent stops answering without dying
        for pid in agent_pids(board["remote"]):
            subprocess.run(["kill", "-STOP", str(pid)])

    timeouts = Timeouts(connect=10, handshake=60, measure=4, upload_stall=10)
    s, db = run_with_fault(tiny_ws, board, tmp_path, freeze, seed=5, timeouts=timeouts)
    assert s.measured == 30 and not s.failed
    assert s.fault_counts().get("timeout", 0) >= 1
    check_store(db)
    for pid in agent_pids(board["remote"]):  # nothing frozen is left behind
        subprocess.run(["kill", "-CONT", str(pid)])


def test_failures_that_persist_are_recorded_with_class_and_attempts(tiny_ws, board, tmp_path) -> None:
    """A board whose agent is killed at every attempt of every job: the sweep gives up on
    each job after --max-attempts, and says why."""
    db = tmp_path / "m.db"
    stop = threading.Event()

    def killer() -> None:  # kills every agent 2 s after it appears: after its handshake, mid-measurement
        seen: dict[int, float] = {}
        while not stop.is_set():
            now = time.monotonic()
            for pid in agent_pids(board["remote"]):
                if now - seen.setdefault(pid, now) > 2.0:
                    subprocess.run(["kill", "-9", str(pid)])
            time.sleep(0.1)

    configs = tiny_ws.space.sample(2, 7)
    t = threading.Thread(target=killer, daemon=True)
    t.start()
    try:
        s = sweep(tiny_ws, "board", db, configs, board["inventory"], board["ssh_config"], max_attempts=2,
                  timing=dict(FAST_TIMING, min_time_s=4.0, max_time_s=5.0), reconnect_attempts=2, phases=("prefill",))
    except Exception as e:  # losing the board altogether is a clear stop, also acceptable
        assert "could not reconnect" in str(e) or "did not answer the handshake" in str(e)
        s = None
    finally:
        stop.set()
        t.join()
    with sqlite3.connect(db) as c:
        rows = c.execute("SELECT status, error_class, attempts FROM jobs").fetchall()
        n = c.execute("SELECT COUNT(*) FROM measurements WHERE is_reference=0").fetchone()[0]
    failed = [r for r in rows if r[0] == "failed"]
    assert failed, rows
    assert all(r[1] in ("runtime_error", "connection_lost", "timeout") and r[2] == 2 for r in failed)
    assert n == sum(1 for r in rows if r[0] == "done")
    if s is not None:
        assert len(s.failed) == len(failed) and all(f["attempts"] == 2 for f in s.failed)


def test_host_killed_and_rerun_over_ssh(tiny_dir, board, sshd, tmp_path) -> None:
    db = tmp_path / "m.db"
    cmd = [sys.executable, "-m", "edgenas.commands.profile", "--host", "board", "--inventory", str(board["inventory"]),
           "--ssh-config", str(board["ssh_config"]), "--model", str(tiny_dir), "--neuron-step", "16", "--samples",
           str(N_CONFIGS), "--seq-len", "16", "--past-len", "16", "--db", str(db), "--min-time", "0.1", "--max-time",
           "0.4", "--reference-every", "0"]
    env = {"EDGENAS_CACHE": str(tmp_path / "cache"), "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    fault = FaultAt(db, random.Random(8).randint(3, 20), lambda: proc.send_signal(signal.SIGKILL))
    fault.start()
    proc.wait(timeout=300)
    fault.join(timeout=5)
    with sqlite3.connect(db) as c:
        before = c.execute("SELECT COUNT(*) FROM measurements").fetchone()[0]
    assert 0 < before < 30
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    check_store(db)


def test_out_of_memory_under_an_agent_memory_limit(sshd, tmp_path, tmp_path_factory) -> None:
    """A board with little memory (the agent's address space capped by ``ulimit -v``): the
    sub-network that does not fit fails as out_of_memory, once, and the others are measured."""
    import os
    from unittest import mock

    from subnets.config import SubnetConfig
    from subnets.workspace import Workspace
    from tests.tiny import make_tiny_model

    model = make_tiny_model(tmp_path / "mid", hidden=512, heads=8, kv_heads=2, head_dim=64, intermediate=8192, layers=6)
    with mock.patch.dict(os.environ, {"EDGENAS_CACHE": str(tmp_path / "cache")}):
        ws = Workspace.open(model, neuron_step=64, eval_budget=256)
        bid = ws.base.base_id
        configs = [SubnetConfig.uniform(bid, [0], 1, 1, 64), ws.space.full(), SubnetConfig.uniform(bid, [0, 1], 1, 2, 128)]
        # The cap: what the idle agent (Python, numpy, onnxruntime) needs plus 40 MB, room for
        # the small sub-networks but not for the full model's 320 MB of weights.
        limit = agent_idle_vmpeak_mb(tmp_path / "probe") + 40
        inv = sshd.inventory(tmp_path / "inv.toml", sys.executable, tmp_path / "r", agent_memory_mb=limit)
        s = sweep(ws, "board", tmp_path / "m.db", configs, inv, sshd.ssh_config, phases=("prefill",))
    assert s.measured == 2, s.faults
    assert [f["error_class"] for f in s.failed] == ["out_of_memory"]
    assert s.failed[0]["attempts"] == 1  # deterministic: not retried
    assert s.failed[0]["subnet"] == configs[1].config_hash()
    check_store(tmp_path / "m.db", jobs=2)
