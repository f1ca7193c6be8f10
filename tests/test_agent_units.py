"""The agent's parts, run on the host: timing protocol, statistics, telemetry parsers (on
captured text from real boards' tools), the ONNX version probe."""

from __future__ import annotations

import random

import onnx
import pytest

from device_agents.agent_onnxprobe import identity_model, probe
from device_agents.agent_telemetry import (
    classify_board,
    parse_jetson_clocks_show,
    parse_nvpmodel,
    parse_vcgencmd_clock,
    parse_vcgencmd_temp,
    parse_vcgencmd_throttled,
    read_cpus,
    read_thermal,
    throttle_reasons,
)
from device_agents.agent_timing import TimingPolicy, median_ci, run_protocol, summarize


class FakeClock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def test_protocol_stops_when_the_median_ci_is_tight() -> None:
    clock = FakeClock()
    rng = random.Random(0)
    calls = []

    def fn() -> None:
        calls.append(1)
        clock.t += 0.010 * (1 + 0.005 * rng.random())

    policy = TimingPolicy(warmup_runs=3, warmup_s=0.0, min_runs=10, min_time_s=0.5, max_time_s=10)
    times, reason = run_protocol(fn, policy, clock)
    assert reason == "converged"
    assert len(times) >= 10 and sum(times) >= 0.5
    assert len(calls) == len(times) + 3  # warm-up runs are not timed


def test_protocol_gives_up_at_the_time_cap_on_noise() -> None:
    clock = FakeClock()
    rng = random.Random(1)

    def fn() -> None:
        clock.t += 0.01 * rng.choice([1, 3, 10])

    times, reason = run_protocol(fn, TimingPolicy(warmup_runs=0, warmup_s=0, min_runs=5, min_time_s=0.1,
                                                  max_time_s=1.0, target_rel_ci=0.001), clock)
    assert reason == "time_cap"
    s = summarize(times)
    assert s["unstable"] and s["cov"] > 0.05


def test_summary_statistics() -> None:
    s = summarize([0.001 * x for x in range(1, 101)])
    assert s["n"] == 100
    assert abs(s["median_ms"] - 50.5) < 1e-9
    assert abs(s["mean_ms"] - 50.5) < 1e-9
    assert abs(s["p90_ms"] - 90.1) < 1e-9
    assert s["median_ci_low_ms"] < 50.5 < s["median_ci_high_ms"]
    lo, hi = median_ci(sorted(range(1, 101)))
    assert (lo, hi) == (40, 61)  # ranks n/2 -+ 1.96 sqrt(n)/2 for n = 100


def test_median_ci_covers_the_true_median_about_95_percent() -> None:
    rng = random.Random(2)
    hits = 0
    for _ in range(400):
        xs = sorted(rng.expovariate(1.0) for _ in range(50))
        lo, hi = median_ci(xs)
        hits += lo <= 0.6931 <= hi
    assert 0.92 <= hits / 400 <= 0.99


def test_timing_policy_rejects_unknown_settings() -> None:
    import pytest

    with pytest.raises(ValueError, match="unknown timing settings: bogus"):
        TimingPolicy.from_dict({"bogus": 1})


# --- captured tool output -----------------------------------------------------------------
JETSON_CLOCKS_SHOW = """SOC family:tegra234  Machine:NVIDIA Jetson AGX Orin Developer Kit
Online CPUs: 0-11
cpu0: Online=1 Governor=schedutil MinFreq=729600 MaxFreq=2201600 CurrentFreq=1420800 IdleStates: WFI=1 c7=1
cpu1: Online=1 Governor=schedutil MinFreq=729600 MaxFreq=2201600 CurrentFreq=729600 IdleStates: WFI=1 c7=1
cpu2: Online=0 Governor=schedutil MinFreq=729600 MaxFreq=2201600 CurrentFreq=729600 IdleStates: WFI=1 c7=1
GPU MinFreq=306000000 MaxFreq=1300500000 CurrentFreq=306000000
EMC MinFreq=204000000 MaxFreq=3199000000 CurrentFreq=3199000000 FreqOverride=0
DLA0_CORE:  Online=1 MinFreq=0 MaxFreq=1600000000 CurrentFreq=1600000000
PVA0_VPS0: Online=1 MinFreq=0 MaxFreq=1152000000 CurrentFreq=1152000000
FAN Dynamic Speed control=active hwmon1_pwm=0
NV Power Mode: MAXN
"""

JETSON_CLOCKS_LOCKED = """SOC family:tegra210  Machine:NVIDIA Jetson Nano Developer Kit
Online CPUs: 0-3
cpu0: Online=1 Governor=schedutil MinFreq=1479000 MaxFreq=1479000 CurrentFreq=1479000 IdleStates: WFI=0 c7=0
cpu1: Online=1 Governor=schedutil MinFreq=1479000 MaxFreq=1479000 CurrentFreq=1479000 IdleStates: WFI=0 c7=0
GPU MinFreq=921600000 MaxFreq=921600000 CurrentFreq=921600000
EMC MinFreq=204000000 MaxFreq=1600000000 CurrentFreq=1600000000 FreqOverride=1
Fan: PWM=255
NV Power Mode: MAXN
"""


def test_jetson_clocks_show_parsing() -> None:
    r = parse_jetson_clocks_show(JETSON_CLOCKS_SHOW)
    assert r["power_mode"] == "MAXN"
    assert r["cpus"]["cpu0"] == {"online": True, "governor": "schedutil", "min_hz": 729600, "max_hz": 2201600, "cur_hz": 1420800}
    assert not r["cpus"]["cpu2"]["online"]
    assert r["units"]["GPU"]["max_hz"] == 1300500000 and r["units"]["EMC"]["cur_hz"] == 3199000000
    assert r["units"]["DLA0_CORE"]["cur_hz"] == 1600000000
    assert r["clocks_locked"] is False
    locked = parse_jetson_clocks_show(JETSON_CLOCKS_LOCKED)
    assert locked["units"]["GPU"]["cur_hz"] == 921600000
    # EMC min stays below max even when jetson_clocks locked it (FreqOverride=1): not locked by our rule
    assert locked["clocks_locked"] is False
    assert parse_jetson_clocks_show("") is None


def test_nvpmodel_parsing() -> None:
    assert parse_nvpmodel("NV Power Mode: MAXN\n0\n") == {"mode_name": "MAXN", "mode_id": 0}
    assert parse_nvpmodel("NVPM WARN: fan mode is not set!\nNV Power Mode: 15W\n2\n") == {"mode_name": "15W", "mode_id": 2}
    assert parse_nvpmodel("") is None


def test_vcgencmd_parsing() -> None:
    t = parse_vcgencmd_throttled("throttled=0x50005\n")
    assert t["raw"] == 0x50005 and t["now"]
    assert t["flags"] == ["under_voltage", "throttled", "under_voltage_occurred", "throttled_occurred"]
    assert parse_vcgencmd_throttled("throttled=0x0")["flags"] == []
    assert parse_vcgencmd_temp("temp=47.2'C\n") == 47.2
    assert parse_vcgencmd_clock("frequency(48)=1500398464\n") == 1500.398464
    assert parse_vcgencmd_throttled("VCHI initialization failed") is None


def test_throttle_reasons() -> None:
    ok = {"rpi": {"throttled": parse_vcgencmd_throttled("throttled=0x0")}, "cpu": {"cpu0": {"max_mhz": 1500.0}}}
    assert throttle_reasons(ok, ok) == []
    hot = {"rpi": {"throttled": parse_vcgencmd_throttled("throttled=0x80008")}, "cpu": {"cpu0": {"max_mhz": 1000.0}}}
    reasons = throttle_reasons(ok, hot)
    assert any("soft_temp_limit" in r for r in reasons)
    assert any("occurred during the cell" in r for r in reasons)
    assert any("cpu0 frequency cap fell 1500 -> 1000 MHz" in r for r in reasons)
    assert throttle_reasons({}, {}) == []


def test_board_classification() -> None:
    assert classify_board("Raspberry Pi 4 Model B Rev 1.4\x00", False, "aarch64") == "raspberry-pi"
    assert classify_board("NVIDIA Jetson Orin Nano Developer Kit\x00", False, "aarch64") == "jetson"
    assert classify_board(None, True, "aarch64") == "jetson"
    assert classify_board(None, False, "x86_64") == "x86"


def test_sysfs_readers_on_a_fake_tree(tmp_path) -> None:
    cpu = tmp_path / "cpu" / "cpu0" / "cpufreq"
    cpu.mkdir(parents=True)
    for name, v in (("scaling_cur_freq", "1500000"), ("scaling_min_freq", "600000"), ("scaling_max_freq", "1500000"),
                    ("cpuinfo_max_freq", "1800000"), ("scaling_governor", "ondemand")):
        (cpu / name).write_text(v + "\n")
    (tmp_path / "cpu" / "cpu1").mkdir()  # no cpufreq: skipped, not invented
    assert read_cpus(str(tmp_path / "cpu")) == {"cpu0": {"cur_mhz": 1500.0, "min_mhz": 600.0, "max_mhz": 1500.0,
                                                        "hw_max_mhz": 1800.0, "governor": "ondemand"}}
    z = tmp_path / "thermal" / "thermal_zone0"
    z.mkdir(parents=True)
    (z / "temp").write_text("48312\n")
    (z / "type").write_text("cpu-thermal\n")
    assert read_thermal(str(tmp_path / "thermal")) == {"cpu-thermal": 48.312}
    assert read_cpus(str(tmp_path / "none")) is None and read_thermal(str(tmp_path / "none")) is None


def test_onnx_probe_models_are_valid_onnx() -> None:
    import onnxruntime as ort

    m = onnx.load_from_string(identity_model(17, 8))
    onnx.checker.check_model(m)
    assert m.opset_import[0].version == 17 and m.ir_version == 8
    max_opset, max_ir = probe(ort)
    assert max_opset is not None and max_opset >= 17 and max_ir >= 8


def test_backend_choice_and_board_warnings() -> None:
    from profiler.sweep import board_warnings, choose_backend

    assert choose_backend({"onnxruntime": {"providers": ["CPUExecutionProvider"]}}) == "ort-cpu"
    assert choose_backend({"onnxruntime": {"providers": ["CUDAExecutionProvider", "CPUExecutionProvider"]}}) == "ort-cuda"
    assert choose_backend({"onnxruntime": {"providers": ["TensorrtExecutionProvider", "CUDAExecutionProvider"]}}) == "ort-trt"
    unlocked = {"telemetry": {"jetson": {"nvpmodel": parse_nvpmodel("NV Power Mode: 15W\n2\n"),
                                         "clocks": parse_jetson_clocks_show(JETSON_CLOCKS_SHOW)}}}
    (w,) = board_warnings(unlocked)
    assert "Jetson clocks are not locked (power mode 15W)" in w and "jetson_clocks" in w
    assert board_warnings({"telemetry": {"cpu": {"cpu0": {"governor": "performance"}}}}) == []
    assert "powersave" in board_warnings({"telemetry": {"cpu": {"cpu0": {"governor": "powersave"}}}})[0]


def test_a_few_outliers_do_not_make_a_cell_unstable() -> None:
    steady = [0.010 * (1 + 0.002 * (i % 5)) for i in range(200)]
    spiky = [*steady[:196], 0.1, 0.12, 0.09, 0.11]  # four scheduler hiccups
    s = summarize(spiky)
    assert s["cov"] > 0.10 and not s["unstable"]
    assert s["robust_cov"] < 0.01
    noisy = [0.010 * (1 + 0.6 * ((i * 7919) % 13) / 13) for i in range(200)]  # spread through and through
    assert summarize(noisy)["unstable"]


def _serve_one(agent: object, request: dict) -> dict:
    import io
    import json

    from device_agents.agent import serve

    out = io.StringIO()
    serve(agent, io.StringIO(json.dumps(request) + "\n"), out)
    return json.loads(out.getvalue())


def test_a_full_disk_is_its_own_error_class(tmp_path, monkeypatch) -> None:
    import errno

    from device_agents.agent import Agent

    agent = Agent(str(tmp_path))

    def full(args: dict) -> dict:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(agent, "materialize", full)
    resp = _serve_one(agent, {"id": 1, "verb": "materialize", "args": {"key": "abc"}})
    assert resp["ok"] is False and resp["error"]["class"] == "disk_full"
    assert "disk is full" in resp["error"]["message"] and str(tmp_path) in resp["error"]["message"]
    other = _serve_one(agent, {"id": 2, "verb": "evict", "args": {"keys": ["../etc"]}})
    assert other["ok"] is False and other["error"]["class"] == "load_error"  # keys are validated


def test_evict_deletes_models_and_frees_their_bytes(tmp_path) -> None:
    from device_agents.agent import Agent

    agent = Agent(str(tmp_path))
    for key in ("aaa", "bbb"):
        d = tmp_path / "models" / key
        d.mkdir(parents=True)
        (d / "weights.bin").write_bytes(b"\1" * 4096)
        (d / ".verified").write_text("")
    resp = _serve_one(agent, {"id": 1, "verb": "evict", "args": {"keys": ["aaa", "zzz"]}})
    assert resp["ok"] and resp["result"]["evicted"] == 1 and resp["result"]["freed_bytes"] >= 4096
    assert agent.models({})["models"] == ["bbb"]


def test_paired_protocol_times_both_models_alternately() -> None:
    from device_agents.agent_timing import run_paired

    clock = FakeClock()
    calls: list[str] = []

    def fn() -> None:
        calls.append("a")
        clock.t += 0.010

    def companion() -> None:
        calls.append("b")
        clock.t += 0.040

    times, other, ratios, reason = run_paired(fn, companion, TimingPolicy(warmup_runs=2, warmup_s=0.0, min_runs=10,
                                                                          min_time_s=1.0, max_time_s=10), clock=clock)
    assert reason == "converged" and len(times) == 4 * len(other) and len(times) >= 10
    # warm-up alternates; then blocks of k = 40 ms / 10 ms = 4 runs per companion run, so the
    # fast model gets as much timed time as its companion
    assert "".join(calls).startswith("ababaaaab") and "bb" not in "".join(calls)
    assert all(abs(r - 0.25) < 1e-9 for r in ratios)


def test_session_split_keeps_the_cells_time() -> None:
    p = TimingPolicy(min_time_s=3.0, max_time_s=12.0, min_runs=10, sessions=3)
    each = p.per_session()
    assert (each.min_time_s, each.max_time_s, each.min_runs, each.sessions) == (1.0, 4.0, 3, 1)
    assert TimingPolicy.from_dict(p.to_dict()).sessions == 3
    assert TimingPolicy(sessions=0).sessions == 1


def test_a_cache_wiped_while_weights_are_written_is_a_load_error(tmp_path, monkeypatch) -> None:
    """The profiler answers load_error by sending the model again; a wipe between writing and
    renaming the weights must say so, not 'unknown'."""
    import json
    import shutil

    from device_agents.agent import Agent

    agent = Agent(str(tmp_path))
    d = tmp_path / "models" / "abc"
    d.mkdir(parents=True)
    (d / "export.json").write_text(json.dumps({"weights_file": "weights.bin", "weights_bytes": 16, "tensors": []}))

    def wiped(np, rng, manifest, tmp) -> None:
        with open(tmp, "wb") as f:
            f.write(b"\0" * 16)
        shutil.rmtree(d)

    monkeypatch.setattr(agent, "_write_weights", wiped)
    resp = _serve_one(agent, {"id": 1, "verb": "materialize", "args": {"key": "abc"}})
    assert resp["ok"] is False and resp["error"]["class"] == "load_error"
    assert "vanished" in resp["error"]["message"]


def test_a_reconnecting_agent_ends_its_orphan_and_spares_other_sweeps(tmp_path) -> None:
    """After a lost link the old agent may still be timing a cell; the next agent started
    with the same token ends it before answering, and reports (never kills) other tokens'."""
    import json
    import subprocess
    import sys

    from device_agents import AGENT_DIR

    def start(token: str) -> tuple[subprocess.Popen, dict]:
        p = subprocess.Popen([sys.executable, str(AGENT_DIR / "agent.py"), "--root", str(tmp_path), "--token", token],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        assert p.stdin is not None and p.stdout is not None
        p.stdin.write(json.dumps({"id": 1, "verb": "hello", "args": {}}) + "\n")
        p.stdin.flush()
        return p, json.loads(p.stdout.readline())["result"]

    orphan, h1 = start("sweep-a")
    other, _ = start("sweep-b")
    try:
        new, h2 = start("sweep-a")
        try:
            assert h2["ended_orphan"] == h1["pid"] == orphan.pid
            assert orphan.wait(timeout=10) != 0  # killed, not exited
            assert h2["other_agents"] == [other.pid] and other.poll() is None
        finally:
            new.kill()
    finally:
        for p in (orphan, other):
            p.kill()
            p.wait()


class _Board:
    """A clock whose time moves only when a model runs, on a board whose load (other
    tenants, heat) changes between timing blocks and slows both models alike."""

    def __init__(self) -> None:
        self.now = 0.0
        self.load = 1.0
        self.rng = random.Random(1)

    def clock(self) -> float:
        return self.now

    def run(self, ms: float, ends_block: bool = False) -> None:
        self.now += ms * self.load / 1000.0
        if ends_block:
            self.load = self.rng.uniform(0.5, 2.0)


def test_paired_timing_converges_on_the_ratio_it_reports() -> None:
    """The load swings both models by 4x, so the raw times never settle; their ratio does,
    and the ratio is the number a paired cell gives the predictor."""
    from device_agents.agent_timing import run_paired

    board = _Board()
    policy = TimingPolicy(warmup_runs=2, warmup_s=0.0, min_runs=10, min_time_s=0.05, max_time_s=5.0,
                          target_rel_ci=0.005)
    times, _, ratios, reason = run_paired(lambda: board.run(1.0), lambda: board.run(10.0, ends_block=True), policy,
                                          clock=board.clock)
    assert reason == "converged" and len(times) < 200
    assert max(times) / min(times) > 2.0 and max(ratios) / min(ratios) < 1.0001


def test_the_stopping_rule_does_not_resort_every_run(monkeypatch) -> None:
    """Sorting all runs after each one is O(n^2 log n); the stopping rule keeps them sorted."""
    import device_agents.agent_timing as at

    calls = []
    monkeypatch.setattr(at, "sorted", lambda x, **kw: calls.append(1) or __builtins__["sorted"](x, **kw), raising=False)
    board = _Board()
    policy = TimingPolicy(warmup_runs=1, warmup_s=0.0, min_runs=10, min_time_s=0.5, max_time_s=2.0, target_rel_ci=1e-9)
    times, reason = run_protocol(lambda: board.run(1.0 + board.rng.random()), policy, clock=board.clock)
    assert reason == "time_cap" and len(times) > 500
    assert len(calls) <= 2


def test_a_cell_over_sessions_states_the_spread_between_sessions() -> None:
    """Three sessions whose levels differ by 6%: the runs pooled look tight (CI < 1%), but the
    cell's level is only known to the sessions' spread, and that is what it reports."""
    import random
    import sys

    from device_agents import AGENT_DIR
    from device_agents.agent_timing import summarize

    sys.path.insert(0, str(AGENT_DIR))
    try:
        import agent
    finally:
        sys.path.remove(str(AGENT_DIR))
    rng = random.Random(0)
    runs = [lvl * (1 + rng.gauss(0, 0.002)) / 1000.0 for lvl in (10.0, 10.6, 9.4) for _ in range(300)]
    pooled = summarize(runs)
    assert pooled["median_rel_ci"] < 0.01
    per_session = [{"median_ms": m, "runs": 300} for m in (10.0, 10.6, 9.4)]
    level = agent.Agent._level(TimingPolicy(sessions=3), "converged", pooled, [], [], per_session)
    assert level["median_ms"] == pytest.approx(10.0)
    assert level["median_rel_ci"] > 0.1 and level["unstable"]  # t(2) * sd / sqrt(3): ±15%


def test_a_cell_over_fresh_sessions_holds_one_session_in_memory(tiny_ws, tmp_path, monkeypatch) -> None:
    """Each fresh session of a multi-session cell loads after the previous one (and the
    LRU's other model) is released: on a small board the old order ran out of memory falsely."""
    import shutil
    import weakref

    from device_agents import AGENT_DIR
    from export.onnx_graphs import ExportOptions, export_subnet

    monkeypatch.syspath_prepend(str(AGENT_DIR))
    import agent
    import agent_runtime

    root = tmp_path / "board"
    (root / "models").mkdir(parents=True)
    keys = []
    for c in tiny_ws.space.sample(2, seed=3):
        ex = export_subnet(tiny_ws.weights(c), tmp_path / "exports", ExportOptions(weights="none"))
        shutil.copytree(ex.folder, root / "models" / ex.key)
        (root / "models" / ex.key / ".verified").write_text("{}")
        keys.append(ex.key)
    live: weakref.WeakSet = weakref.WeakSet()
    seen: list[int] = []
    init = agent_runtime.OrtSession.__init__

    def counting_init(self, *a, **kw):  # type: ignore[no-untyped-def]
        seen.append(len(live))
        init(self, *a, **kw)
        live.add(self)

    monkeypatch.setattr(agent_runtime.OrtSession, "__init__", counting_init)
    board = agent.Agent(str(root))
    timing = {"min_time_s": 0.01, "max_time_s": 0.1, "min_runs": 3, "warmup_s": 0.0, "warmup_runs": 1}
    board.measure({"key": keys[0], "phase": "prefill", "seq_len": 8, "timing": timing})
    seen.clear()
    r = board.measure({"key": keys[1], "phase": "prefill", "seq_len": 8, "timing": dict(timing, sessions=3)})
    assert len(r["sessions"]) == 3
    assert seen == [1, 0, 0]  # the first load beside the LRU's other model; fresh ones alone
