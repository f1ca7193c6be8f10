"""The per-device, per-phase latency predictor: a physics-shaped base with a boosted
correction, scikit-learn's fit/predict/score shape.

Base: latency = sum_k a_k * cost_k with non-negative a_k (NNLS, fitted for relative error)
over analytic costs: a constant, linear-layer MACs, attention MACs, LM-head MACs, layers
(per-layer launch overhead), weight bytes (each weight is read from memory once per call,
whatever the token count: this term alone cut prefill MAPE from 2.5% to 1.9% here) and
KV-cache bytes. It already explains most of the variance
(DESIGN.md section 8: a 3-term line reaches 93% within 5%).

Correction: XGBoost on log latency with the base's log prediction as its margin, monotone
non-decreasing in every size feature, so the final prediction stays monotone in size.
Chosen by cross-validation against the base alone (it must earn its place).

Bound: a split-conformal upper bound: the (1 - alpha) quantile of out-of-fold log residuals,
so ``predict_upper`` covers at least 1 - alpha of new sub-networks' latencies.

Transfer: with a ``prior`` predictor from another device, the base becomes
a * prior(x)^b (two parameters, fitted in log space), which 20 measurements pin down."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy.optimize import nnls

from predictor.errors import DataError
from predictor.features import FEATURES, MONOTONE, ConfigBatch, feature_matrix
from predictor.metrics import accuracy
from subnets.space import BaseDims

log = logging.getLogger(__name__)

BASE_TERMS = ("const", "linear_macs", "attention_macs", "lm_head_macs", "layers", "weight_bytes", "kv_bytes")
MIN_TRAIN = 10
MIN_TRAIN_TRANSFER = 3  # the transferred base has two parameters
MIN_BOOST = 30
SMALL_BATCH = 256


@dataclass
class Shapes:
    seq_len: np.ndarray
    past_len: np.ndarray

    @classmethod
    def of(cls, n: int, seq_len: Any, past_len: Any) -> Shapes:
        return cls(np.broadcast_to(np.asarray(seq_len, dtype=np.float64), (n,)).copy(),
                   np.broadcast_to(np.asarray(past_len, dtype=np.float64), (n,)).copy())


def _base_design(X: np.ndarray) -> np.ndarray:
    idx = {f: i for i, f in enumerate(FEATURES)}
    cols = [np.ones(len(X))] + [X[:, idx[t]] for t in BASE_TERMS[1:]]
    return np.stack(cols, axis=1)


@dataclass
class LatencyPredictor:
    dims: BaseDims
    phase: str
    alpha: float = 0.1  # the upper bound covers 1 - alpha
    boost: str = "auto"  # "auto" (chosen by CV), "on", "off"
    seed: int = 0
    # fitted state
    base_coef: np.ndarray | None = None
    base_scale: np.ndarray | None = None
    transfer_coef: tuple[float, float] | None = None
    prior: LatencyPredictor | None = None
    booster: Any = None
    log_q: float = 0.0
    fit_info: dict[str, Any] = field(default_factory=dict)
    _flat: Any = field(default=None, repr=False)

    # --- base model ---------------------------------------------------------------------
    def _fit_base(self, X: np.ndarray, y: np.ndarray, batch: ConfigBatch, shapes: Shapes) -> None:
        if self.prior is not None:
            p = np.log(self.prior.predict(batch, shapes.seq_len, shapes.past_len))
            A = np.stack([np.ones_like(p), p], axis=1)
            coef, *_ = np.linalg.lstsq(A, np.log(y), rcond=None)
            self.transfer_coef = (float(coef[0]), float(coef[1]))
            return
        D = _base_design(X)
        scale = np.maximum(np.abs(D).max(axis=0), 1e-12)
        Dn = D / scale
        # relative-error least squares: divide each row by its target
        coef, _ = nnls(Dn / y[:, None], np.ones_like(y))
        self.base_coef, self.base_scale = coef, scale

    def _base_predict(self, X: np.ndarray, batch: ConfigBatch, shapes: Shapes) -> np.ndarray:
        if self.transfer_coef is not None:
            assert self.prior is not None
            p = np.log(self.prior.predict(batch, shapes.seq_len, shapes.past_len))
            return np.exp(self.transfer_coef[0] + self.transfer_coef[1] * p)
        D = _base_design(X) / self.base_scale
        return np.maximum(D @ self.base_coef, 1e-6)

    # --- booster ------------------------------------------------------------------------
    def _boost_params(self, n: int) -> dict[str, Any]:
        return {
            "n_estimators": int(min(400, max(50, 4 * n))),
            "max_depth": 3,
            "learning_rate": 0.05,
            "min_child_weight": 2.0,
            "subsample": 0.8,
            "colsample_bytree": 0.8,
            "reg_lambda": 1.0,
            "monotone_constraints": "(" + ",".join("1" if f in MONOTONE else "0" for f in FEATURES) + ")",
            "random_state": self.seed,
            "n_jobs": 1,
            "tree_method": "hist",
        }

    def _fit_boost(self, X: np.ndarray, y: np.ndarray, base: np.ndarray) -> Any:
        import xgboost as xgb

        m = xgb.XGBRegressor(**self._boost_params(len(y)))
        m.fit(X, np.log(y), base_margin=np.log(base))
        return m

    # --- sklearn-style API --------------------------------------------------------------
    def fit(self, batch: ConfigBatch, seq_len: Any, past_len: Any, y_ms: np.ndarray) -> LatencyPredictor:
        y = np.asarray(y_ms, dtype=np.float64)
        n = len(y)
        minimum = MIN_TRAIN_TRANSFER if self.prior is not None else MIN_TRAIN
        if n < minimum:
            raise DataError(f"{n} measurements; the predictor needs at least {minimum}",
                            "profile more sub-networks (profile-device --samples 20)")
        shapes = Shapes.of(n, seq_len, past_len)
        X = feature_matrix(batch, self.dims, self.phase, shapes.seq_len, shapes.past_len)
        use_boost = self.boost == "on" or (self.boost == "auto" and n >= MIN_BOOST)
        oof_base, oof_boost = self._oof(batch, shapes, y, use_boost)
        if self.boost == "auto" and use_boost:
            e_base = np.mean(np.abs(oof_base / y - 1))
            e_boost = np.mean(np.abs(oof_boost / y - 1))
            use_boost = e_boost < e_base
            self.fit_info["cv_mape_base"], self.fit_info["cv_mape_boost"] = float(e_base), float(e_boost)
        oof = oof_boost if use_boost else oof_base
        # split-conformal bound on the out-of-fold log residuals
        r = np.sort(np.log(y) - np.log(oof))
        k = min(n - 1, math.ceil((n + 1) * (1 - self.alpha)) - 1)
        self.log_q = float(max(r[k], 0.0))
        self._fit_base(X, y, batch, shapes)
        self.booster = self._fit_boost(X, y, self._base_predict(X, batch, shapes)) if use_boost else None
        self._flat = None
        self.fit_info.update({"n_train": n, "boosted": use_boost, "conformal_log_q": self.log_q,
                              "cv": accuracy(y, oof)})
        return self

    def _oof(self, batch: ConfigBatch, shapes: Shapes, y: np.ndarray, with_boost: bool) -> tuple[np.ndarray, np.ndarray]:
        """Out-of-fold predictions (5 folds) of the base alone and of base + boost."""
        n = len(y)
        folds = np.random.default_rng(self.seed).permutation(n) % min(5, n)
        base_pred = np.zeros(n)
        boost_pred = np.zeros(n)
        for f in range(folds.max() + 1):
            tr, te = folds != f, folds == f
            sub = LatencyPredictor(self.dims, self.phase, self.alpha, "off", self.seed, prior=self.prior)
            btr, bte = _take(batch, tr), _take(batch, te)
            str_, ste = Shapes(shapes.seq_len[tr], shapes.past_len[tr]), Shapes(shapes.seq_len[te], shapes.past_len[te])
            Xtr = feature_matrix(btr, self.dims, self.phase, str_.seq_len, str_.past_len)
            Xte = feature_matrix(bte, self.dims, self.phase, ste.seq_len, ste.past_len)
            sub._fit_base(Xtr, y[tr], btr, str_)
            base_pred[te] = sub._base_predict(Xte, bte, ste)
            if with_boost:
                booster = sub._fit_boost(Xtr, y[tr], sub._base_predict(Xtr, btr, str_))
                boost_pred[te] = np.exp(booster.predict(Xte, base_margin=np.log(base_pred[te])))
        return base_pred, (boost_pred if with_boost else base_pred)

    def predict(self, batch: ConfigBatch, seq_len: Any, past_len: Any) -> np.ndarray:
        n = len(batch)
        shapes = Shapes.of(n, seq_len, past_len)
        X = feature_matrix(batch, self.dims, self.phase, shapes.seq_len, shapes.past_len)
        base = self._base_predict(X, batch, shapes)
        if self.booster is None:
            return base
        if n <= SMALL_BATCH:  # a search's one-at-a-time call: skip XGBoost's per-call set-up
            if self._flat is None:
                from predictor.trees import FlatTrees

                self._flat = FlatTrees(self.booster.get_booster())
            return np.exp(np.log(base) + self._flat.margin(X))
        return np.exp(self.booster.predict(X, base_margin=np.log(base)))

    def predict_upper(self, batch: ConfigBatch, seq_len: Any, past_len: Any) -> np.ndarray:
        return self.predict(batch, seq_len, past_len) * math.exp(self.log_q)

    def score(self, batch: ConfigBatch, seq_len: Any, past_len: Any, y_ms: np.ndarray) -> dict[str, float]:
        return accuracy(np.asarray(y_ms), self.predict(batch, seq_len, past_len),
                        self.predict_upper(batch, seq_len, past_len))


def _take(batch: ConfigBatch, mask: np.ndarray) -> ConfigBatch:
    return ConfigBatch(batch.kept[mask], batch.kv_groups[mask], batch.heads_per_group[mask], batch.neurons[mask])
