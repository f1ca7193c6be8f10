"""Interleaved rounds: the schedule on its own (a synthetic board), then sweeps on the local
agent: every round stored as it finishes, a killed sweep resumed from its rounds, the
reference in every round, and cells under the load generator inside their intervals."""

from __future__ import annotations

import json
import math
import random
import sqlite3

import pytest

from profiler.errors import ErrorClass, MeasureError
from profiler.load_generator import BackgroundLoad, LoadSpec
from profiler.request import SweepRequest
from profiler.rounds import Cell, Drift, RoundsPlan, RoundsRun, level, pooled
from profiler.store import Store
from subnets.errors import ConfigError
from tests.helpers import sweep

BURST = {"min_time_s": 0.06, "max_time_s": 0.5, "min_runs": 3, "warmup_s": 0.0, "warmup_runs": 1}


def _run(plan: RoundsPlan, cells: list[Cell], refs: dict[str, Cell], noise: dict, fail: dict | None = None):
    """Rounds over a synthetic board: each cell's burst is its level times (1 + noise)."""
    rng = random.Random(0)
    orders, stored, done = [], [], []
    fail = dict(fail or {})

    def measure(cell: Cell, round_no: int) -> dict:
        orders.append((round_no, cell.key))
        if fail.get(cell.key):
            fail[cell.key] -= 1
            raise MeasureError(ErrorClass.RUNTIME_ERROR, "a transient fault")
        base = 10.0 + (hash(cell.key) % 7)
        return {"median_ms": base * (1 + rng.gauss(0, noise.get(cell.key, 0.001))), "raw_ms": [base]}

    run = RoundsRun(plan, "b1", measure, lambda c, r, res: stored.append((c.key, r)), done.append,
                    lambda c, e: c.faults < 2)
    run.run(cells, refs)
    return run, orders, stored, done


def test_rounds_shuffle_cells_with_the_reference_in_each_and_stop_each_cell_on_its_own() -> None:
    plan = RoundsPlan(min_rounds=3, max_rounds=6, target_rel_ci=0.02, batch_cells=4)
    cells = [Cell(i, "decode", "decode") for i in range(4)]
    ref = Cell(("reference", "decode"), "decode", "decode")
    run, orders, stored, done = _run(plan, cells, {"decode": ref}, noise={3: 0.2})
    by_round: dict[int, list] = {}
    for r, key in orders:
        by_round.setdefault(r, []).append(key)
    assert all(ref.key in keys for keys in by_round.values())  # the reference in every round
    assert len({tuple(k for k in keys if k in (0, 1, 2)) for r, keys in by_round.items() if r < 3}) > 1  # shuffled
    quiet = [c for c in cells if c.key != 3]
    assert all(c.stop == "converged" and len(c.medians) == 3 for c in quiet)
    noisy = cells[3]
    assert noisy.stop == "max_rounds" and len(noisy.medians) == 6  # never converged: capped, not looping
    out = pooled(noisy, run.drift, plan)
    assert out["unstable"] and out["median_rel_ci"] > 0.1 and not pooled(quiet[0], run.drift, plan)["unstable"]
    assert sorted(c.key for c in done) == [0, 1, 2, 3] and len(stored) == 3 * 3 + 6 + 6


def test_a_faulting_cell_tries_again_next_round_and_fails_when_it_runs_out() -> None:
    plan = RoundsPlan(min_rounds=2, max_rounds=4, batch_cells=2)
    cells = [Cell("again", "prefill", "prefill"), Cell("broken", "prefill", "prefill")]
    _, _, _, done = _run(plan, cells, {}, noise={}, fail={"again": 1, "broken": 99})
    assert cells[0].stop == "converged" and len(cells[0].medians) == 2
    assert cells[1].stop == "failed" and cells[1].faults == 2 and [c.key for c in done] == ["again"]


def test_a_spiked_round_barely_moves_the_level_and_drift_divides_out() -> None:
    mid, rel = level([10.0, 10.1, 9.9, 10.0, 14.0])
    assert mid == pytest.approx(10.0) and rel > 0.02  # the spike widens the interval, not the level
    low, low_rel = level([10.0, 10.1, 9.9, 10.0, 14.0], quantile=0.25)
    assert low == pytest.approx(10.0) and low_rel > rel  # a quartile is known less well than the median
    cell = Cell(1, "decode", "decode")
    for r, m in enumerate([10.0, 11.0, 12.0]):  # the board slows 10% a round, the reference with it
        cell.add(m, ("b", r), [m])
    drift = Drift({("decode", "b", r): 5.0 * (1 + 0.1 * r) for r in range(3)}, {"decode": 5.0})
    out = pooled(cell, drift, RoundsPlan(normalize=True))
    assert out["median_ms"] == pytest.approx(10.0, rel=1e-3) and out["raw_median_ms"] == pytest.approx(11.0)
    assert out["median_rel_ci"] < out["raw_rel_ci"]


def test_bad_round_settings_name_the_fix() -> None:
    for kw, fix in (({"rounds": 1}, "--rounds 2"), ({"rounds": 4, "max_rounds": 3}, "--max-rounds"),
                    ({"rounds": 3, "round_cells": 1}, "--round-cells 2"), ({"rounds": 3, "round_quantile": 1.0},
                                                                               "--round-quantile 0.5")):
        with pytest.raises(ConfigError) as e:
            SweepRequest(host="local", **kw)
        assert fix in e.value.fix
    with pytest.raises(ConfigError, match="paired"):
        SweepRequest(host="local", rounds=3, paired=True)


def _rows(db) -> tuple[list[dict], list[dict]]:
    with sqlite3.connect(db) as c:
        c.row_factory = sqlite3.Row
        rounds = [dict(r) for r in c.execute("SELECT * FROM rounds ORDER BY id")]
        meas = [dict(r) for r in c.execute("SELECT * FROM measurements WHERE is_reference=0 ORDER BY id")]
    return rounds, meas


def test_an_interleaved_sweep_stores_every_round_and_pools_them(tiny_ws, tmp_path) -> None:
    db = tmp_path / "m.db"
    configs = tiny_ws.space.sample(3, seed=5)
    plan = RoundsPlan(min_rounds=2, max_rounds=3, target_rel_ci=0.5, batch_cells=4)
    summary = sweep(tiny_ws, "local", db, configs, timing=BURST, rounds=plan, repeat_share=0.5, repeat_min=1)
    assert summary.measured == 6 and not summary.failed and set(summary.repeatability) == {"prefill", "decode"}
    rounds, meas = _rows(db)
    firsts = [r for r in rounds if r["job_id"] is not None and r["pass_no"] == 0]
    for m in meas:
        info = json.loads(m["settings"])["rounds"]
        mine = [r["median_ms"] for r in firsts if r["job_id"] == m["job_id"]]
        assert info["round_medians_ms"] == pytest.approx(mine, abs=1e-3) and 2 <= len(mine) <= 3
        assert m["median_ms"] == pytest.approx(info["raw_median_ms"])  # raw is the number unless asked
    refs = [r for r in rounds if r["job_id"] is None and r["pass_no"] == 0]
    batches = {r["round_batch"] for r in firsts}
    assert len(batches) == 2 and {r["round_batch"] for r in refs} == batches  # a reference in every batch's rounds
    assert any(r["pass_no"] == 1 for r in rounds)  # the repeat pass is interleaved too
    store = Store(db)
    try:
        assert any(p.schedule and p.schedule["min_rounds"] == 2 for p in store.protocols().values())
        assert len(store.repeat_pairs()) == summary.repeatability["prefill"]["n"] + summary.repeatability["decode"]["n"]
    finally:
        store.close()
    from profiler.merge import merge_stores

    for _ in range(2):  # merged stores keep every round once: a resumed cell and the drift go with them
        merge_stores([db], tmp_path / "merged.db")
    assert len(_rows(tmp_path / "merged.db")[0]) == len(rounds)


def test_a_sweep_killed_mid_batch_resumes_from_its_stored_rounds(tiny_ws, tmp_path) -> None:
    from profiler.hosts import resolve_host
    from profiler.sweep import Profiler, SweepSpec
    from profiler.targets import Timeouts, make_target

    db = tmp_path / "m.db"
    configs = tiny_ws.space.sample(2, seed=7)
    plan = RoundsPlan(min_rounds=3, max_rounds=3, batch_cells=4)
    spec = SweepSpec(seq_lens=(16,), past_lens=(16,), timing=BURST, reference_every=0, repeat_share=0.0,
                     repeat_min=0, rounds=plan)

    def stop_after_two(done: int, total: int, text: str) -> None:
        if text.startswith("rounds") and rounds_seen(db) >= 2 * 4:
            raise KeyboardInterrupt  # as a user's ^C lands mid-batch

    def rounds_seen(path) -> int:
        with sqlite3.connect(path) as c:
            return c.execute("SELECT COUNT(*) FROM rounds WHERE job_id IS NOT NULL").fetchone()[0]

    target = make_target(resolve_host("local"), Timeouts(connect=10, handshake=60, measure=60, upload_stall=20))
    store = Store(db)
    try:
        with pytest.raises(KeyboardInterrupt):
            Profiler(tiny_ws, target, store, spec, progress=stop_after_two).run(configs)
    finally:
        store.close()
    before, meas = _rows(db)
    assert not meas and len([r for r in before if r["job_id"] is not None]) == 8  # two rounds of four cells kept
    summary = sweep(tiny_ws, "local", db, configs, timing=BURST, rounds=plan)
    after, meas = _rows(db)
    assert summary.measured == 4 and len(meas) == 4
    assert len([r for r in after if r["job_id"] is not None]) == 12  # one more round each: the first two reused
    for m in meas:
        assert len(json.loads(m["settings"])["rounds"]["round_medians_ms"]) == 3


def test_under_load_interleaved_cells_keep_their_medians_inside_their_intervals(tiny_ws, tmp_path) -> None:
    """Each cell measured twice in interleaved rounds under the load generator: the second
    median lies inside the first's stated interval for most cells (a 95% interval of one
    measurement holds an independent second one about 83% of the time)."""
    db = tmp_path / "m.db"
    configs = tiny_ws.space.sample(4, seed=11)
    plan = RoundsPlan(min_rounds=3, max_rounds=6, target_rel_ci=0.03, batch_cells=8)
    with BackgroundLoad(LoadSpec(share=0.4, burst_s=0.3, seed=4)):
        sweep(tiny_ws, "local", db, configs, timing=BURST, rounds=plan, repeat_share=1.0, repeat_min=1)
    store = Store(db)
    try:
        rel = {r["job_id"]: r["median_rel_ci"] for r in store.measurement_rows()}
        pairs = store.repeat_pairs()
    finally:
        store.close()
    assert len(pairs) == 8
    inside = [abs(math.log(p["again_ms"] / p["first_ms"])) <= math.log1p(rel[p["job_id"]]) for p in pairs]
    assert sum(inside) >= len(inside) / 2


def test_verification_repeats_an_interleaved_protocol(tiny_ws) -> None:
    """Points verified on the device are measured as the predictor's data was: in rounds."""
    from types import SimpleNamespace

    from predictor.workload import Workload
    from profiler.protocol import Protocol
    from search.verify import verification_spec
    from tests.helpers import FAST_TIMING

    plan = RoundsPlan(min_rounds=3, max_rounds=5, normalize=True)
    record = Protocol(timing=dict(FAST_TIMING), schedule=plan.to_dict())
    measured = {"threads": 1, "backend": "ort-cpu", "protocol": record.digest, "protocol_record": record.to_dict()}
    objective = SimpleNamespace(workload=Workload.parse("128,4"), measured_as={"prefill": measured, "decode": measured})
    spec = verification_spec(objective, tiny_ws.space.full().config_hash())
    assert spec.rounds == plan
    assert spec.protocol("prefill", SimpleNamespace(opset=17, ir_version=8), None).schedule == plan.to_dict()
