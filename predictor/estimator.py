"""The latency predictor as a scikit-learn estimator.

``X`` is a table with one row per measurement: the sub-network's per-layer choices (kept
flag, KV groups, heads per group, MLP neurons for each base layer) and the shape (sequence
length, past length), as ``config_table`` writes it; ``y`` is latency in ms. So the suite's
own evaluation, and a user's notebook, use ``GroupKFold``, ``cross_val_predict`` and ``clone``
on it like on any regressor; ``model`` picks the edgenas predictor or one of the baselines
it is compared with."""

from __future__ import annotations

from typing import Any

import numpy as np
from sklearn.base import BaseEstimator, RegressorMixin
from sklearn.utils.validation import check_is_fitted

from predictor.baselines import BASELINES
from predictor.features import ConfigBatch
from predictor.model import BoostedCostModel
from subnets.dims import BaseDims


def table_columns(num_layers: int) -> list[str]:
    return [f"{what}_{i}" for what in ("kept", "kv_groups", "heads_per_group", "neurons") for i in range(num_layers)] + \
        ["seq_len", "past_len"]


def config_table(batch: ConfigBatch, seq_len: Any, past_len: Any) -> np.ndarray:
    """[N, 4 L + 2] float table of sub-networks and shapes (the estimator's ``X``)."""
    n = len(batch)
    seq = np.broadcast_to(np.asarray(seq_len, dtype=np.float64), (n,))
    past = np.broadcast_to(np.asarray(past_len, dtype=np.float64), (n,))
    return np.concatenate([batch.kept, batch.kv_groups, batch.heads_per_group, batch.neurons,
                           seq[:, None], past[:, None]], axis=1).astype(np.float64)


def split_table(X: Any, num_layers: int) -> tuple[ConfigBatch, np.ndarray, np.ndarray]:
    X = np.asarray(X, dtype=np.float64)
    if X.ndim != 2 or X.shape[1] != 4 * num_layers + 2:
        raise ValueError(f"X has shape {X.shape}; a table for {num_layers} layers has {4 * num_layers + 2} columns "
                         "(predictor.estimator.table_columns)")
    L = num_layers
    batch = ConfigBatch(X[:, :L].astype(bool), X[:, L:2 * L].astype(np.int64), X[:, 2 * L:3 * L].astype(np.int64),
                        X[:, 3 * L:4 * L].astype(np.int64))
    return batch, X[:, 4 * L], X[:, 4 * L + 1]


class LatencyEstimator(RegressorMixin, BaseEstimator):
    """``fit(X, y)`` / ``predict(X)`` / ``predict_upper(X)`` over ``config_table`` rows."""

    def __init__(self, dims: BaseDims | None = None, phase: str = "prefill", model: str = "edgenas",
                 alpha: float = 0.1, boost: str = "auto", seed: int = 0, prior: BoostedCostModel | None = None,
                 base: str = "auto") -> None:
        self.dims = dims
        self.phase = phase
        self.model = model
        self.alpha = alpha
        self.boost = boost
        self.seed = seed
        self.prior = prior
        self.base = base

    def _make(self) -> Any:
        if self.dims is None:
            raise ValueError("LatencyEstimator needs dims (the base model's BaseDims)")
        if self.model == "edgenas":
            return BoostedCostModel(self.dims, self.phase, alpha=self.alpha, boost=self.boost, seed=self.seed,
                                    base=self.base, prior=self.prior)
        for cls in BASELINES:
            if cls.name == self.model:
                return cls(self.dims, self.phase)
        raise ValueError(f"unknown model {self.model!r}; use 'edgenas' or one of {[c.name for c in BASELINES]}")

    def fit(self, X: Any, y: Any) -> LatencyEstimator:
        est = self._make()
        batch, seq, past = split_table(X, est.dims.num_layers)
        self.model_ = est.fit(batch, seq, past, np.asarray(y, dtype=np.float64))
        self.n_features_in_ = 4 * est.dims.num_layers + 2
        return self

    def predict(self, X: Any) -> np.ndarray:
        check_is_fitted(self, "model_")
        return self.model_.predict(*split_table(X, self.model_.dims.num_layers))

    def predict_upper(self, X: Any, alpha: float | None = None) -> np.ndarray:
        check_is_fitted(self, "model_")
        if not hasattr(self.model_, "predict_upper"):
            raise AttributeError(f"the {self.model} baseline has no upper bound")
        batch, seq, past = split_table(X, self.model_.dims.num_layers)
        return self.model_.predict_upper(batch, seq, past, alpha=alpha)

    def coverage(self, alpha: float | None = None) -> dict[str, Any]:
        """What the fitted model's upper bound guarantees at ``alpha`` (``BoostedCostModel.coverage``)."""
        check_is_fitted(self, "model_")
        return self.model_.coverage(alpha)

    @classmethod
    def from_model(cls, model: Any) -> LatencyEstimator:
        """The estimator around an already fitted model (a loaded predictor)."""
        est = cls(model.dims, model.phase, alpha=getattr(model, "alpha", 0.1))
        est.model_ = model
        est.n_features_in_ = 4 * model.dims.num_layers + 2
        return est

    @classmethod
    def load(cls, folder: Any, device: str | None = None, base_id: str | None = None, phase: str | None = None,
             override: bool = False) -> tuple[LatencyEstimator, dict[str, Any]]:
        """A saved predictor folder (``train-predictor --out``/PHASE) as a fitted estimator,
        with its metadata; refused for another device, base model, phase or schema."""
        from predictor.persist import load_predictor

        model, meta = load_predictor(folder, device=device, base_id=base_id, phase=phase, override=override)
        return cls.from_model(model), meta
