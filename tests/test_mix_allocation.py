"""Per-group precision sensitivity (measured once, cached, resumable) and the mixed-integer
allocation of weight types under a byte budget."""

from __future__ import annotations

import math

import pytest

from search.mix_allocation import allocate, greedy, group_params, mix_bytes
from search.sensitivity import HEAD, Sensitivity, groups_of, measure_sensitivity
from subnets.errors import ConfigError


def synthetic(costs: dict[str, float], layers: int = 3) -> Sensitivity:
    """A sensitivity whose every group costs ``costs[g]`` log-perplexity at q4_0."""
    base = 20.0
    ppl = {g: {"q4_0": base * math.exp(costs.get(g, 0.01))} for g in groups_of(layers)}
    return Sensitivity("llama.cpp", "q8_0", ("q4_0",), {"layers": [None] * layers}, "q", base, ppl)


def test_the_allocation_keeps_the_most_sensitive_groups_high_within_the_budget() -> None:
    params = {g: 1000 for g in groups_of(3)}
    sens = synthetic({"mlp.2": 0.5, "attn.0": 0.3, "mlp.0": 0.2, HEAD: 0.05})
    hi, lo = 34 / 32, 18 / 32
    # room for exactly two groups at q8_0, the rest at q4_0
    budget = 1000 * (2 * hi + 5 * lo) + 1
    mix = allocate(sens, params, budget)
    assert mix.mlp[2] == "q8_0" and mix.attention[0] == "q8_0"
    assert sorted([mix.head, *mix.attention, *mix.mlp]).count("q8_0") == 2
    assert mix_bytes(mix, params) <= budget
    assert allocate(sens, params, 1e9).uniform_type() == "q8_0"  # everything fits: nothing lost
    assert allocate(sens, params, 7000 * lo + 1).uniform_type() == "q4_0"
    with pytest.raises(ConfigError, match="below the lightest mix"):
        allocate(sens, params, 7000 * lo - 100)
    # the hand rule: head high, the k most sensitive groups high
    g = greedy(sens, "q4_0", keep=1)
    assert g.head == "q8_0" and g.mlp[2] == "q8_0" and g.attention[0] == "q4_0"


def test_sensitivity_is_measured_once_and_resumes(tiny_ws) -> None:
    cfg = tiny_ws.space.full()
    calls = []
    sens = measure_sensitivity(tiny_ws, cfg, "onnxruntime", "fp32", ("int4",), progress=lambda n, t: calls.append(n))
    groups = groups_of(len(cfg.layers))
    assert len(calls) == len(groups) and HEAD in sens.perplexity  # the LM head too (a quantized copy)
    assert sens.base_perplexity == pytest.approx(tiny_ws.perplexity(cfg))  # fp32 everywhere: the workspace's own
    assert all(sens.cost(g, "int4") >= 0 for g in sens.perplexity)
    calls.clear()
    again = measure_sensitivity(tiny_ws, cfg, "onnxruntime", "fp32", ("int4",), progress=lambda n, t: calls.append(n))
    assert not calls and again.perplexity == sens.perplexity  # from the cache, nothing evaluated
    params = group_params(tiny_ws.weights(cfg))
    mid = allocate(again, params, 0.5 * (mix_bytes(greedy(again, "int4", 0, head_high=False), params)
                                          + mix_bytes(greedy(again, "int4", len(groups)), params)))
    assert mid.uniform_type() is None and mid.runtime == "onnxruntime"


def test_the_mix_command_writes_a_mix_that_export_takes(tiny_dir, tmp_path, capsys) -> None:
    import json

    from edgenas.cli import main as edgenas
    from export.mix import PrecisionMix

    out = tmp_path / "mix.json"
    args = ["mix", "--model", str(tiny_dir), "--neuron-step", "16", "--runtime", "onnxruntime", "--high", "fp32",
            "--lows", "int8,int4", "--budget-share", "0.5", "--quality-tokens", "256", "--out", str(out)]
    assert edgenas(args) == 0, capsys.readouterr().err
    text = capsys.readouterr().out
    assert "onnxruntime precision mix within" in text and "uniform int4" in text
    mix = PrecisionMix.from_dict(json.loads(out.read_text()))
    assert mix.runtime == "onnxruntime" and {*mix.attention, *mix.mlp} <= {"fp32", "int8", "int4"}
    cfg = tmp_path / "c.jsonl"
    from subnets.basemodel import load_base_model

    cfg.write_text(load_base_model(tiny_dir).space(16).full().to_json() + "\n")
    assert edgenas(["export", "--model", str(tiny_dir), "--neuron-step", "16", "--configs", str(cfg),
                    "--out", str(tmp_path / "x"), "--mix", str(out)]) == 0
    # a type the runtime lacks, named with the menu
    assert edgenas([*args[:-2], "--lows", "q4_0", "--out", str(out)]) == 2
    assert "onnxruntime has no weight type q4_0" in capsys.readouterr().err


def test_type_costs_are_fitted_from_measured_mixes_and_budget_the_allocation() -> None:
    """Each type's own cost per weight (a slow kernel costs more than its bytes say) is
    recovered from measured deployments, and the allocation then keeps within a time budget."""
    from export.mix import PrecisionMix
    from search.mix_allocation import TypeCosts, fit_type_costs
    from search.sensitivity import mix_of

    L = 3
    params = {g: 1000 * (i + 1) for i, g in enumerate(groups_of(L))}
    truth = TypeCosts(0.5, {"q8_0": 2e-3, "q5_0": 3e-3, "q4_0": 1e-3})  # q5_0 slower than q8_0
    mixes = [PrecisionMix.uniform("llama.cpp", k, L) for k in ("q8_0", "q5_0", "q4_0")]
    mixes += [mix_of({"mlp.0": "q4_0", "attn.1": "q5_0"}, "llama.cpp", "q8_0", L),
              mix_of({HEAD: "q4_0", "mlp.2": "q5_0"}, "llama.cpp", "q8_0", L)]
    fitted = fit_type_costs([(m, params, truth.of(m, params)) for m in mixes])
    # one architecture: the intercept and a shift common to all types are one unknown, so
    # judge the fit by what it predicts for a mix it was not given
    unseen = mix_of({"mlp.1": "q4_0", "attn.2": "q5_0", "mlp.2": "q5_0"}, "llama.cpp", "q8_0", L)
    assert fitted.of(unseen, params) == pytest.approx(truth.of(unseen, params), rel=1e-6)
    sens = synthetic({g: 0.1 for g in groups_of(L)}, layers=L)
    sens.lows = ("q5_0", "q4_0")
    for g in sens.perplexity:
        sens.perplexity[g]["q5_0"] = sens.base_perplexity * math.exp(0.02)
    budget = 0.5 * (truth.of(mixes[0], params) + truth.of(mixes[2], params))
    mix = allocate(sens, params, budget, costs=truth)
    assert truth.of(mix, params) <= budget + 1e-9
    assert "q5_0" not in {mix.head, *mix.attention, *mix.mlp}  # slower than q8_0 here: never worth it
