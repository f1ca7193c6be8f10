"""Profiling over a real SSH server on loopback, and through the local agent."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from profiler.errors import HostError, StoreError
from profiler.hosts import resolve_host
from profiler.store import Store
from profiler.targets import SSHTarget
from tests.helpers import FAST_TIMING, sweep


@pytest.fixture
def board(sshd, tmp_path):
    """An inventory entry 'board' on the loopback sshd, with its own remote folder."""
    remote = tmp_path / "board-root"
    inv = sshd.inventory(tmp_path / "inventory.toml", sys.executable, remote)
    return {"inventory": inv, "ssh_config": sshd.ssh_config, "remote": remote}


def configs(ws, n, seed=0):
    return ws.space.sample(n, seed, layer_ranking=ws.importance.layer_ranking())


def test_ssh_sweep_measures_and_stores(tiny_ws, board, tmp_path) -> None:
    db = tmp_path / "m.db"
    cs = configs(tiny_ws, 3)
    s = sweep(tiny_ws, "board", db, cs, board["inventory"], board["ssh_config"], reference_every=4)
    assert s.measured == 6 and not s.failed and s.jobs == 6
    store = Store(db)
    rows = list(store.measurement_rows())
    assert len(rows) == 6
    assert {(r["phase"], r["seq_len"], r["past_len"]) for r in rows} == {("prefill", 16, 0), ("decode", 1, 16)}
    for r in rows:
        assert r["median_ms"] > 0 and r["n"] >= 5 and r["device"] == "board"
        assert len(json.loads(r["raw_ms"])) == r["n"]
        assert json.loads(r["versions"])["onnxruntime"]
        assert json.loads(r["settings"])["threads"] == 1
    assert len(store.references(rows[0]["device_id"])) >= 1
    info = json.loads(store.devices()[0]["info"])
    assert info["hello"]["board"]["kind"] == "x86" and info["hello"]["onnxruntime"]["max_opset"] >= 17
    store.close()
    # the agent wrote only under its folder: a versioned agent dir, its pid record, verified graph-only models
    remote = board["remote"]
    assert sorted(p.name.split("-")[0] for p in remote.iterdir()) == ["agent", "agents", "models"]
    models = [p for p in (remote / "models").iterdir()]
    assert models and all((m / ".verified").is_file() and (m / "weights.bin").is_file() for m in models)
    assert s.bytes_uploaded < 200_000  # graphs only: the board made its own weights


def test_resume_never_repeats_a_measurement(tiny_ws, board, tmp_path) -> None:
    db = tmp_path / "m.db"
    cs = configs(tiny_ws, 3, seed=1)
    first = sweep(tiny_ws, "board", db, cs[:2], board["inventory"], board["ssh_config"])
    assert first.measured == 4
    second = sweep(tiny_ws, "board", db, cs, board["inventory"], board["ssh_config"])
    assert second.already_done == 4 and second.measured == 2
    third = sweep(tiny_ws, "board", db, cs, board["inventory"], board["ssh_config"])
    assert third.measured == 0 and third.already_done == 6 and third.bytes_uploaded == 0
    store = Store(db)
    assert store.count("measurements") == 6
    store.close()


def test_interrupted_sweep_resumes(tiny_dir, tmp_path) -> None:
    """The host process is SIGKILLed mid-sweep; rerunning finishes the rest, each job once."""
    db = tmp_path / "m.db"
    cmd = [sys.executable, "-m", "edgenas.commands.profile", "--host", "local", "--model", str(tiny_dir), "--neuron-step", "16",
           "--samples", "6", "--seq-len", "16", "--past-len", "16", "--db", str(db), "--min-time", "0.2",
           "--max-time", "0.5", "--reference-every", "0"]
    env = {"EDGENAS_CACHE": str(tmp_path / "cache"), "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    done = 0
    while time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.2)
        if db.exists():
            try:
                with sqlite3.connect(db) as c:
                    done = c.execute("SELECT COUNT(*) FROM measurements").fetchone()[0]
            except sqlite3.Error:
                continue
            if done >= 3:
                proc.kill()
                break
    proc.wait(timeout=30)
    assert 3 <= done < 12, "the sweep should have been killed part-way"
    with sqlite3.connect(db) as c:
        before = c.execute("SELECT COUNT(*) FROM measurements").fetchone()[0]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    with sqlite3.connect(db) as c:
        assert c.execute("SELECT COUNT(*) FROM measurements").fetchone()[0] == 12
        assert c.execute("SELECT COUNT(DISTINCT job_id) FROM measurements").fetchone()[0] == 12
        assert c.execute("SELECT COUNT(*) FROM jobs WHERE status='done'").fetchone()[0] == 12
    assert before >= 3
    assert f"{12 - before} measured now, {before} already in the store" in out.stdout.replace("\n", " ")


def test_local_host_through_the_cli(tiny_dir, tmp_path, capsys) -> None:
    from edgenas.commands.profile import main

    db = tmp_path / "local.db"
    code = main(["--host", "local", "--model", str(tiny_dir), "--neuron-step", "16", "--samples", "2", "--phases", "decode",
                 "--past-len", "8,32", "--db", str(db), "--min-time", "0.03", "--max-time", "0.3"])
    out = capsys.readouterr().out
    assert code == 0
    assert "latency on local" in out and "4 measured now" in out
    store = Store(db)
    assert sorted({r["past_len"] for r in store.measurement_rows()}) == [8, 32]
    store.close()
    from edgenas.cli import main as edgenas_main

    assert edgenas_main(["measurements", "--db", str(db), "--csv", str(tmp_path / "m.csv")]) == 0
    lines = (tmp_path / "m.csv").read_text().splitlines()
    assert lines[0].startswith("id,device,fingerprint") and len(lines) >= 5


def test_unknown_host_key_is_refused_then_recorded_on_opt_in(tiny_ws, sshd, tmp_path) -> None:
    kh = tmp_path / "empty_known_hosts"
    kh.write_text("")
    cfg = tmp_path / "ssh_config"
    cfg.write_text(sshd.ssh_config.read_text().replace(str(sshd.known_hosts), str(kh)))
    inv = sshd.inventory(tmp_path / "inv.toml", sys.executable, tmp_path / "r")
    with pytest.raises(HostError, match="not in known_hosts") as e:
        sweep(tiny_ws, "board", tmp_path / "m.db", configs(tiny_ws, 1), inv, cfg)
    assert "--accept-new-host-key" in e.value.fix
    s = sweep(tiny_ws, "board", tmp_path / "m.db", configs(tiny_ws, 1), inv, cfg, accept_new_host_key=True)
    assert s.measured == 2
    assert f"[127.0.0.1]:{sshd.port} ssh-ed25519" in kh.read_text()


def test_changed_host_key_is_refused(tiny_ws, sshd, tmp_path) -> None:
    from tests.sshd import keygen

    other = keygen(tmp_path / "other_key")
    kh = tmp_path / "known_hosts"
    kh.write_text(f"[127.0.0.1]:{sshd.port} {' '.join(other.split()[:2])}\n")
    cfg = tmp_path / "ssh_config"
    cfg.write_text(sshd.ssh_config.read_text().replace(str(sshd.known_hosts), str(kh)))
    inv = sshd.inventory(tmp_path / "inv.toml", sys.executable, tmp_path / "r")
    for accept in (False, True):  # opting in to new keys never accepts a changed one
        with pytest.raises(HostError, match="has CHANGED"):
            sweep(tiny_ws, "board", tmp_path / "m.db", configs(tiny_ws, 1), inv, cfg, accept_new_host_key=accept)


class TruncatingTarget(SSHTarget):
    """Cuts the first upload of each graph short, as a dropped link would."""

    cut: set[str] = set()

    def put(self, local: Path, remote: str) -> None:
        super().put(local, remote)
        if local.suffix == ".onnx" and remote not in TruncatingTarget.cut:
            TruncatingTarget.cut.add(remote)
            with self.sftp.open(remote, "r+") as f:
                f.truncate(local.stat().st_size // 2)


def test_upload_is_hash_verified_and_resent(tiny_ws, board, tmp_path) -> None:
    s = sweep(tiny_ws, "board", tmp_path / "m.db", configs(tiny_ws, 1, seed=3), board["inventory"], board["ssh_config"],
              target_cls=TruncatingTarget)
    assert s.measured == 2 and not s.failed and s.retries == 1
    store = Store(tmp_path / "m.db")
    attempts = [r[0] for r in store.db.execute("SELECT attempts FROM jobs ORDER BY id")]
    store.close()
    assert sorted(attempts) == [1, 2]  # the first job met the cut upload, was retried once


def test_board_without_onnxruntime_says_what_to_install(tiny_ws, sshd, tmp_path) -> None:
    bare = Path("/usr/bin/python3")
    probe = subprocess.run([str(bare), "-c", "import onnxruntime"], capture_output=True) if bare.exists() else None
    if probe is None or probe.returncode == 0:
        pytest.skip("needs a system python3 without onnxruntime")
    inv = sshd.inventory(tmp_path / "inv.toml", str(bare), tmp_path / "r")
    with pytest.raises(HostError, match=r"lacks .*onnxruntime") as e:
        sweep(tiny_ws, "board", tmp_path / "m.db", configs(tiny_ws, 1), inv, sshd.ssh_config)
    assert "pip install" in e.value.fix and "onnxruntime" in e.value.fix


def test_board_without_python(tiny_ws, sshd, tmp_path) -> None:
    inv = sshd.inventory(tmp_path / "inv.toml", "/nonexistent/python3", tmp_path / "r")
    with pytest.raises(HostError, match="has no Python"):
        sweep(tiny_ws, "board", tmp_path / "m.db", configs(tiny_ws, 1), inv, sshd.ssh_config)


def test_refused_authentication(tiny_ws, sshd, tmp_path) -> None:
    from tests.sshd import keygen

    keygen(tmp_path / "stranger")
    cfg = tmp_path / "ssh_config"
    cfg.write_text(sshd.ssh_config.read_text().replace(str(sshd.user_key), str(tmp_path / "stranger")))
    inv = sshd.inventory(tmp_path / "inv.toml", sys.executable, tmp_path / "r")
    with pytest.raises(HostError, match="authentication refused"):
        sweep(tiny_ws, "board", tmp_path / "m.db", configs(tiny_ws, 1), inv, cfg)


def test_unreachable_host(tiny_ws, sshd, tmp_path) -> None:
    from tests.sshd import free_port

    cfg = tmp_path / "ssh_config"
    cfg.write_text(sshd.ssh_config.read_text().replace(f"Port {sshd.port}", f"Port {free_port()}"))
    inv = sshd.inventory(tmp_path / "inv.toml", sys.executable, tmp_path / "r")
    with pytest.raises(HostError, match="cannot reach"):
        sweep(tiny_ws, "board", tmp_path / "m.db", configs(tiny_ws, 1), inv, cfg)


def test_host_resolution(sshd, tmp_path) -> None:
    spec = resolve_host("board", tmp_path / "none.toml", sshd.ssh_config)
    assert (spec.kind, spec.hostname, spec.port, spec.user) == ("ssh", "127.0.0.1", sshd.port, sshd.user)
    assert spec.identity_files == (str(sshd.user_key),)
    with pytest.raises(HostError, match="unknown host 'jetson'") as e:
        resolve_host("jetson", tmp_path / "none.toml", sshd.ssh_config)
    assert "Host jetson" in e.value.fix
    inv = tmp_path / "inv.toml"
    inv.write_text('[hosts.pi]\nhostname = "board"\nthreads = 4\nbackend = "ort-cpu"\nremote_dir = "/tmp/x"\n')
    pi = resolve_host("pi", inv, sshd.ssh_config)
    assert pi.threads == 4 and pi.port == sshd.port and pi.remote_dir == "/tmp/x"
    inv.write_text('[hosts.pi]\nhostnme = "typo"\n')
    with pytest.raises(HostError, match="unknown keys"):
        resolve_host("pi", inv, sshd.ssh_config)
    assert resolve_host("local", tmp_path / "none.toml", sshd.ssh_config).kind == "local"


def test_incompatible_store_is_refused(tmp_path) -> None:
    db = tmp_path / "old.db"
    Store(db).close()
    with sqlite3.connect(db) as c:
        c.execute("UPDATE meta SET value='99' WHERE key='schema_version'")
    with pytest.raises(StoreError, match="incompatible edgenas"):
        Store(db)
    other = tmp_path / "other.db"
    with sqlite3.connect(other) as c:
        c.execute("CREATE TABLE t(x)")
    with pytest.raises(StoreError, match="did not write"):
        Store(other)


def test_cli_bad_configs_line_is_named(tiny_dir, tiny_base, tmp_path, capsys) -> None:
    from edgenas.commands.profile import main

    cfg = tmp_path / "c.jsonl"
    good = tiny_base.space(16).full().to_json()
    cfg.write_text(good + "\n" + good.replace('"kv_groups":2', '"kv_groups":9') + "\n")
    code = main(["--host", "local", "--model", str(tiny_dir), "--neuron-step", "16", "--configs", str(cfg),
                 "--db", str(tmp_path / "m.db")])
    err = capsys.readouterr().err
    assert code == 2 and "config 2" in err and "kv_groups=9 breaks GQA" in err and "Traceback" not in err


def test_timing_settings_reach_the_agent(tiny_ws, tmp_path) -> None:
    s = sweep(tiny_ws, "local", tmp_path / "m.db", configs(tiny_ws, 1), phases=("decode",),
              timing=dict(FAST_TIMING, min_runs=17, min_time_s=0.0))
    assert s.measured == 1
    store = Store(tmp_path / "m.db")
    (row,) = list(store.measurement_rows())
    store.close()
    assert row["n"] >= 17


def test_active_profiling_picks_unmeasured_uncertain_subnetworks(tiny_dir, tmp_path, capsys) -> None:
    from edgenas.cli import profile_device_main

    db = tmp_path / "a.db"
    common = ["--host", "local", "--model", str(tiny_dir), "--neuron-step", "16", "--phases", "prefill", "--seq-len",
              "16", "--db", str(db), "--min-time", "0.03", "--max-time", "0.3", "--reference-every", "0"]
    assert profile_device_main([*common, "--samples", "14"]) == 0
    store = Store(db)
    before = {r["subnet_hash"] for r in store.measurement_rows()}
    store.close()
    assert profile_device_main([*common, "--active", "3"]) == 0
    store = Store(db)
    after = {r["subnet_hash"] for r in store.measurement_rows()}
    store.close()
    assert len(after - before) == 3 and before < after
    assert profile_device_main([*common, "--active", "2", "--active-near", "0.8"]) == 0
    store = Store(db)
    assert len({r["subnet_hash"] for r in store.measurement_rows()} - after) == 2
    store.close()
    capsys.readouterr()
    assert profile_device_main([*common, "--active-near", "0.8"]) == 2
    assert "only steers --active" in capsys.readouterr().err
    assert profile_device_main([*common, "--active", "2", "--db", str(tmp_path / "none.db")]) == 2
    assert "needs earlier measurements" in capsys.readouterr().err


def test_graph_opt_and_decode_min_time_reach_the_agent(tiny_dir, tmp_path) -> None:
    """--graph-opt is part of the stored back-end (a predictor never mixes levels) and decode
    cells are timed for at least --decode-min-time."""
    import json

    from edgenas.commands.profile import main

    db = tmp_path / "opt.db"
    code = main(["--host", "local", "--model", str(tiny_dir), "--neuron-step", "16", "--samples", "1", "--seq-len", "8",
                 "--past-len", "8", "--db", str(db), "--min-time", "0.02", "--decode-min-time", "0.15", "--max-time",
                 "0.5", "--graph-opt", "disabled", "--reference-every", "0"])
    assert code == 0
    store = Store(db)
    rows = list(store.measurement_rows())
    store.close()
    assert {r["backend"] for r in rows} == {"ort-cpu:opt-disabled"}
    assert all(json.loads(r["settings"])["graph_opt"] == "disabled" for r in rows)
    decode = [r for r in rows if r["phase"] == "decode"]
    assert decode and all(sum(json.loads(r["raw_ms"])) >= 0.8 * 150 for r in decode)
    # decode cells are split over 3 fresh sessions by default (--decode-sessions), prefill not
    for r in rows:
        sessions = json.loads(r["settings"]).get("sessions")
        if r["phase"] == "decode":
            assert len(sessions) == 3 and all(s["runs"] >= 3 and s["median_ms"] > 0 for s in sessions)
            assert sum(s["runs"] for s in sessions) == r["n"]
        else:
            assert sessions is None


def test_measured_models_leave_the_board_unless_kept(tiny_ws, tmp_path) -> None:
    """Boards have small disks: a sub-network's files are deleted once its cells are measured."""
    from profiler.hosts import resolve_host
    from profiler.targets import Timeouts, make_target
    from tests.helpers import sweep

    configs = tiny_ws.space.sample(3, seed=5)
    for keep, db in ((False, tmp_path / "a.db"), (True, tmp_path / "b.db")):
        summary = sweep(tiny_ws, "local", db, configs, keep_models=keep)
        assert summary.measured == 6
        with sqlite3.connect(db) as c:
            keys = {r[0] for r in c.execute("SELECT export_key FROM measurements")}
        target = make_target(resolve_host("local"), Timeouts())
        target.start()
        try:
            on_board = target.models_on_board()
        finally:
            target.stop()
        assert (keys <= on_board) if keep else not (keys & on_board)
        assert (summary.evicted_bytes == 0) if keep else summary.evicted_bytes > 0


def test_paired_sweep_stores_ratios_and_the_predictor_uses_them(tiny_ws, tmp_path) -> None:
    import numpy as np

    from predictor.data import load_measurements
    from tests.helpers import sweep

    db = tmp_path / "paired.db"
    configs = tiny_ws.space.sample(10, seed=8)
    summary = sweep(tiny_ws, "local", db, configs, paired=True, phases=("prefill",))
    assert summary.measured == 10
    store = Store(db)
    rows = list(store.measurement_rows())
    assert all(r["paired_ratio"] > 0 and r["companion_ms"] > 0 for r in rows)
    # stability depends on the machine's load; this test is about how ratios are used
    m = load_measurements(store, "local", "prefill", tiny_ws.space.dims, tiny_ws.base.base_id, include_unstable=True)
    store.close()
    assert m.paired == 10
    comp = np.median([r["companion_ms"] for r in rows])
    by_hash = {r["subnet_hash"]: r["paired_ratio"] * comp for r in rows}
    assert np.allclose(m.y_ms, [by_hash[h] for h in m.subnet_hashes])


def _schema2_store(path: Path) -> Path:
    """A store written by edgenas with store schema 2 (a 3-sub-network local sweep; raw
    times and telemetry blanked to keep the file small)."""
    with sqlite3.connect(path) as c:
        c.executescript((Path(__file__).parent / "data" / "store_schema2.sql").read_text())
    return path


def test_a_schema_1_store_is_migrated_in_place(tmp_path) -> None:
    db = _schema2_store(tmp_path / "old.db")
    with sqlite3.connect(db) as c:
        c.execute("ALTER TABLE measurements DROP COLUMN paired_ratio")
        c.execute("ALTER TABLE measurements DROP COLUMN companion_ms")
        c.execute("UPDATE meta SET value='1' WHERE key='schema_version'")
    Store(db).close()
    with sqlite3.connect(db) as c:
        cols = {r[1] for r in c.execute("PRAGMA table_info(measurements)")}
        assert {"paired_ratio", "companion_ms", "protocol"} <= cols
        assert c.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()[0] == "6"
        assert c.execute("SELECT COUNT(*) FROM repeats").fetchone()[0] == 0  # v5: re-measurements beside them
        assert c.execute("SELECT COUNT(*) FROM rounds").fetchone()[0] == 0  # v6: interleaved rounds


def test_a_schema_2_store_keeps_every_measurement_and_merges_backend_devices(tmp_path) -> None:
    """Schema 2 put the back-end in the device fingerprint: a board swept through two
    back-ends was two devices. Migrated, it is one device and nothing measured is lost."""
    from predictor.data import load_measurements
    from profiler.fingerprint import device_fingerprint
    from subnets.dims import BaseDims

    db = _schema2_store(tmp_path / "v2.db")
    with sqlite3.connect(db) as c:
        before = c.execute("SELECT COUNT(*) FROM measurements").fetchone()[0]
        name, info = c.execute("SELECT name, info FROM devices").fetchone()
        c.execute("INSERT INTO devices(name, fingerprint, info, first_seen, last_seen) VALUES(?, 'oldcudafp', ?, 0, 0)",
                  (name, info))
        cuda_id = c.execute("SELECT id FROM devices WHERE fingerprint='oldcudafp'").fetchone()[0]
        c.execute("UPDATE measurements SET device_id=?, backend='ort-cuda' WHERE id=(SELECT MIN(id) FROM measurements)",
                  (cuda_id,))
    store = Store(db)
    try:
        devices = store.devices()
        assert len(devices) == 1 and devices[0]["fingerprint"] == device_fingerprint(json.loads(info)["hello"])
        rows = list(store.measurement_rows(device=name))
        assert len(rows) == before and {r["protocol"] for r in rows} == {"unrecorded"}
        assert {r["backend"] for r in rows} == {"ort-cpu", "ort-cuda"}
        dims = BaseDims.from_dict(json.loads((Path(__file__).parent / "data" / "tiny_dims.json").read_text()))
        m = load_measurements(store, name, "decode", dims, minimum=1, backend="ort-cpu", include_unstable=True)
        assert len(m) == sum(r["phase"] == "decode" and r["backend"] == "ort-cpu" for r in rows)
    finally:
        store.close()


def test_a_rerun_with_other_timing_or_pairing_measures_anew_and_training_never_mixes(tiny_ws, tmp_path) -> None:
    """The job key covers the measurement protocol: a quick trial run does not stand in for
    the real one, and a paired rerun does not keep unpaired cells."""
    from predictor.data import load_measurements

    db = tmp_path / "m.db"
    cs = tiny_ws.space.sample(3, seed=21)
    first = sweep(tiny_ws, "local", db, cs, phases=("prefill",))
    assert first.measured == 3
    again = sweep(tiny_ws, "local", db, cs, phases=("prefill",))
    assert again.already_done == 3 and again.measured == 0  # same settings resume
    longer = sweep(tiny_ws, "local", db, cs, phases=("prefill",), timing=dict(FAST_TIMING, min_time_s=0.05))
    assert longer.already_done == 0 and longer.measured == 3
    paired = sweep(tiny_ws, "local", db, cs, phases=("prefill",), paired=True)
    assert paired.already_done == 0 and paired.measured == 3
    store = Store(db)
    try:
        assert len({r["protocol"] for r in store.measurement_rows()}) == 3
        m = load_measurements(store, "local", "prefill", tiny_ws.space.dims, minimum=1, include_unstable=True)
        assert len(m) == 3 and len({r["protocol"] for r in store.measurement_rows() if r["subnet_hash"] in
                                    set(m.subnet_hashes.tolist())}) == 3
        assert m.protocol_record is not None and m.protocol_record["timing"]["min_time_s"] in (0.03, 0.05)
    finally:
        store.close()


def test_a_default_left_out_is_the_same_protocol_and_old_digests_migrate(tiny_ws, tmp_path) -> None:
    """The main job's sweep sends fewer timing keys than ``edgenas profile``; the agent fills
    in its defaults, so both are one protocol: a resume with the defaults spelled out finds
    every cell done, also in a store written when digests covered only the keys sent."""
    import hashlib

    from profiler.protocol import Protocol
    from profiler.store import job_key

    assert Protocol(timing={"min_time_s": 2}).digest == Protocol(
        timing={"min_time_s": 2.0, "target_rel_ci": 0.02, "sessions": 1}).digest
    db, cs = tmp_path / "m.db", tiny_ws.space.sample(2, seed=5)
    assert sweep(tiny_ws, "local", db, cs, phases=("prefill",)).measured == 2
    with sqlite3.connect(db) as c:  # back to schema 3: digests of the timing keys as sent
        (digest, record), = c.execute("SELECT digest, record FROM protocols").fetchall()
        raw = dict(json.loads(record), timing=dict(FAST_TIMING))
        old = hashlib.sha256(json.dumps(raw, sort_keys=True).encode()).hexdigest()[:12]
        c.execute("UPDATE protocols SET digest=?, record=?", (old, json.dumps(raw)))
        c.execute("UPDATE measurements SET protocol=?", (old,))
        fp = c.execute("SELECT fingerprint FROM devices").fetchone()[0]
        for jid, h, ph, b, s, p, be, t in c.execute("SELECT id, subnet_hash, phase, batch, seq_len, past_len, "
                                                   "backend, threads FROM jobs").fetchall():
            c.execute("UPDATE jobs SET protocol=?, job_key=? WHERE id=?", (old, job_key(fp, h, ph, b, s, p, be, t, old), jid))
        c.execute("UPDATE meta SET value='3' WHERE key='schema_version'")
    assert old != digest
    again = sweep(tiny_ws, "local", db, cs, phases=("prefill",), timing=dict(FAST_TIMING, target_rel_ci=0.02, sessions=1))
    assert again.already_done == 2 and again.measured == 0
    with sqlite3.connect(db) as c:
        assert {r[0] for r in c.execute("SELECT protocol FROM measurements")} == {digest}


def test_one_board_through_two_backends_is_one_device(tiny_ws, tmp_path) -> None:
    from profiler.fingerprint import device_fingerprint

    hello = {"board": {"kind": "linux", "cpu_model": "x"}, "onnxruntime": {"version": "1.20", "providers": ["A", "B"]}}
    assert device_fingerprint(hello) == device_fingerprint(dict(hello))
    db = tmp_path / "m.db"
    cs = tiny_ws.space.sample(2, seed=22)
    sweep(tiny_ws, "local", db, cs, phases=("prefill",))
    sweep(tiny_ws, "local", db, cs, phases=("prefill",), graph_opt="basic")
    store = Store(db)
    try:
        assert len(store.devices()) == 1
        assert {r["backend"] for r in store.measurement_rows()} == {"ort-cpu", "ort-cpu:opt-basic"}
    finally:
        store.close()


def test_two_sweeps_of_one_store_never_measure_a_cell_twice(tiny_ws, tmp_path) -> None:
    import threading

    db = tmp_path / "m.db"
    Store(db).close()
    cs = tiny_ws.space.sample(4, seed=23)
    results: list = []
    errors: list = []

    def one() -> None:
        try:
            results.append(sweep(tiny_ws, "local", db, cs, phases=("prefill", "decode")))
        except Exception as e:
            import traceback

            errors.append("".join(traceback.format_exception(e)))

    threads = [threading.Thread(target=one) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors, errors
    assert sum(r.measured for r in results) == 8
    with sqlite3.connect(db) as c:
        assert c.execute("SELECT COUNT(*) FROM measurements WHERE is_reference=0").fetchone()[0] == 8
        assert c.execute("SELECT COUNT(*) FROM jobs WHERE owner IS NOT NULL").fetchone()[0] == 0


class FailOnceTarget:
    """A local board whose first measurement of each sweep dies with a transient fault."""

    def __new__(cls, *a, **kw):  # type: ignore[no-untyped-def]
        from profiler.errors import ErrorClass, MeasureError
        from profiler.targets import LocalTarget

        class _T(LocalTarget):
            failed = False

            def call(self, verb, args=None, timeout=60.0):  # type: ignore[no-untyped-def]
                if verb == "measure" and not _T.failed:
                    _T.failed = True
                    raise MeasureError(ErrorClass.RUNTIME_ERROR, "injected")
                return super().call(verb, args, timeout)

        return _T(a[0], a[1])  # (host spec, timeouts); a local board needs no SSH settings


def test_retry_failed_gives_a_failed_job_its_attempts_again(tiny_ws, tmp_path) -> None:
    db = tmp_path / "m.db"
    cs = tiny_ws.space.sample(1, seed=24)
    sweep(tiny_ws, "local", db, cs, phases=("prefill",))
    with sqlite3.connect(db) as c:  # as left by an earlier sweep that used up its 3 attempts
        c.execute("DELETE FROM measurements")
        c.execute("UPDATE jobs SET status='failed', attempts=3, error_class='runtime_error'")
    s = sweep(tiny_ws, "local", db, cs, phases=("prefill",), retry_failed=True, target_cls=FailOnceTarget)
    assert s.measured == 1 and not s.failed and s.retries == 1


def test_a_larger_sub_network_measures_slower(tiny_ws, tmp_path) -> None:
    """The timings are of the graphs asked for: the full model against its smallest
    sub-network (one layer, one head, the fewest neurons), each phase, real timing on this CPU."""
    from subnets.config import LayerChoice, SubnetConfig

    full = tiny_ws.space.full()
    small = SubnetConfig(full.base_id, (LayerChoice(0, 1, 1, tiny_ws.space.neuron_choices()[0]),))
    db = tmp_path / "m.db"
    summary = sweep(tiny_ws, "local", db, [full, small], seq_lens=(64,), past_lens=(64,), threads=1,
                    timing={**FAST_TIMING, "min_time_s": 0.3, "max_time_s": 2.0})
    assert summary.measured == 4 and not summary.failed
    store = Store(db)
    try:
        med = {(r["subnet_hash"], r["phase"]): r["median_ms"] for r in store.measurement_rows()}
    finally:
        store.close()
    for phase in ("prefill", "decode"):
        assert med[(full.config_hash(), phase)] > 1.3 * med[(small.config_hash(), phase)], med


def test_a_sweep_measures_a_share_of_its_cells_twice(tiny_ws, tmp_path, capsys) -> None:
    """After its cells are done a sweep measures a share of them again (at least a few per
    phase), stored beside the measurements and never used as training rows; a rerun adds only
    what a larger plan asks for; the store's listing and the summary report the spread."""
    from edgenas.cli import main as edgenas_main

    db = tmp_path / "m.db"
    cs = configs(tiny_ws, 6, seed=5)
    first = sweep(tiny_ws, "local", db, cs[:4], repeat_share=0.5, repeat_min=1)
    assert first.measured == 8 and set(first.repeatability) == {"prefill", "decode"}
    assert all(r["n"] == 2 and r["sd_log_ratio"] >= 0 and 0 <= r["within_5pct"] <= 1
               for r in first.repeatability.values())
    again = sweep(tiny_ws, "local", db, cs[:4], repeat_share=0.5, repeat_min=1)
    assert again.measured == 0 and {r["n"] for r in again.repeatability.values()} == {2}
    more = sweep(tiny_ws, "local", db, cs, repeat_share=0.5, repeat_min=1)
    assert {r["n"] for r in more.repeatability.values()} == {3}
    store = Store(db)
    try:
        assert store.count("measurements") == 12 and len(store.repeat_pairs()) == 6
        assert len(list(store.measurement_rows())) == 12
    finally:
        store.close()
    assert edgenas_main(["measurements", "--db", str(db)]) == 0
    out = capsys.readouterr().out
    assert "re-measured" in out and "spread" in out
