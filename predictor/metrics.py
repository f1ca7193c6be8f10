"""Accuracy of latency predictions, as the latency-predictor literature reports it."""

from __future__ import annotations

import numpy as np


def accuracy(y_true: np.ndarray, y_pred: np.ndarray, upper: np.ndarray | None = None) -> dict[str, float]:
    y_true = np.asarray(y_true, dtype=np.float64)
    y_pred = np.asarray(y_pred, dtype=np.float64)
    rel = np.abs(y_pred / y_true - 1.0)
    out = {
        "n": float(len(y_true)),
        "within_5pct": float(np.mean(rel <= 0.05)),
        "within_10pct": float(np.mean(rel <= 0.10)),
        "mape": float(np.mean(rel)),
        "rmse_ms": float(np.sqrt(np.mean((y_pred - y_true) ** 2))),
        "kendall_tau": _kendall(y_true, y_pred),
        # the error spread in the unit a board's repeatability is stated in (profiler.repeatability)
        "sd_log": float(np.sqrt(np.mean(np.log(y_pred / y_true) ** 2))),
    }
    if upper is not None:
        out["upper_coverage"] = float(np.mean(np.asarray(upper) >= y_true))
    return out


def _kendall(a: np.ndarray, b: np.ndarray) -> float:
    if len(a) < 2:
        return float("nan")
    from scipy.stats import kendalltau

    return float(kendalltau(a, b).statistic)
