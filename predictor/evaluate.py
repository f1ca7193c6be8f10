"""Evaluating predictors on held-out sub-networks, beside the baselines; learning curves;
predicted-vs-measured plots."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from predictor.baselines import BASELINES
from predictor.data import Measurements
from predictor.estimator import LatencyEstimator, config_table
from predictor.metrics import accuracy
from predictor.model import BoostedCostModel


def group_folds(m: Measurements, k: int, seed: int = 0) -> np.ndarray:
    """Fold index per measurement from scikit-learn's ``GroupKFold`` (shuffled by ``seed``):
    all shapes of one sub-network share a fold (held-out sub-networks, not held-out rows)."""
    folds = np.zeros(len(m), dtype=np.int64)
    for f, (_, te) in enumerate(_splitter(k, seed).split(np.zeros(len(m)), groups=m.subnet_hashes)):
        folds[te] = f
    return folds


def _splitter(k: int, seed: int) -> Any:
    from sklearn.model_selection import GroupKFold

    return GroupKFold(n_splits=k, shuffle=True, random_state=seed)


def choose_folds(m: Measurements, k_max: int, least: int | None = None) -> int:
    """The most folds (at most ``k_max``, else the fewest that can) that still leave every
    training split at least ``least`` measurements (default ``MIN_TRAIN``; a transferred
    predictor needs fewer)."""
    import math

    from predictor.errors import DataError
    from predictor.model import MIN_TRAIN

    least = MIN_TRAIN if least is None else least
    groups = len(set(m.subnet_hashes.tolist()))
    per_group = len(m) / max(groups, 1)
    # the most folds up to k_max; with few sub-networks, more folds (smaller held-out folds,
    # up to leave-one-out) rather than none
    for k in [*range(min(k_max, groups), 1, -1), *range(k_max + 1, groups + 1)]:
        if (groups - math.ceil(groups / k)) * per_group >= least:
            return k
    raise DataError(f"{len(m)} measurements of {groups} sub-networks are too few to train and cross-validate a "
                    f"{m.phase} predictor (each split needs {least} to train on)",
                    "profile more sub-networks: profile-device --samples 20")


def cross_validate(estimator: LatencyEstimator, m: Measurements, k: int = 5,
                   seed: int = 0) -> tuple[np.ndarray, np.ndarray | None]:
    """Out-of-fold predictions (and upper bounds, where the model has them) by sub-network:
    scikit-learn's ``cross_val_predict`` over ``GroupKFold`` for the baselines; for the
    predictor, whose fit is the costly one, each fold's ``clone`` is fitted once and gives both."""
    from sklearn.base import clone
    from sklearn.model_selection import cross_val_predict

    X, cv = config_table(m.batch, m.seq_len, m.past_len), _splitter(k, seed)
    if estimator.model != "edgenas":
        return cross_val_predict(estimator, X, m.y_ms, groups=m.subnet_hashes, cv=cv), None
    pred, upper = np.zeros(len(m)), np.zeros(len(m))
    for tr, te in cv.split(X, groups=m.subnet_hashes):
        fitted = clone(estimator).fit(X[tr], m.y_ms[tr])
        pred[te], upper[te] = fitted.predict(X[te]), fitted.predict_upper(X[te])
    return pred, upper


def compare(m: Measurements, k: int = 5, seed: int = 0,
            predictor_kw: dict[str, Any] | None = None) -> tuple[dict[str, dict[str, float]], np.ndarray]:
    """k-fold (by sub-network) accuracy of the predictor and every baseline, and the
    predictor's out-of-fold predictions (for the plot)."""
    out: dict[str, dict[str, float]] = {}
    est = LatencyEstimator(m.dims, m.phase, seed=seed, **(predictor_kw or {}))
    pred, upper = cross_validate(est, m, k, seed)
    out["edgenas predictor"] = accuracy(m.y_ms, pred, upper)
    for cls in BASELINES:
        p, _ = cross_validate(LatencyEstimator(m.dims, m.phase, model=cls.name), m, k, seed)
        out[cls.name] = accuracy(m.y_ms, p)
    return out, pred


def learning_curve(m: Measurements, sizes: tuple[int, ...] = (20, 50, 100, 200), test_share: float = 0.2,
                   repeats: int = 3, seed: int = 0) -> list[dict[str, Any]]:
    """Accuracy on held-out sub-networks when trained on n measurements, for each n the data
    allows; the predictor beside the linear-in-FLOPs baseline."""
    from predictor.baselines import LinearInFlops, LinearThreeTerms

    rows = []
    for n in sizes:
        res: dict[str, list[dict[str, float]]] = {}
        for r in range(repeats):
            folds = group_folds(m, round(1 / test_share), seed + r)
            test = folds == 0
            pool = np.flatnonzero(~test)
            if len(pool) < n:
                break
            pick = np.zeros(len(m), dtype=bool)
            pick[np.random.default_rng(seed + r).choice(pool, n, replace=False)] = True
            a, b = m.subset(pick), m.subset(test)
            for name, make in (("edgenas predictor", lambda: BoostedCostModel(m.dims, m.phase, seed=seed)),
                               ("linear in FLOPs", lambda: LinearInFlops(m.dims, m.phase)),
                               ("linear 3 terms", lambda: LinearThreeTerms(m.dims, m.phase))):
                model = make().fit(a.batch, a.seq_len, a.past_len, a.y_ms)
                res.setdefault(name, []).append(accuracy(b.y_ms, model.predict(b.batch, b.seq_len, b.past_len)))
        if not res:
            continue
        row: dict[str, Any] = {"n_train": n}
        for name, accs in res.items():
            row[name] = {k: float(np.mean([a[k] for a in accs])) for k in ("within_5pct", "within_10pct", "mape")}
        rows.append(row)
    return rows


def plot_predicted_vs_measured(y: np.ndarray, pred: np.ndarray, path: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 5), dpi=110)
    lo, hi = float(min(y.min(), pred.min())) * 0.9, float(max(y.max(), pred.max())) * 1.1
    ax.plot([lo, hi], [lo, hi], color="gray", lw=1)
    ax.fill_between([lo, hi], [lo * 0.95, hi * 0.95], [lo * 1.05, hi * 1.05], color="green", alpha=0.12, label="±5%")
    ax.fill_between([lo, hi], [lo * 0.9, hi * 0.9], [lo * 1.1, hi * 1.1], color="orange", alpha=0.08, label="±10%")
    ax.scatter(y, pred, s=10)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("measured latency (ms)")
    ax.set_ylabel("predicted latency (ms)")
    ax.set_title(title, fontsize=9)
    ax.legend(loc="upper left")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
