"""The recommendation rule: the admissible deployment of least perplexity, set aside when the
device measures it over the budget; the obvious alternatives beside it; the nearest
candidates and what to relax when nothing is admissible."""

from __future__ import annotations

import math

from search.recommendation import FULL, SEARCHED, candidates, recommend, size_mb
from subnets.config import SubnetConfig


def _point(ws, neurons: int, ppl: float, ms: float, precision: str, upper: float | None = None) -> dict:
    d = ws.space.dims
    c = SubnetConfig.uniform(ws.space.base_id, range(d.num_layers), d.num_kv_heads, d.heads_per_group, neurons)
    return {"config": c.to_dict(), "config_hash": c.config_hash(), "summary": c.summary(), "precision": precision,
            "perplexity": ppl, "latency_ms": ms, "upper_ms": upper if upper is not None else ms * 1.05}


def _pool(ws):
    n = ws.space.dims.intermediate_size
    front = [_point(ws, n - 16, 30.0, 8.0, "int8"), _point(ws, n - 32, 40.0, 6.0, "int4")]
    baselines = {f"{FULL} @ fp32": [_point(ws, n, 20.0, 20.0, "fp32")],
                 f"{FULL} @ int8": [_point(ws, n, 21.0, 12.0, "int8")],
                 "uniform width @ int8": [_point(ws, n - 16, 30.0, 8.0, "int8"), _point(ws, n - 48, 60.0, 5.0, "int8")]}
    return candidates(front, baselines, ws.space.dims, "fp32")


def test_a_config_at_a_precision_is_one_candidate_named_as_a_user_would(tiny_ws) -> None:
    pool = _pool(tiny_ws)
    # the searched int8 point is the uniform-width baseline: one candidate, its obvious name
    assert len(pool) == 5
    assert sorted(c.family for c in pool) == [FULL, FULL, SEARCHED, "uniform width", "uniform width"]
    full = next(c for c in pool if c.family == FULL and c.precision == "fp32")
    assert size_mb(SubnetConfig.from_dict(full.config), tiny_ws.space.dims, "int8") < full.size_mb


def test_the_best_admissible_deployment_is_recommended_and_measured(tiny_ws) -> None:
    measured = []

    def measure(c):
        measured.append((c.precision, SubnetConfig.from_dict(c.config).config_hash()))
        return c.predicted_ms, True

    rec = recommend(_pool(tiny_ws), 10.0, math.inf, 20.0, measure)
    assert rec.chosen is not None and rec.chosen.perplexity == 30.0 and rec.chosen.meets_budget
    assert measured[0] == ("int8", SubnetConfig.from_dict(rec.chosen.config).config_hash())
    labels = {a.label: a for a in rec.alternatives}
    # the full model at each precision is shown, over the budget, unmeasured
    assert labels[f"{FULL} @ fp32"].measured_ms is None and labels[f"{FULL} @ int8"].upper_ms > 10.0
    assert labels[f"{FULL} @ fp32"].ppl_gain is None  # better, but not within the budget: no gain to state
    assert rec.to_dict()["chosen"]["runtime"] == "onnxruntime"


def test_a_recommendation_the_device_measures_over_budget_is_set_aside(tiny_ws) -> None:
    def measure(c):
        ms = 11.0 if c.perplexity == 30.0 else c.predicted_ms
        return ms, ms <= 10.0

    rec = recommend(_pool(tiny_ws), 10.0, math.inf, 20.0, measure)
    assert rec.chosen.perplexity == 40.0 and rec.chosen.meets_budget
    assert [r.perplexity for r in rec.rejected] == [30.0]


def test_impossible_limits_name_the_nearest_candidates_and_what_to_relax(tiny_ws) -> None:
    rec = recommend(_pool(tiny_ws), 4.0, 25.0, 20.0, None)
    assert rec.chosen is None and rec.nearest
    assert "latency budget of" in rec.relax and "now 4.0" in rec.relax
    assert rec.to_dict()["chosen"] is None


class _Line:
    """A deployment whose workload latency is linear in the weights kept (a stand-in for the
    predictors of two GGUF types: the mix plan reads only their predictions)."""

    def __init__(self, precision: str, ms_per_m: float) -> None:
        self.precision, self.ms_per_m = precision, ms_per_m
        self.objective = self

    def predict_both(self, batch):
        import numpy as np

        n = np.asarray(batch.neurons.sum(1), dtype=float) / 1e3
        return n * self.ms_per_m, n * self.ms_per_m * 1.1


def test_a_mix_plan_fits_between_its_two_types(tiny64) -> None:
    """Between the uniform types' bounds, the mix keeps the most sensitive groups high and
    its bound, interpolated by the share of weights kept high, fits the budget."""
    from search.mix_deployments import plan_mix

    full = tiny64.space.full()
    high, low = _Line("q8_0", 2.0), _Line("q4_0", 1.0)
    n = sum(lc.neurons for lc in full.layers) / 1e3
    assert plan_mix(tiny64, full, high, low, 2.5 * n) is None  # the high type fits: no mix needed
    assert plan_mix(tiny64, full, high, low, 0.5 * n) is None  # not even the low type fits
    planned = plan_mix(tiny64, full, high, low, 1.6 * n)
    assert planned is not None and 0 < planned.high_share < 1
    assert planned.upper_ms <= 1.6 * n + 1e-9 and planned.predicted_ms < planned.upper_ms
    kinds = {planned.mix.head, *planned.mix.attention, *planned.mix.mlp}
    assert kinds == {"q8_0", "q4_0"}


def test_the_full_models_mix_is_a_candidate_between_two_types(tiny64) -> None:
    """The main job's mix candidate: the full model between the two GGUF deployments whose
    bounds straddle the budget, its types named higher first, its quality judged on the mix."""
    from search.mix_deployments import mix_choices
    from search.recommendation import MIX

    n = sum(lc.neurons for lc in tiny64.space.full().layers) / 1e3
    deps = {"q4_0": _Line("q4_0", 1.0), "q8_0": _Line("q8_0", 2.0)}
    choices = mix_choices(tiny64, deps, 1.6 * n)
    # one mix per margin of the budget (a distinct one each), the first planned within the whole budget
    assert 1 <= len(choices) <= 3 and len({str(c.mix) for c in choices}) == len(choices)
    for choice in choices:
        assert choice.family == MIX and choice.precision == "q8_0+q4_0" and choice.runtime == "llama.cpp"
        assert choice.upper_ms <= 1.6 * n + 1e-9 and math.isfinite(choice.perplexity)
    assert choices[0].upper_ms > choices[-1].upper_ms or len(choices) == 1
    assert mix_choices(tiny64, deps, 3.0 * n) == []  # uniform q8_0 fits: no mix


def test_after_a_miss_candidates_the_device_would_run_too_slow_are_passed_over() -> None:
    """The device ran the first choice 16% slower than predicted: the next, predicted within
    the budget by less than that, is not measured; the one after it is, and meets it."""
    from search.recommendation import Choice

    def choice(ppl: float, ms: float) -> Choice:
        return Choice(SEARCHED, f"{ppl}", "q4_0", {}, ppl, ms, ms, 1.0)

    pool = [choice(20.0, 9.5), choice(22.0, 9.0), choice(25.0, 8.0)]
    measured = []

    def measure(c):
        measured.append(c.perplexity)
        ms = c.predicted_ms * 1.16
        return ms, ms <= 10.0

    rec = recommend(pool, 10.0, math.inf, 18.0, measure)
    assert measured[:2] == [20.0, 25.0] and rec.chosen.perplexity == 25.0 and rec.chosen.meets_budget
    assert [r.perplexity for r in rec.rejected] == [20.0]


def test_onnxruntime_mixes_pair_the_types_on_its_front(tiny64) -> None:
    """Per runtime, mixes pair the types adjacent on the full model's own front (bound x
    perplexity): a type slower and worse than another is no end of a mix. An onnxruntime mix
    is a candidate like llama.cpp's; a known candidate within the budget as good as a pair's
    high type leaves that pair unplanned."""
    from search.mix_deployments import mix_choices, mix_pairs
    from search.recommendation import Choice

    full = tiny64.space.full()
    n = sum(lc.neurons for lc in full.layers) / 1e3
    deps = {"fp32": _Line("fp32", 3.0), "int8": _Line("int8", 1.6), "int4": _Line("int4", 1.0),
            "q8_0": _Line("q8_0", 2.0), "q4_0": _Line("q4_0", 1.2)}
    pairs = mix_pairs(tiny64, deps, full)
    assert {(h.precision, lo.precision) for h, lo, _ in pairs} >= {("q8_0", "q4_0")}
    for high, low, _ in pairs:
        assert (high.precision in ("q8_0", "q4_0")) == (low.precision in ("q8_0", "q4_0"))  # one runtime
        assert high.ms_per_m > low.ms_per_m
    ort = {p: d for p, d in deps.items() if p in ("fp32", "int8", "int4")}
    choices = mix_choices(tiny64, ort, 1.4 * n, margins=(1.0,))  # above int4's bound, below the others'
    assert choices and all(c.runtime == "onnxruntime" and c.upper_ms <= 1.4 * n + 1e-9 for c in choices)
    assert {c.precision for c in choices} <= {"fp32+int8", "fp32+int4", "int8+int4"}
    good = Choice("full model", "full", "fp32", full.to_dict(), 1.0, n, n, 1.0)
    assert mix_choices(tiny64, ort, 1.4 * n, margins=(1.0,), known=[good]) == []
