"""The load generator: a share of one core in bursts, started and ended by pid; and a sweep
that runs under it, with a target it can never reach, still finishes and flags its cells."""

from __future__ import annotations

import pytest

from profiler.load_generator import BackgroundLoad, LoadSpec, main, run_load
from profiler.store import Store
from tests.helpers import sweep


def test_the_load_takes_about_its_share_in_bursts() -> None:
    out = run_load(LoadSpec(share=0.5, burst_s=0.1, seed=1), duration_s=1.5)
    # busy spells are timed exactly; idle ones may overshoot on a busy machine: a wide band
    assert 0.25 <= out["busy_share"] <= 0.65 and out["steps"] > 0


def test_bad_load_settings_name_the_fix(capsys) -> None:
    for kw, fix in (({"share": 1.5}, "--share 0.4"), ({"burst_s": 0.0}, "--burst 2"), ({"jitter": 1.0}, "--jitter")):
        with pytest.raises(ValueError, match=fix):
            LoadSpec(**kw)
    with pytest.raises(SystemExit):
        main(["--share", "0"])
    assert "--share 0.4" in capsys.readouterr().err


def test_background_load_is_a_child_ended_by_its_pid() -> None:
    with BackgroundLoad(LoadSpec(share=0.3, burst_s=0.2)) as load:
        proc = load.proc
        assert proc is not None and proc.poll() is None
    assert proc.poll() is not None and load.proc is None
    with BackgroundLoad(None) as quiet:  # the quiet condition runs nothing
        assert quiet.proc is None


def test_a_sweep_under_load_that_never_converges_flags_its_cells_and_finishes(tiny_ws, tmp_path) -> None:
    """A target no cell can meet (0.01% of the median, a short cap): every cell stops at its
    cap, is stored with its interval and flagged unstable, and the sweep goes on to the end."""
    configs = tiny_ws.space.sample(2, seed=3)
    timing = {"min_time_s": 0.05, "max_time_s": 0.2, "min_runs": 5, "warmup_s": 0.0, "warmup_runs": 1,
              "target_rel_ci": 0.0001}
    db = tmp_path / "m.db"
    with BackgroundLoad(LoadSpec(share=0.4, burst_s=0.2, seed=2)):
        summary = sweep(tiny_ws, "local", db, configs, phases=("decode",), timing=timing)
    assert summary.measured == len(configs) and not summary.failed
    store = Store(db)
    try:
        rows = list(store.measurement_rows(device=summary.fingerprint, phase="decode"))
    finally:
        store.close()
    assert len(rows) == len(configs)
    for r in rows:
        assert r["unstable"] and r["stop_reason"] != "converged" and r["median_rel_ci"] > 0.0001
