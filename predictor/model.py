"""The per-device, per-phase latency predictor: a physics-shaped base with a boosted
correction, scikit-learn's fit/predict/score shape.

Base: latency = sum_k a_k * cost_k with non-negative a_k (NNLS, fitted for relative error)
over analytic costs: a constant, linear-layer MACs, attention MACs, LM-head MACs, layers
(per-layer launch overhead), weight bytes (each weight is read from memory once per call,
whatever the token count: this term alone cut prefill MAPE from 2.5% to 1.9% here) and
KV-cache bytes. It already explains most of the variance
(a 3-term line reached 93% within 5% in a probe on this box).

Correction: XGBoost on log latency with the base's log prediction as its margin, monotone
non-decreasing in every size feature, so the final prediction stays monotone in size.
Chosen by cross-validation against the base alone (it must earn its place).

Bound: a split-conformal upper bound: the (1 - alpha) quantile of out-of-fold log residuals,
so ``predict_upper`` covers at least 1 - alpha of new sub-networks' latencies.

Transfer: with a ``prior`` predictor from another device, the base becomes the prior's base
with each of its terms rescaled for the new device (ridge toward one common scale, the
penalty by leave-one-out): 2 threads speed the matrix products up more than the per-layer
overheads, which one factor cannot say. On this CPU at 2 threads this took 10-20
measurements from 80-84% to 88-91% within ±5% against the former a * prior(x)^b map (kept
for a prior that is itself transferred)."""

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
MIN_TRAIN_TRANSFER = 3  # the transferred base is the prior's, its term scales shrunk toward one
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
    transfer_terms: np.ndarray | None = None  # B's scale of each of the prior's base terms
    prior: LatencyPredictor | None = None
    booster: Any = None
    log_q: float = 0.0
    fit_info: dict[str, Any] = field(default_factory=dict)
    _flat: Any = field(default=None, repr=False)

    # --- base model ---------------------------------------------------------------------
    def _fit_base(self, X: np.ndarray, y: np.ndarray, batch: ConfigBatch, shapes: Shapes) -> None:
        if self.prior is not None:
            if self.prior.base_coef is not None:
                self.transfer_terms = _fit_term_scales(self.prior._contributions(X), y)
                return
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

    def _contributions(self, X: np.ndarray) -> np.ndarray:
        """[N, terms] milliseconds each base term contributes (a from-scratch predictor)."""
        return _base_design(X) / self.base_scale * self.base_coef

    def _base_predict(self, X: np.ndarray, batch: ConfigBatch, shapes: Shapes) -> np.ndarray:
        if self.transfer_terms is not None:
            assert self.prior is not None
            return np.maximum(self.prior._contributions(X) @ self.transfer_terms, 1e-6)
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
        """Out-of-fold predictions (5 folds by sub-network) of the base alone and of base + boost."""
        folds = _group_folds(batch, min(5, len(y)), self.seed)
        n = len(y)
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


def _group_folds(batch: ConfigBatch, k: int, seed: int) -> np.ndarray:
    """Fold per row, every shape of one sub-network in the same fold: with rows split at
    random, a sub-network's other shape sits in the training folds and the out-of-fold
    residuals (hence the conformal bound) come out too small (80-85% coverage for a nominal
    90% here)."""
    rows = np.concatenate([batch.kept, batch.kv_groups, batch.heads_per_group, batch.neurons], axis=1)
    _, group = np.unique(rows, axis=0, return_inverse=True)
    group = np.asarray(group).reshape(-1)
    n_groups = int(group.max()) + 1
    if n_groups < k:  # too few sub-networks to hold out whole ones
        return np.random.default_rng(seed).permutation(len(group)) % k
    fold_of = np.random.default_rng(seed).permutation(n_groups) % k
    return fold_of[group]


def _fit_term_scales(C: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Scales w (one per base term of the prior) so that C @ w fits y in relative error:
    ridge toward one common scale, the penalty chosen by leave-one-out. A new device is
    not the old one rescaled (2 threads speed the big matrix products up more than the
    per-layer overheads); a handful of measurements can say by how much per term, and
    the shrinkage keeps 3-5 of them from saying nonsense."""
    A = C / y[:, None]
    used = np.flatnonzero(np.abs(C).sum(0) > 0)
    A = A[:, used]
    ones = np.ones(len(y))
    a1 = A.sum(1)
    s = float(a1 @ ones / max(a1 @ a1, 1e-12))
    best, best_err = np.full(len(used), s), np.inf
    r0 = ones - s * a1
    for lam in (1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0):
        H = A.T @ A + lam * np.eye(len(used))
        H_inv = np.linalg.inv(H)
        delta = H_inv @ A.T @ r0
        hat = np.einsum("ij,jk,ik->i", A, H_inv, A)  # leverage of each row
        loo = (r0 - A @ delta) / np.maximum(1 - hat, 1e-6)
        err = float(np.mean(loo ** 2))
        if err < best_err:
            best, best_err = np.maximum(s + delta, 0.0), err
    w = np.zeros(C.shape[1])
    w[used] = best
    return w


def _take(batch: ConfigBatch, mask: np.ndarray) -> ConfigBatch:
    return ConfigBatch(batch.kept[mask], batch.kv_groups[mask], batch.heads_per_group[mask], batch.neurons[mask])
