"""The search on a tiny model, with predictors fitted to a synthetic device."""

from __future__ import annotations

import json
import math
import sqlite3
from pathlib import Path

import numpy as np
import pytest

from predictor.features import ConfigBatch
from predictor.persist import PredictorFileError
from predictor.workload import LatencyObjective, Workload
from search.pareto import hypervolume, pareto_mask
from search.study import SearchError, run_search

WL = Workload(32, 16)


def objective(tiny_ws, tiny_predictor, wl: Workload = WL) -> LatencyObjective:
    return LatencyObjective.load(tiny_predictor, wl, "local", tiny_ws.base.base_id)


def test_pareto_and_hypervolume() -> None:
    ppl = np.array([10.0, 20.0, 15.0, 30.0])
    lat = np.array([5.0, 3.0, 4.0, 3.5])
    assert list(pareto_mask(ppl, lat)) == [True, True, True, False]
    hv = hypervolume(ppl, lat, ref_ppl=100, ref_lat=10)
    manual = (4 - 3) * math.log(100 / 20) + (5 - 4) * math.log(100 / 15) + (10 - 5) * math.log(100 / 10)
    assert abs(hv - manual) < 1e-9
    assert hypervolume(ppl * 100, lat, ref_ppl=100, ref_lat=10) == 0.0


def test_workload_sum_is_exact_for_affine_decode() -> None:
    wl = Workload(100, 51)
    pts = wl.decode_points()
    assert list(pts) == [100, 150]
    dec = [np.array([1.0 + 0.01 * p]) for p in pts]
    exact = sum(1.0 + 0.01 * p for p in range(100, 151))
    assert abs(wl.total(np.array([0.0]), dec)[0] - exact) < 1e-9


@pytest.mark.parametrize(("algorithm", "granularity"), [("nsga2", "per-layer"), ("random", "per-layer"),
                                                        ("local", "per-layer"), ("nsga2", "tapered")])
def test_search_returns_a_feasible_front(tiny_ws, tiny_predictor, tmp_path, algorithm, granularity) -> None:
    obj = objective(tiny_ws, tiny_predictor)
    full = float(obj.predict_upper(ConfigBatch.from_configs([tiny_ws.space.full()], 4))[0])
    budget = 0.7 * full
    res = run_search(tiny_ws, obj, algorithm, 24, budget, tmp_path / "study.db", seed=1, granularity=granularity)
    feasible = [p for p in res.points if p["feasible"]]
    assert len(feasible) == 24  # the budget counts perplexity evaluations, not rejected candidates
    assert res.front and all(p["feasible"] and p["upper_ms"] <= budget for p in res.front)
    # the front is non-dominated and sorted by latency
    assert all(a["latency_ms"] <= b["latency_ms"] and a["perplexity"] >= b["perplexity"]
               for a, b in zip(res.front, res.front[1:]))
    assert res.ppl_evaluations <= 24  # infeasible candidates are never evaluated
    assert res.hypervolume > 0


def test_search_resumes_from_its_study(tiny_ws, tiny_predictor, tmp_path) -> None:
    obj = objective(tiny_ws, tiny_predictor)
    budget = 1e9
    first = run_search(tiny_ws, obj, "nsga2", 10, budget, tmp_path / "s.db", seed=2)
    second = run_search(tiny_ws, obj, "nsga2", 16, budget, tmp_path / "s.db", seed=2)
    assert len(first.points) == 10 and len(second.points) == 16
    assert {p["trial"] for p in first.points} <= {p["trial"] for p in second.points}
    assert first.resumed.startswith("new study") and second.resumed.startswith("resumed study")
    with sqlite3.connect(tmp_path / "s.db") as c:  # perplexities live with the study, one row per sub-network
        rows = c.execute("SELECT config_hash, perplexity FROM edgenas_perplexity").fetchall()
    assert rows and all(v is not None for _, v in rows)
    assert second.ppl_evaluations < 16  # the first search's values were read, not evaluated again


def test_budget_below_the_smallest_subnetwork(tiny_ws, tiny_predictor, tmp_path) -> None:
    with pytest.raises(SearchError, match="below the smallest sub-network's predicted bound") as e:
        run_search(tiny_ws, objective(tiny_ws, tiny_predictor), "nsga2", 5, 0.001, tmp_path / "s.db")
    assert "raise --latency-budget-ms above" in e.value.fix


def test_predictor_for_another_device_or_model_is_refused(tiny_ws, tiny_predictor) -> None:
    with pytest.raises(PredictorFileError, match="predicts device 'local', not 'jetson'"):
        LatencyObjective.load(tiny_predictor, Workload(), "jetson", tiny_ws.base.base_id)
    with pytest.raises(PredictorFileError, match="predicts base model"):
        LatencyObjective.load(tiny_predictor, Workload(), "local", "smollm2-135m-instruct@000000000000")


def search(request, console=None, ws=None) -> dict:
    """The search stage as every entry point runs it; its outcome as search.json holds it."""
    from search.run import search as run

    return run(request, ws).to_dict()


def search_args(tiny_dir, tiny_predictor, tmp_path, **kw):
    d = dict(device="local", predictor=tiny_predictor, latency_budget_ms=1e6, workload="16,8", algorithm="nsga2",
             evals=12, granularity="per-layer", max_params=None, verify=0, host=None, db=tmp_path / "m.db",
             out=tmp_path / "search", model=str(tiny_dir), neuron_step=16, seed=0, quality_tokens=256, text=None,
             no_baselines=False, override=False, reconstruct=False)
    d.update(kw)
    from search.request import SearchRequest

    return SearchRequest(**d)


def test_cli_search_writes_front_plot_and_verifies_on_the_device(tiny_dir, tiny_ws, tiny_predictor, tmp_path) -> None:
    from rich.console import Console

    from profiler.store import Store

    res = search(search_args(tiny_dir, tiny_predictor, tmp_path, verify=2), Console(file=open(tmp_path / "log", "w")), ws=tiny_ws)
    out = tmp_path / "search"
    for f in ("front.json", "front.csv", "front.jsonl", "front.png", "search.json", "study.db"):
        assert (out / f).is_file(), f
    assert set(res["baselines"]) == {"full model", "uniform width", "layer dropping"}
    assert len(res["verified"]) == 2 and all(r["measured_ms"] > 0 for r in res["verified"])
    store = Store(tmp_path / "m.db")
    rows = list(store.measurement_rows())
    protocols = store.protocols()
    store.close()
    phases = sorted({(r["phase"], r["seq_len"], r["past_len"]) for r in rows})
    assert phases == [("decode", 1, 16), ("decode", 1, 23), ("prefill", 16, 0)]
    # measured as the predictor's data was: its threads, back-end and timing protocol
    assert {(r["threads"], r["backend"]) for r in rows} == {(2, "ort-cpu")}
    assert {protocols[r["protocol"]].timing["min_time_s"] for r in rows} == {0.03}


def test_verify_refuses_a_predictor_that_does_not_say_how_it_was_measured(tiny_ws, tiny_predictor, tmp_path) -> None:
    import shutil

    from predictor.persist import load_predictor, save_predictor
    from search.verify import VerifyError, verify

    bare = tmp_path / "bare"
    for phase in ("prefill", "decode"):
        p, meta = load_predictor(tiny_predictor / phase)
        save_predictor(p, bare / phase, meta["device_name"], meta["device_fingerprint"], meta["base_id"], "x")
    obj = objective(tiny_ws, bare)
    with pytest.raises(VerifyError, match="does not record how its data was measured") as e:
        verify(tiny_ws, obj, [{"config": tiny_ws.space.full().to_dict(), "latency_ms": 1.0}], "local", tmp_path / "m.db", 9.0)
    assert "train-predictor" in e.value.fix
    shutil.rmtree(bare)


def test_tapered_genome_gives_influential_layers_more_width(tiny_ws) -> None:
    from search.encoding import Encoding

    ranking = tiny_ws.importance.layer_ranking()
    enc = Encoding(tiny_ws.space, ranking, "tapered")
    d = tiny_ws.space.dims
    mid = len(enc.neurons) // 2
    params = {"layers": d.num_layers, "g0": d.num_kv_heads, "h0": d.heads_per_group, "n0": mid, "taper": enc.max_taper}
    widths = {lc.layer: lc.neurons for lc in enc.decode(params).layers}
    by_rank = [widths[layer] for layer in ranking]
    assert by_rank == sorted(by_rank, reverse=True) and by_rank[0] > by_rank[-1]
    flat = enc.decode(dict(params, taper=0))
    assert len({lc.neurons for lc in flat.layers}) == 1
    assert enc.decode(enc.encode(flat)) == flat  # a uniform config round-trips with taper 0


def test_a_search_with_other_objectives_starts_a_new_study(tiny_ws, tiny_predictor, tmp_path) -> None:
    """Same settings resume; another workload, parameter cap or held-out token count is
    another question: a new study, and perplexities of other held-out tokens are not reused."""

    budget = 1e9
    first = run_search(tiny_ws, objective(tiny_ws, tiny_predictor), "random", 6, budget, tmp_path / "s.db", seed=3)
    assert first.resumed.startswith("new study") and first.ppl_evaluations == 6
    other_wl = LatencyObjective.load(tiny_predictor, Workload(32, 8), "local", tiny_ws.base.base_id)
    second = run_search(tiny_ws, other_wl, "random", 6, budget, tmp_path / "s.db", seed=3)
    assert "workload" in second.resumed and second.study_name != first.study_name
    assert len(second.points) == 6 and second.ppl_evaluations == 0  # same perplexities, cached
    capped = run_search(tiny_ws, objective(tiny_ws, tiny_predictor), "random", 6, budget, tmp_path / "s.db", seed=3,
                        max_params=1e12)
    assert "max_params" in capped.resumed
    fewer_tokens = tiny_ws.evaluated_on(tiny_ws.eval_text, 128)
    third = run_search(fewer_tokens, objective(tiny_ws, tiny_predictor), "random", 6, budget, tmp_path / "s.db", seed=3)
    assert "quality" in third.resumed and third.ppl_evaluations == 6
    again = run_search(tiny_ws, objective(tiny_ws, tiny_predictor), "random", 6, budget, tmp_path / "s.db", seed=3)
    assert again.resumed.startswith("resumed study") and again.study_name == first.study_name


def test_nsga2_learns_where_the_feasible_region_is(tiny_ws, tiny_predictor, tmp_path) -> None:
    """Every proposal carries its constraint values, and NSGA-II's later generations propose
    far fewer over-budget candidates than its first, and than random search does: the front
    test alone cannot tell, since fronts keep only feasible points whatever the sampler did."""
    import optuna

    obj = objective(tiny_ws, tiny_predictor)
    full = float(obj.predict_upper(ConfigBatch.from_configs([tiny_ws.space.full()], 4))[0])
    budget = 0.45 * full
    share = {}
    for algo in ("nsga2", "random"):
        # 240 proposals: late generations repeat judged configs, which no longer count as evaluations
        res = run_search(tiny_ws, obj, algo, 40, budget, tmp_path / f"{algo}.db", seed=4, max_trials=240)
        study = optuna.load_study(study_name=res.study_name, storage=f"sqlite:///{tmp_path / f'{algo}.db'}")
        # every proposal, a repeat included: the sampler's choice, whether or not it was judged again
        flags = [not t.user_attrs["feasible"] for t in study.get_trials(deepcopy=False)
                 if t.state == optuna.trial.TrialState.COMPLETE]
        share[algo] = (float(np.mean(flags[:16])), float(np.mean(flags[-40:])))
        attrs = study.get_trials(deepcopy=False)[-1].system_attrs
        assert {"constraints:latency_upper_ms", "constraints:params"} <= {k for k in attrs if k.startswith("constraints:")}
    early, late = share["nsga2"]
    assert late < early and late < share["random"][1] - 0.1, share


def test_a_search_at_int4_uses_int4_predictors_quality_and_verification(tiny_dir, tiny_ws, tmp_path) -> None:
    """Profile int4 graphs, train on them, search at int4: quality is the int4 graph's, the
    verification measures int4 graphs; an fp32 predictor is refused for an int4 search."""
    from rich.console import Console

    import edgenas
    from profiler.store import Store
    from search.study import SearchError
    from tests.helpers import FAST_TIMING

    db = tmp_path / "int4.db"
    # enough sub-networks that a few cells flagged unstable on a busy machine leave the 13 that
    # cross-validation needs
    configs = [tiny_ws.space.full(), *edgenas.sample(tiny_ws, 19, seed=5)]
    edgenas.profile(tiny_ws, "local", configs, db, seq_lens=(16,), past_lens=(16, 19, 23), timing=FAST_TIMING,
                    precision="int4", reference_every=0)
    edgenas.train_predictors(db, "local", tmp_path / "pred", model=str(tiny_dir))
    console = Console(file=open(tmp_path / "log", "w"))
    res = search(search_args(tiny_dir, tmp_path / "pred", tmp_path, precision="int4", block_size=32, verify=1,
                             db=db, granularity="tapered", max_perplexity=None), console, ws=tiny_ws)
    assert res["verified"] and res["verified"][0]["measured_ms"] > 0
    store = Store(db)
    try:
        assert {r["backend"] for r in store.measurement_rows()} == {"ort-cpu:int4-b32-qhead"}
    finally:
        store.close()
    fp32_ppl = tiny_ws.perplexity(tiny_ws.space.full())
    assert res["full_perplexity"] != fp32_ppl  # judged as the int4 graph computes
    with pytest.raises(SearchError, match="trained on ort-cpu:int4-b32-qhead measurements, the search asks for fp32"):
        search(search_args(tiny_dir, tmp_path / "pred", tmp_path, precision="fp32", block_size=32), console, ws=tiny_ws)


def _int4_predictor(tiny_ws, folder: Path) -> Path:
    """Predictors of the tiny model as int4 graphs on the synthetic device: the roofline with
    a quarter of the weight traffic (decode is weight-bound, so int4 is faster there)."""
    import numpy as np

    from export.onnx_graphs import min_ir_version
    from predictor.features import ConfigBatch
    from predictor.model import BoostedCostModel
    from predictor.persist import save_predictor
    from profiler.protocol import Protocol
    from tests.helpers import FAST_TIMING, roofline_latency

    configs = tiny_ws.space.sample(40, 0)
    batch = ConfigBatch.from_configs(configs, tiny_ws.space.dims.num_layers)
    rng = np.random.default_rng(0)
    proto = Protocol(timing=dict(FAST_TIMING), opset=17, ir_version=min_ir_version(17), precision="int4-b32-qhead")
    for phase in ("prefill", "decode"):
        seq = rng.choice([16, 32, 64], 40).astype(float) if phase == "prefill" else np.ones(40)
        past = np.zeros(40) if phase == "prefill" else rng.choice([16, 48, 96], 40).astype(float)
        y = roofline_latency(configs, tiny_ws.space.dims, phase, seq, past, 0.01, seed=1, peak=1e6, bw=8e6, launch=0.3)
        p = BoostedCostModel(tiny_ws.space.dims, phase).fit(batch, seq, past, y)
        save_predictor(p, folder / phase, "local", "fp-local", tiny_ws.base.base_id, "synthetic",
                       {"threads": 2, "backend": "ort-cpu:int4-b32-qhead", "protocol": proto.digest,
                        "protocol_record": proto.to_dict()})
    return folder


def test_a_search_over_architecture_and_precision(tiny_dir, tiny_ws, tiny_predictor, tmp_path) -> None:
    from rich.console import Console

    from search.study import SearchError

    int4 = _int4_predictor(tiny_ws, tmp_path / "pred-int4")
    args = search_args(tiny_dir, [int4, tiny_predictor], tmp_path, precision="fp32,int4", evals=16, block_size=32)
    res = search(args, Console(file=open(tmp_path / "log", "w")), ws=tiny_ws)
    points = json.loads((tmp_path / "search" / "front.json").read_text())
    assert {p["precision"] for p in points} <= {"fp32", "int4"} and all(" @ " in p["summary"] for p in points)
    assert {"uniform width @ fp32", "uniform width @ int4", "layer dropping @ int4"} <= set(res["baselines"])
    # the same sub-network at int4: predicted faster, and judged by the int4 graph's arithmetic
    full = res["baselines"]["full model @ fp32"][0], res["baselines"]["full model @ int4"][0]
    assert full[1]["latency_ms"] < full[0]["latency_ms"] and full[1]["perplexity"] != full[0]["perplexity"]
    with pytest.raises(SearchError, match="no predictor for int8"):
        search(search_args(tiny_dir, [int4, tiny_predictor], tmp_path, precision="fp32,int8", evals=4, block_size=32),
               Console(file=open(tmp_path / "log2", "w")), ws=tiny_ws)


def test_the_search_never_spends_two_evaluations_on_one_config(tiny_ws, tiny_predictor, tmp_path) -> None:
    """A sampler may propose a candidate again: the repeat is told its values (the study needs
    them) but spends no evaluation and is not a second point."""
    import optuna

    obj = objective(tiny_ws, tiny_predictor)
    full = float(obj.predict_upper(ConfigBatch.from_configs([tiny_ws.space.full()], 4))[0])
    first = run_search(tiny_ws, obj, "nsga2", 10, full, tmp_path / "s.db", seed=5)
    study = optuna.load_study(study_name=first.study_name, storage=f"sqlite:///{tmp_path / 's.db'}")
    study.enqueue_trial(dict(study.get_trials(deepcopy=False)[0].params))  # proposed again
    res = run_search(tiny_ws, obj, "nsga2", 11, full, tmp_path / "s.db", seed=5)
    hashes = [p["config_hash"] for p in res.points]
    assert len(hashes) == len(set(hashes)) == 11  # every point judged once, 11 distinct evaluations
    assert res.repeats >= first.repeats + 1 and res.ppl_evaluations == 1
