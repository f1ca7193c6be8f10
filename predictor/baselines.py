"""Simple latency models the predictor must beat, each with the predictor's fit/predict shape."""

from __future__ import annotations

from typing import Any

import numpy as np

from predictor.features import FEATURES, ConfigBatch, feature_matrix
from subnets.dims import BaseDims

_IDX = {f: i for i, f in enumerate(FEATURES)}


class _Linear:
    """Ordinary least squares on a few analytic columns (with intercept)."""

    columns: tuple[str, ...] = ()

    def __init__(self, dims: BaseDims, phase: str) -> None:
        self.dims, self.phase = dims, phase
        self.coef: np.ndarray | None = None

    def _design(self, batch: ConfigBatch, seq_len: Any, past_len: Any) -> np.ndarray:
        X = feature_matrix(batch, self.dims, self.phase, seq_len, past_len)
        cols = []
        for c in self.columns:
            if c == "macs":
                cols.append(X[:, _IDX["linear_macs"]] + X[:, _IDX["attention_macs"]] + X[:, _IDX["lm_head_macs"]])
            else:
                cols.append(X[:, _IDX[c]])
        return np.stack([np.ones(len(X)), *cols], axis=1)

    def fit(self, batch: ConfigBatch, seq_len: Any, past_len: Any, y: np.ndarray) -> _Linear:
        D = self._design(batch, seq_len, past_len)
        scale = np.maximum(np.abs(D).max(axis=0), 1e-12)
        coef, *_ = np.linalg.lstsq(D / scale, y, rcond=None)
        self.coef = coef / scale
        return self

    def predict(self, batch: ConfigBatch, seq_len: Any, past_len: Any) -> np.ndarray:
        return np.maximum(self._design(batch, seq_len, past_len) @ self.coef, 1e-6)


class LinearInFlops(_Linear):
    name = "linear in FLOPs"
    columns = ("macs",)


class LinearInParams(_Linear):
    name = "linear in parameters"
    columns = ("params",)


class LinearThreeTerms(_Linear):
    name = "linear in (linear MACs, attention MACs, layers)"
    columns = ("linear_macs", "attention_macs", "layers")


class LayerLookupTable:
    """Additive per-layer lookup table (OFA / nn-Meter style): latency = constant + sum over
    kept layers of (cost of its attention shape) + (cost of its MLP width), one table per
    input shape, fitted by ridge regression on the whole-network measurements."""

    name = "additive per-layer lookup table"

    def __init__(self, dims: BaseDims, phase: str, ridge: float = 1e-3) -> None:
        self.dims, self.phase, self.ridge = dims, phase, ridge
        self.tables: dict[tuple[float, float], np.ndarray] = {}
        self.values = np.zeros(0, dtype=np.int64)

    def _counts(self, batch: ConfigBatch) -> np.ndarray:
        """Columns: constant, one count per attention shape (KV groups x heads per group),
        one count per MLP width seen in training (an unseen width contributes nothing, as a
        lookup table has no entry for it)."""
        g_max, h_max = self.dims.num_kv_heads, self.dims.heads_per_group
        attn = np.zeros((len(batch), g_max * h_max))
        kept = batch.kept
        code = (batch.kv_groups - 1) * h_max + (batch.heads_per_group - 1)
        for k in range(g_max * h_max):
            attn[:, k] = ((code == k) & kept).sum(1)
        mlp = np.stack([((batch.neurons == v) & kept).sum(1) for v in self.values], axis=1)
        return np.concatenate([np.ones((len(batch), 1)), attn, mlp], axis=1)

    def fit(self, batch: ConfigBatch, seq_len: Any, past_len: Any, y: np.ndarray) -> LayerLookupTable:
        self.values = np.unique(batch.neurons[batch.kept])
        C = self._counts(batch)
        shapes = _shape_keys(len(batch), seq_len, past_len)
        for key in sorted(set(shapes)):
            m = np.array([s == key for s in shapes])
            A = C[m]
            self.tables[key] = np.linalg.solve(A.T @ A + self.ridge * np.eye(A.shape[1]), A.T @ y[m])
        return self

    def predict(self, batch: ConfigBatch, seq_len: Any, past_len: Any) -> np.ndarray:
        C = self._counts(batch)
        shapes = _shape_keys(len(batch), seq_len, past_len)
        out = np.empty(len(batch))
        keys = list(self.tables)
        for i, s in enumerate(shapes):
            table = self.tables.get(s)
            if table is None:  # an unseen shape: the nearest measured one's table
                table = self.tables[min(keys, key=lambda k: abs(k[0] - s[0]) + abs(k[1] - s[1]))]
            out[i] = C[i] @ table
        return np.maximum(out, 1e-6)


def _shape_keys(n: int, seq_len: Any, past_len: Any) -> list[tuple[float, float]]:
    s = np.broadcast_to(np.asarray(seq_len, dtype=np.float64), (n,))
    p = np.broadcast_to(np.asarray(past_len, dtype=np.float64), (n,))
    return list(zip(s.tolist(), p.tolist()))


BASELINES = (LinearInFlops, LinearInParams, LinearThreeTerms, LayerLookupTable)
