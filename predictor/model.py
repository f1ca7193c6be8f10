"""The model inside each per-device, per-phase latency predictor: a physics-shaped base with
a boosted correction and a CV+ bound, over a ``ConfigBatch`` and the phase's shapes. Users
and the search hold it through ``predictor.estimator.LatencyEstimator``, the scikit-learn
estimator (``fit(X, y)``, ``predict(X)``, ``score(X, y)`` as R^2); ``metrics`` here gives the
suite's accuracy table (within ±5%/±10%, MAPE, Kendall tau, bound coverage).

Base: latency = sum_k a_k * cost_k with non-negative a_k (NNLS, fitted for relative error)
over analytic costs: a constant, linear-layer MACs, attention MACs, LM-head MACs, layers
(per-layer launch overhead), weight bytes (each weight is read from memory once per call,
whatever the token count: this term alone cut prefill MAPE from 2.5% to 1.9% here) and
KV-cache bytes. It already explains most of the variance
(a 3-term line reached 93% within 5% in a probe on this box). With few sub-networks those
seven coefficients fit noise, so the base is one of ``BASES`` (the full one, or a
baseline's shape: all MACs under one coefficient, MACs and layers, bytes), the one with the
least error leaving one sub-network out at a time: where a baseline's shape predicts
held-out sub-networks best, the predictor takes that shape, and says so (``model_form``).

Correction: XGBoost on log latency with the base's log prediction as its margin, monotone
non-decreasing in every size feature, so the final prediction stays monotone in size.
Chosen by cross-validation against the base alone (it must earn its place).

Bound: CV+ (Barber et al. 2021) by sub-network. The measured sub-networks are split into
K folds; each fold's model is fitted without it, and each held-out sub-network scores the
largest log residual over its shapes. The bound for a new sub-network is the
ceil((1 - alpha)(G + 1))-th smallest of {fold model's log prediction + score} over the G
scores, so it holds for all of its shapes at once. Guarantee: coverage >= 1 - 2 alpha for a
sub-network exchangeable with the measured ones (CV+ theorem; about 1 - alpha in practice,
tested). With fewer than 1/alpha - 1 sub-networks that rank does not exist: the bound is the
largest value, and ``coverage`` states the lower guarantee that gives. The choice of booster
or base is made inside each fold by an inner cross-validation, so the scores that calibrate
the bound never chose the model they judge.

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
from subnets.dims import BaseDims

log = logging.getLogger(__name__)

BASE_TERMS = ("const", "linear_macs", "attention_macs", "lm_head_macs", "layers", "weight_bytes", "kv_bytes")
# The bases an inner cross-validation chooses from, each a tuple of term groups (a group's
# terms share one coefficient). With the main job's 8-13 sub-networks per phase the full
# base's 7 coefficients fit noise: on a busy machine it lost to linear-in-FLOPs on decode
# (MAPE 12.7% vs 8.2%), which two coefficients cannot overfit. The full base wins where
# there is data for it; each smaller one is a baseline's shape, fitted the predictor's way.
BASES: dict[str, tuple[tuple[str, ...], ...]] = {
    "physics": tuple((t,) for t in BASE_TERMS),
    "FLOPs": (("const",), ("linear_macs", "attention_macs", "lm_head_macs")),
    "MACs and layers": (("const",), ("linear_macs",), ("attention_macs",), ("layers",)),
    "bytes": (("const",), ("weight_bytes", "kv_bytes")),
}
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
class BoostedCostModel:
    dims: BaseDims
    phase: str
    alpha: float = 0.1  # the upper bound covers 1 - alpha
    boost: str = "auto"  # "auto" (chosen by CV), "on", "off"
    seed: int = 0
    base: str = "auto"  # a name in BASES, or "auto": chosen by an inner cross-validation
    # fitted state
    base_used: str = "physics"
    base_coef: np.ndarray | None = None
    base_scale: np.ndarray | None = None
    transfer_coef: tuple[float, float] | None = None
    transfer_terms: np.ndarray | None = None  # B's scale of each of the prior's base terms
    prior: BoostedCostModel | None = None
    booster: Any = None
    folds: list[BoostedCostModel] = field(default_factory=list)  # CV+: the model fitted without fold k
    scores: np.ndarray | None = None  # per held-out sub-network: its largest log residual
    score_fold: np.ndarray | None = None  # the fold each score was held out in
    fit_info: dict[str, Any] = field(default_factory=dict)
    _flat: Any = field(default=None, repr=False)

    # --- base model ---------------------------------------------------------------------
    def _fit_base(self, X: np.ndarray, y: np.ndarray, batch: ConfigBatch, shapes: Shapes) -> None:
        if self.prior is not None:
            if self.prior.base_coef is not None:
                self.transfer_terms = _fit_term_scales(self.prior._shaped_contributions(X), y)
                return
            p = np.log(self.prior.predict(batch, shapes.seq_len, shapes.past_len))
            A = np.stack([np.ones_like(p), p], axis=1)
            coef, *_ = np.linalg.lstsq(A, np.log(y), rcond=None)
            self.transfer_coef = (float(coef[0]), float(coef[1]))
            return
        self.base_coef, self.base_scale = _fit_terms(_base_design(X), y, BASES[self.base_used])

    def _contributions(self, X: np.ndarray) -> np.ndarray:
        """[N, terms] milliseconds each base term contributes (a from-scratch predictor)."""
        return _base_design(X) / self.base_scale * self.base_coef

    def _shaped_contributions(self, X: np.ndarray) -> np.ndarray:
        """The base terms times this predictor's boosted correction: what a transfer rescales,
        so the source device's learned non-linearity (a roofline's bend) carries over."""
        return self._contributions(X) * np.exp(self._margin(X))[:, None]

    def _margin(self, X: np.ndarray) -> np.ndarray:
        """The booster's log correction over the base (zero without one)."""
        if self.booster is None:
            return np.zeros(len(X))
        if len(X) <= SMALL_BATCH:  # a search's one-at-a-time call: skip XGBoost's per-call set-up
            if self._flat is None:
                from predictor.trees import FlatTrees

                self._flat = FlatTrees(self.booster.get_booster())
            return self._flat.margin(X)
        return self.booster.predict(X, base_margin=np.zeros(len(X)))

    def _base_predict(self, X: np.ndarray, batch: ConfigBatch, shapes: Shapes) -> np.ndarray:
        if self.transfer_terms is not None:
            assert self.prior is not None
            return np.maximum(self.prior._shaped_contributions(X) @ self.transfer_terms, 1e-6)
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

    # --- fitting ------------------------------------------------------------------------
    def fit(self, batch: ConfigBatch, seq_len: Any, past_len: Any, y_ms: np.ndarray) -> BoostedCostModel:
        """Fit on all measurements, and the CV+ fold models and scores of the bound."""
        y = np.asarray(y_ms, dtype=np.float64)
        n = len(y)
        minimum = MIN_TRAIN_TRANSFER if self.prior is not None else MIN_TRAIN
        if n < minimum:
            raise DataError(f"{n} measurements; the predictor needs at least {minimum}",
                            "profile more sub-networks (profile-device --samples 20)")
        if self.base != "auto" and self.base not in BASES:
            raise DataError(f"unknown predictor base {self.base!r}", f"use 'auto' or one of {', '.join(BASES)}")
        shapes = Shapes.of(n, seq_len, past_len)
        group = _groups(batch)
        n_groups = int(group.max()) + 1
        if n_groups < 2:
            raise DataError(f"all {n} measurements are of one sub-network: the bound needs held-out sub-networks",
                            "profile more sub-networks (profile-device --samples 20)")
        k = min(5, n_groups)
        fold_of = np.random.default_rng(self.seed).permutation(n_groups) % k
        folds = fold_of[group]
        oof = np.zeros(n)
        self.folds = []
        for f in range(k):
            tr, te = folds != f, folds == f
            sub = BoostedCostModel(self.dims, self.phase, self.alpha, self.boost, self.seed, self.base, prior=self.prior)
            sub._fit_once(_take(batch, tr), Shapes(shapes.seq_len[tr], shapes.past_len[tr]), y[tr])
            oof[te] = sub.predict(_take(batch, te), shapes.seq_len[te], shapes.past_len[te])
            self.folds.append(sub)
        r = np.log(y) - np.log(oof)
        self.scores = np.array([r[group == g].max() for g in range(n_groups)])
        self.score_fold = fold_of
        self._fit_once(batch, shapes, y)
        self.fit_info.update({"n_train": n, "boosted": self.booster is not None, "cv": accuracy(y, oof),
                              "base": "transferred" if self.prior is not None else self.base_used,
                              "bound": self.coverage()})
        return self

    def _fit_once(self, batch: ConfigBatch, shapes: Shapes, y: np.ndarray) -> None:
        """Base, and the booster where an inner cross-validation says it helps."""
        X = feature_matrix(batch, self.dims, self.phase, shapes.seq_len, shapes.past_len)
        if self.prior is None:
            self.base_used = self.base if self.base != "auto" else self._choose_base(X, y, _groups(batch))
        use_boost = self.boost == "on" or (self.boost == "auto" and len(y) >= MIN_BOOST)
        if self.boost == "auto" and use_boost:
            oof_base, oof_boost = self._oof(batch, shapes, y, True)
            e_base = float(np.mean(np.abs(oof_base / y - 1)))
            e_boost = float(np.mean(np.abs(oof_boost / y - 1)))
            use_boost = e_boost < e_base
            self.fit_info["cv_mape_base"], self.fit_info["cv_mape_boost"] = e_base, e_boost
        self._fit_base(X, y, batch, shapes)
        self.booster = self._fit_boost(X, y, self._base_predict(X, batch, shapes)) if use_boost else None
        self._flat = None

    def _choose_base(self, X: np.ndarray, y: np.ndarray, group: np.ndarray) -> str:
        """The base with the smallest held-out log error, leaving out one sub-network at a
        time (a few linear fits each; five folds past 40 sub-networks). Ties keep the first,
        the full physics base."""
        D, n_groups = _base_design(X), int(group.max()) + 1
        folds = group if n_groups <= 40 else (np.random.default_rng(self.seed + 2).permutation(n_groups) % 5)[group]
        errors = {}
        for name, terms in BASES.items():
            pred = np.zeros(len(y))
            for f in np.unique(folds):
                tr, te = folds != f, folds == f
                coef, scale = _fit_terms(D[tr], y[tr], terms)
                pred[te] = np.maximum(D[te] / scale @ coef, 1e-6)
            errors[name] = float(np.mean(np.abs(np.log(pred / y))))
        self.fit_info["cv_base_error"] = errors
        return min(errors, key=lambda k: (errors[k], list(BASES).index(k)))

    def coverage(self, alpha: float | None = None) -> dict[str, Any]:
        """What the bound at ``alpha`` promises, with this many held-out sub-networks."""
        a = self.alpha if alpha is None else alpha
        g = 0 if self.scores is None else len(self.scores)
        exact = g > 0 and math.ceil((1 - a) * (g + 1)) <= g
        a_eff = a if exact else 1.0 / (g + 1)
        return {"method": "CV+ by sub-network", "alpha": a, "nominal": 1 - a, "sub_networks": g,
                "guaranteed": max(0.0, 1 - 2 * a_eff), "widened": not exact}

    def _oof(self, batch: ConfigBatch, shapes: Shapes, y: np.ndarray, with_boost: bool) -> tuple[np.ndarray, np.ndarray]:
        """Inner out-of-fold predictions (3 folds by sub-network) of the base alone and of base + boost."""
        group = _groups(batch)
        k = min(3, int(group.max()) + 1)
        folds = (np.random.default_rng(self.seed + 1).permutation(int(group.max()) + 1) % k)[group]
        n = len(y)
        base_pred = np.zeros(n)
        boost_pred = np.zeros(n)
        for f in range(k):
            tr, te = folds != f, folds == f
            sub = BoostedCostModel(self.dims, self.phase, self.alpha, "off", self.seed, self.base_used, prior=self.prior)
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
        shapes = Shapes.of(len(batch), seq_len, past_len)
        X = feature_matrix(batch, self.dims, self.phase, shapes.seq_len, shapes.past_len)
        return self._predict_features(X, batch, shapes)

    def _predict_features(self, X: np.ndarray, batch: ConfigBatch, shapes: Shapes) -> np.ndarray:
        base = self._base_predict(X, batch, shapes)
        return base if self.booster is None else np.exp(np.log(base) + self._margin(X))

    def predict_upper(self, batch: ConfigBatch, seq_len: Any, past_len: Any, alpha: float | None = None) -> np.ndarray:
        """The CV+ upper bound at level 1 - ``alpha`` (default: the predictor's alpha)."""
        if not self.folds or self.scores is None or self.score_fold is None:
            raise DataError("this predictor has no bound (it was not fitted with cross-validation folds)",
                            "retrain it with train-predictor")
        a = self.alpha if alpha is None else alpha
        shapes = Shapes.of(len(batch), seq_len, past_len)
        X = feature_matrix(batch, self.dims, self.phase, shapes.seq_len, shapes.past_len)  # shared by the folds
        logs = np.stack([np.log(f._predict_features(X, batch, shapes)) for f in self.folds])
        vals = logs[self.score_fold] + self.scores[:, None]
        g = len(self.scores)
        rank = min(math.ceil((1 - a) * (g + 1)), g)  # beyond the scores: the widest there is
        return np.exp(np.partition(vals, rank - 1, axis=0)[rank - 1])

    def metrics(self, batch: ConfigBatch, seq_len: Any, past_len: Any, y_ms: np.ndarray) -> dict[str, float]:
        return accuracy(np.asarray(y_ms), self.predict(batch, seq_len, past_len),
                        self.predict_upper(batch, seq_len, past_len))


def model_form(fit_info: dict[str, Any]) -> str:
    """What a fitted predictor is made of, in words (from its ``fit_info``, as saved)."""
    base = fit_info.get("base", "physics")
    if base == "transferred":
        text = "base: the prior device's, rescaled per term"
    else:
        errors = fit_info.get("cv_base_error") or {}
        text = f"base: {base}" + (" (least held-out error of " + ", ".join(
            f"{k} {v:.1%}" for k, v in errors.items()) + ")" if errors else "")
    if fit_info.get("boosted"):
        return text + "; boosted correction on"
    why = (f"fewer than {MIN_BOOST} measurements" if fit_info.get("n_train", 0) < MIN_BOOST
           else "it did not lower the held-out error" if "cv_mape_boost" in fit_info else "turned off")
    return text + f"; no boosted correction ({why})"


def _groups(batch: ConfigBatch) -> np.ndarray:
    """The sub-network of each row: all its shapes are held out together (with rows split at
    random, a sub-network's other shape sits in the training folds and the residuals, hence
    the bound, come out too small: 80-85% coverage for a nominal 90% here)."""
    rows = np.concatenate([batch.kept, batch.kv_groups, batch.heads_per_group, batch.neurons], axis=1)
    _, group = np.unique(rows, axis=0, return_inverse=True)
    return np.asarray(group).reshape(-1)


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


def _fit_terms(D: np.ndarray, y: np.ndarray, groups: tuple[tuple[str, ...], ...]) -> tuple[np.ndarray, np.ndarray]:
    """(coefficients, scales) over all BASE_TERMS, non-negative, fitted for relative error,
    the terms of a group sharing one coefficient (in their own units) and a term in no group
    held at zero."""
    idx = [[BASE_TERMS.index(t) for t in g] for g in groups]
    G = np.stack([D[:, i].sum(axis=1) for i in idx], axis=1)
    scale = np.maximum(np.abs(G).max(axis=0), 1e-12)
    c, _ = nnls(G / scale / y[:, None], np.ones_like(y))  # each row divided by its target
    coef = np.zeros(D.shape[1])
    for i, v in zip(idx, c / scale):
        coef[i] = v
    return coef, np.ones(D.shape[1])


def _take(batch: ConfigBatch, mask: np.ndarray) -> ConfigBatch:
    return ConfigBatch(batch.kept[mask], batch.kv_groups[mask], batch.heads_per_group[mask], batch.neurons[mask])
