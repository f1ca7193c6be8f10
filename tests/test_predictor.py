"""The latency predictor on synthetic measurements with known structure, and on a store."""

from __future__ import annotations

import json

import numpy as np
import pytest

from predictor.baselines import BASELINES, LinearInFlops
from predictor.errors import DataError
from predictor.features import FEATURES, ConfigBatch, feature_matrix
from predictor.model import BoostedCostModel
from predictor.persist import PredictorFileError, load_predictor, save_predictor
from subnets.config import SubnetConfig
from subnets.cost import cost
from subnets.space import BaseDims, SearchSpace
from tests.helpers import roofline_latency

DIMS = BaseDims("llama", 30, 576, 9, 3, 64, 1536, 49152, True)
SPACE = SearchSpace("base@x", DIMS)


def dataset(n: int, phase: str = "prefill", seed: int = 0, noise: float = 0.005):
    configs = SPACE.sample(n, seed, strategy="stratified")
    batch = ConfigBatch.from_configs(configs, DIMS.num_layers)
    rng = np.random.default_rng(seed)
    seq = rng.choice([64, 128, 256], n).astype(float) if phase == "prefill" else np.ones(n)
    past = np.zeros(n) if phase == "prefill" else rng.choice([64, 256, 1024], n).astype(float)
    return configs, batch, seq, past, roofline_latency(configs, DIMS, phase, seq, past, noise, seed + 1)


def test_features_agree_with_the_cost_model() -> None:
    configs = SPACE.sample(20, 3)
    batch = ConfigBatch.from_configs(configs, DIMS.num_layers)
    for phase, seq, past in (("prefill", 96, 0), ("decode", 1, 300)):
        X = feature_matrix(batch, DIMS, phase, seq, past)
        for i, c in enumerate(configs):
            ref = cost(c, DIMS, phase, seq_len=seq, past_len=past)
            row = dict(zip(FEATURES, X[i]))
            assert row["params"] == ref.params
            assert row["linear_macs"] == ref.linear_macs and row["attention_macs"] == ref.attention_macs
            assert row["weight_bytes"] == ref.weight_bytes and row["kv_bytes"] == ref.kv_cache_bytes
            assert row["activation_bytes"] == ref.activation_bytes and row["layers"] == len(c.layers)


@pytest.mark.parametrize("phase", ["prefill", "decode"])
def test_predictor_learns_a_device_and_beats_linear_in_flops(phase: str) -> None:
    _, b, s, p, y = dataset(160, phase, seed=1)
    _, tb, ts, tp, ty = dataset(60, phase, seed=2)
    model = BoostedCostModel(DIMS, phase).fit(b, s, p, y)
    acc = model.metrics(tb, ts, tp, ty)
    # a roofline device the model cannot represent exactly (its base is a sum, not a max)
    assert acc["within_10pct"] >= 0.9 and acc["mape"] < 0.06
    base = LinearInFlops(DIMS, phase).fit(b, s, p, y)
    base_err = np.mean(np.abs(base.predict(tb, ts, tp) / ty - 1))
    assert acc["mape"] < base_err
    assert 0.8 <= acc["upper_coverage"] <= 1.0  # alpha = 0.1


def test_prediction_is_monotone_in_size() -> None:
    _, b, s, p, y = dataset(120, "prefill", seed=4)
    model = BoostedCostModel(DIMS, "prefill", boost="on").fit(b, s, p, y)
    small = SubnetConfig.uniform("base@x", range(10), 1, 1, 256)
    grown = [small,
             SubnetConfig.uniform("base@x", range(10), 1, 1, 512),
             SubnetConfig.uniform("base@x", range(10), 2, 1, 512),
             SubnetConfig.uniform("base@x", range(10), 2, 3, 512),
             SubnetConfig.uniform("base@x", range(20), 2, 3, 512),
             SubnetConfig.uniform("base@x", range(30), 3, 3, 1536)]
    pred = model.predict(ConfigBatch.from_configs(grown, 30), 128, 0)
    assert np.all(np.diff(pred) >= 0)
    assert np.all(np.diff(model.predict(ConfigBatch.from_configs([small] * 3, 30), [64, 128, 256], 0)) > 0)


def test_small_training_sets_are_refused() -> None:
    _, b, s, p, y = dataset(9)
    from predictor.errors import DataError

    with pytest.raises(DataError, match="at least 10"):
        BoostedCostModel(DIMS, "prefill").fit(b, s, p, y)


def test_transfer_from_another_device_with_few_measurements() -> None:
    _, b, s, p, y = dataset(150, "prefill", seed=5)
    source = BoostedCostModel(DIMS, "prefill").fit(b, s, p, y)
    # device B: 2.3x slower, a little more per-layer overhead
    _, b2, s2, p2, y2 = dataset(20, "prefill", seed=6)
    X2 = feature_matrix(b2, DIMS, "prefill", s2, p2)
    y2 = 2.3 * y2 + 0.02 * X2[:, FEATURES.index("layers")]
    _, tb, ts, tp, ty = dataset(80, "prefill", seed=7)
    ty = 2.3 * ty + 0.02 * feature_matrix(tb, DIMS, "prefill", ts, tp)[:, FEATURES.index("layers")]
    transferred = BoostedCostModel(DIMS, "prefill", prior=source).fit(b2, s2, p2, y2)
    scratch = BoostedCostModel(DIMS, "prefill").fit(b2, s2, p2, y2)
    t_acc, s_acc = transferred.metrics(tb, ts, tp, ty), scratch.metrics(tb, ts, tp, ty)
    # on the roofline device even the source predictor is ~5% off (it has 150 measurements)
    assert t_acc["within_10pct"] >= 0.8 and t_acc["mape"] < 0.08
    assert t_acc["mape"] < s_acc["mape"]  # 20 measurements: transfer beats starting from scratch
    few = BoostedCostModel(DIMS, "prefill", prior=source).fit(ConfigBatch(*(x[:5] for x in (b2.kept, b2.kv_groups,
                                                                                          b2.heads_per_group, b2.neurons))),
                                                               s2[:5], p2[:5], y2[:5])
    assert few.metrics(tb, ts, tp, ty)["within_10pct"] >= 0.75  # five measurements of the new device
    assert transferred.transfer_terms is not None and transferred.transfer_terms.max() > 0


def test_transferred_predictor_roundtrip(tmp_path) -> None:
    _, b, s, p, y = dataset(60, "prefill", seed=11)
    source = BoostedCostModel(DIMS, "prefill").fit(b, s, p, y)
    _, b2, s2, p2, y2 = dataset(12, "prefill", seed=12)
    model = BoostedCostModel(DIMS, "prefill", prior=source).fit(b2, s2, p2, 1.7 * y2)
    folder = save_predictor(model, tmp_path / "t", "b", "fpB", "base@x", "h")
    back, _ = load_predictor(folder, device="b", base_id="base@x", phase="prefill")
    np.testing.assert_allclose(back.predict(b, s, p), model.predict(b, s, p), rtol=1e-6)


def test_baselines_fit_and_predict() -> None:
    """Each linear baseline recovers a latency that is exactly linear in its own columns on
    held-out sub-networks, and every baseline predicts held-out roofline latencies better
    than their mean does (they learn, not merely return positive numbers)."""
    from predictor.baselines import _Linear
    from predictor.metrics import accuracy

    _, b, s, p, y = dataset(80, "prefill", seed=8)
    _, tb, ts, tp, ty = dataset(40, "prefill", seed=18)
    for cls in BASELINES:
        model = cls(DIMS, "prefill")
        if isinstance(model, _Linear):
            coef = np.linspace(1.0, 2.0, len(cls.columns) + 1) / np.maximum(np.abs(model._design(b, s, p)).max(0), 1e-12)
            exact = model.fit(b, s, p, model._design(b, s, p) @ coef).predict(tb, ts, tp)
            np.testing.assert_allclose(exact, model._design(tb, ts, tp) @ coef, rtol=1e-6, err_msg=cls.name)
        pred = cls(DIMS, "prefill").fit(b, s, p, y).predict(tb, ts, tp)
        mean = accuracy(ty, np.full_like(ty, y.mean()))["mape"]
        assert accuracy(ty, pred)["mape"] < mean, cls.name


def test_batch_prediction_is_vectorized() -> None:
    _, b, s, p, y = dataset(60, "decode", seed=9)
    model = BoostedCostModel(DIMS, "decode").fit(b, s, p, y)
    big = ConfigBatch(np.repeat(b.kept, 500, 0), np.repeat(b.kv_groups, 500, 0), np.repeat(b.heads_per_group, 500, 0),
                      np.repeat(b.neurons, 500, 0))
    out = model.predict(big, 1, 512)
    assert out.shape == (30_000,)
    # each row predicted as it is alone: the batch changes the speed, not the answer
    np.testing.assert_allclose(out.reshape(60, 500), np.repeat(model.predict(b, 1, 512)[:, None], 500, 1), rtol=1e-9)


def test_save_load_roundtrip_and_refusals(tmp_path) -> None:
    _, b, s, p, y = dataset(80, "prefill", seed=10)
    model = BoostedCostModel(DIMS, "prefill", boost="on").fit(b, s, p, y)
    folder = save_predictor(model, tmp_path / "pred", "jetson", "fp123", "base@x", "datahash")
    back, meta = load_predictor(folder, device="jetson", base_id="base@x", phase="prefill")
    np.testing.assert_allclose(back.predict(b, s, p), model.predict(b, s, p), rtol=1e-6)
    assert meta["device_fingerprint"] == "fp123" and meta["boosted"]
    assert not list(folder.glob("*.pkl")) and not list(folder.glob("*.pickle"))
    with pytest.raises(PredictorFileError, match="predicts device 'jetson', not 'rpi'"):
        load_predictor(folder, device="rpi")
    with pytest.raises(PredictorFileError, match="predicts base model"):
        load_predictor(folder, base_id="other@y")
    load_predictor(folder, device="rpi", override=True)
    booster = folder / "booster.json"
    booster.write_text(booster.read_text() + " ")
    with pytest.raises(PredictorFileError, match="modified after training"):
        load_predictor(folder)
    booster.unlink()
    with pytest.raises(PredictorFileError, match=r"missing booster\.json"):
        load_predictor(folder)
    meta_path = folder / "meta.json"
    d = json.loads(meta_path.read_text())
    d["feature_schema"] = 999
    meta_path.write_text(json.dumps(d))
    with pytest.raises(PredictorFileError, match=r"meta\.json was modified after training"):
        load_predictor(folder)
    from predictor.persist import _meta_digest

    d["sha256"] = _meta_digest(d)  # as an older edgenas would have written it
    meta_path.write_text(json.dumps(d))
    with pytest.raises(PredictorFileError, match="feature schema 999"):
        load_predictor(folder)
    with pytest.raises(PredictorFileError, match="not a predictor folder"):
        load_predictor(tmp_path)


def test_small_batch_tree_walk_equals_xgboost() -> None:
    _, b, s, p, y = dataset(100, "prefill", seed=11)
    model = BoostedCostModel(DIMS, "prefill", boost="on").fit(b, s, p, y)
    configs = SPACE.sample(300, 12)
    big = ConfigBatch.from_configs(configs, DIMS.num_layers)  # > SMALL_BATCH: XGBoost itself
    small = ConfigBatch.from_configs(configs[:40], DIMS.num_layers)  # the numpy tree walk
    np.testing.assert_allclose(model.predict(small, 128, 0), model.predict(big, 128, 0)[:40], rtol=1e-5)


def test_bound_scores_hold_out_whole_sub_networks() -> None:
    """Each CV+ score is one sub-network's, taken by a fold model that never saw any of its
    shapes; with fewer sub-networks than folds, folds stay whole sub-networks (no row split)."""
    from predictor.model import _groups

    configs = SPACE.sample(30, 5)
    twice = ConfigBatch.from_configs(configs + configs, DIMS.num_layers)  # every sub-network at two shapes
    g = _groups(twice)
    assert np.array_equal(g[:30], g[30:]) and len(set(g.tolist())) == 30
    y = np.exp(np.random.default_rng(0).normal(0, 0.05, 60)) * 10
    seq = np.r_[np.full(30, 64.0), np.full(30, 128.0)]
    p = BoostedCostModel(DIMS, "prefill", boost="off").fit(twice, seq, np.zeros(60), y)
    assert p.scores is not None and len(p.scores) == 30 and len(p.folds) == 5
    three = ConfigBatch.from_configs(configs[:3] * 4, DIMS.num_layers)  # 3 sub-networks, 12 rows
    p3 = BoostedCostModel(DIMS, "prefill", boost="off").fit(three, np.repeat([16.0, 32, 64, 128], 3), np.zeros(12),
                                                             np.linspace(5, 9, 12))
    assert len(p3.folds) == 3 and len(p3.scores) == 3  # leave one sub-network out, never random rows
    cov = p3.coverage()
    assert cov["widened"] and cov["guaranteed"] == 0.5 and cov["nominal"] == 0.9  # 1 - 2/(3+1): stated, not 90%


def test_active_choice_near_the_budget_stays_in_the_region() -> None:
    from predictor.active import full_config, near_budget, select
    from predictor.data import Measurements

    configs, b, s, p, y = dataset(80, "prefill", seed=7)
    hashes = np.array([c.config_hash() for c in configs])
    m = Measurements(DIMS, "dev", "fp", "base@x", "prefill", configs, hashes, b, s, p, y, 0, 0)
    pool = SPACE.sample(300, 8)
    fitted = BoostedCostModel(DIMS, "prefill").fit(b, s, p, y)
    full = fitted.predict(ConfigBatch.from_configs([full_config(m)], DIMS.num_layers), 128, 0)[0]
    region = near_budget(m, pool, 0.4, 128, 0)
    assert region and len(region) < len(pool)
    lat = fitted.predict(ConfigBatch.from_configs(region, DIMS.num_layers), 128, 0)
    assert np.all(np.abs(lat / (0.4 * full) - 1) <= 0.15 + 1e-9)
    picks = select(m, pool, 5, 128, 0, near=0.4)
    assert len(picks) == 5 and sum(c in region for c in picks) >= min(5, len(region)) - 1


def test_workload_bound_covers_new_sub_networks_as_the_search_draws_them() -> None:
    """Trained on 40 sub-networks at the workload's shapes (as the pipeline profiles), the
    workload bound holds for fresh sub-networks drawn from the space at least as often as it
    states, on a device (a roofline) the predictor cannot represent exactly."""
    from predictor.workload import LatencyObjective, Workload

    wl = Workload(128, 64)
    points = wl.decode_points()
    train_cfgs = SPACE.sample(40, 31)
    tb = ConfigBatch.from_configs(train_cfgs, DIMS.num_layers)
    pre = BoostedCostModel(DIMS, "prefill").fit(tb, 128, 0, roofline_latency(train_cfgs, DIMS, "prefill", 128, 0, 0.02, 1))
    k = len(points)
    rows = ConfigBatch.from_configs(train_cfgs * k, DIMS.num_layers)
    past = np.repeat(points, 40)
    dec = BoostedCostModel(DIMS, "decode").fit(rows, 1, past,
                                               roofline_latency(train_cfgs * k, DIMS, "decode", 1, past, 0.02, 2))
    obj = LatencyObjective(pre, dec, wl, "synthetic", "base@x")
    new = SPACE.sample(300, 77)
    nb = ConfigBatch.from_configs(new, DIMS.num_layers)
    true = wl.total(roofline_latency(new, DIMS, "prefill", 128, 0, 0.02, 3),
                    [roofline_latency(new, DIMS, "decode", 1, p, 0.02, 4 + i) for i, p in enumerate(points)])
    _, upper = obj.predict_both(nb)
    covered = float(np.mean(true <= upper))
    stated = obj.bound()
    assert not stated["widened"] and stated["nominal"] == 0.9 and stated["guaranteed"] == pytest.approx(0.8)
    assert covered >= stated["guaranteed"], covered
    p_cov = float(np.mean(roofline_latency(new, DIMS, "prefill", 128, 0, 0.02, 3) <= pre.predict_upper(nb, 128, 0)))
    assert p_cov >= pre.coverage()["guaranteed"]


def test_the_predictor_is_a_scikit_learn_estimator() -> None:
    """GroupKFold, cross_val_score, clone and a pandas table work on it as on any regressor."""
    import pandas as pd
    from sklearn.base import clone
    from sklearn.model_selection import GroupKFold, cross_val_score

    from predictor.estimator import LatencyEstimator, config_table, table_columns

    configs, b, s, p, y = dataset(60, "prefill", seed=13)
    X = pd.DataFrame(config_table(b, s, p), columns=table_columns(DIMS.num_layers))
    groups = [c.config_hash() for c in configs]
    est = LatencyEstimator(DIMS, "prefill", boost="off")
    scores = cross_val_score(est, X, y, groups=groups, cv=GroupKFold(4), scoring="neg_mean_absolute_percentage_error")
    assert len(scores) == 4 and all(-0.3 < v <= 0 for v in scores)
    twin = clone(est).set_params(alpha=0.2)
    assert twin.get_params()["alpha"] == 0.2 and est.get_params()["alpha"] == 0.1 and not hasattr(twin, "model_")
    direct = BoostedCostModel(DIMS, "prefill", boost="off").fit(b, s, p, y)
    np.testing.assert_allclose(est.fit(X, y).predict(X), direct.predict(b, s, p), rtol=1e-9)
    base = clone(est).set_params(model="linear in FLOPs").fit(X, y)
    assert base.predict(X).shape == (60,)
    with pytest.raises(ValueError, match="columns"):
        est.predict(X.iloc[:, :5])


def test_with_few_sub_networks_the_base_takes_the_shape_that_predicts_held_out_ones_best(tmp_path) -> None:
    """Decode latency that is a line in MACs, measured with 5% noise on 10 sub-networks: the
    seven-term base fits the noise, a baseline's two-coefficient shape does not; the
    predictor chooses that shape, says so, and saves and loads it."""
    from predictor.model import model_form

    _, b, s, p, _ = dataset(20, "decode", seed=4)
    X = feature_matrix(b, DIMS, "decode", s, p)
    macs = X[:, FEATURES.index("linear_macs")] + X[:, FEATURES.index("attention_macs")] + X[:, FEATURES.index("lm_head_macs")]
    y = (2.0 + macs / 1e7) * np.exp(np.random.default_rng(5).normal(0, 0.05, len(macs)))
    model = BoostedCostModel(DIMS, "decode").fit(b, s, p, y)
    errors = model.fit_info["cv_base_error"]
    assert model.base_used == min(errors, key=errors.get) and model.base_used != "physics"
    assert errors[model.base_used] < errors["physics"]
    assert f"base: {model.base_used}" in model_form(model.fit_info) and "fewer than 30" in model_form(model.fit_info)
    save_predictor(model, tmp_path, "dev", "fp", "base@x", "h")
    loaded, _ = load_predictor(tmp_path)
    assert loaded.base_used == model.base_used
    assert np.allclose(loaded.predict(b, s, p), model.predict(b, s, p))
    full = BoostedCostModel(DIMS, "decode", base="physics").fit(b, s, p, y)
    assert full.base_used == "physics"
    with pytest.raises(DataError, match="unknown predictor base"):
        BoostedCostModel(DIMS, "decode", base="cubic").fit(b, s, p, y)
