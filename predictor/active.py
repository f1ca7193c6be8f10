"""Active profiling: which sub-networks to measure next.

A bootstrap ensemble (over measured sub-networks) of the predictor's physics-shaped base is
fitted to what the device has measured; the candidates on which the ensemble disagrees most
(standard deviation of the log prediction) are where a new measurement teaches the predictor
most. Greedy selection with a diversity rule keeps a batch from piling onto one corner.

Over the whole space this saves little here (active at 14 sub-networks about matches random
at 18, within draw noise): the physics-shaped base is pinned down by ~10 random
sub-networks, and random picks match a random test set well. What a search needs is
accuracy near its latency budget; with ``near`` (a share of the full model's predicted
latency, as search's ``--budget-share``) the choice is made among the candidates the current
predictor puts within ``band`` of that latency, which is where the search's constraint
decides (benchmarks/active_profiling.py --near)."""

from __future__ import annotations

from typing import Any

import numpy as np

from predictor.data import Measurements
from predictor.features import ConfigBatch, feature_matrix
from predictor.model import BoostedCostModel, Shapes
from subnets.config import SubnetConfig
from subnets.cost import count_params

BAND = 0.15  # the region that matters: within 15% of the budget latency


def uncertainty(m: Measurements, batch: ConfigBatch, seq_len: Any, past_len: Any, k: int = 8, seed: int = 0) -> np.ndarray:
    """Std of the log predicted latency over ``k`` bootstrap fits of the base, per candidate."""
    rng = np.random.default_rng(seed)
    groups = np.array(sorted(set(m.subnet_hashes.tolist())))
    X_cand = feature_matrix(batch, m.dims, m.phase, seq_len, past_len)
    preds = []
    for _ in range(k):
        drawn = rng.choice(groups, len(groups), replace=True)
        rows = np.concatenate([np.flatnonzero(m.subnet_hashes == g) for g in drawn])
        X = feature_matrix(m.batch, m.dims, m.phase, m.seq_len, m.past_len)[rows]
        p = BoostedCostModel(m.dims, m.phase, boost="off")
        sub_batch = ConfigBatch(*(a[rows] for a in (m.batch.kept, m.batch.kv_groups, m.batch.heads_per_group,
                                                    m.batch.neurons)))
        p._fit_base(X, m.y_ms[rows], sub_batch, Shapes(m.seq_len[rows], m.past_len[rows]))
        preds.append(np.log(p._base_predict(X_cand, batch, Shapes.of(len(batch), seq_len, past_len))))
    return np.std(np.stack(preds), axis=0)


def full_config(m: Measurements) -> SubnetConfig:
    d = m.dims
    return SubnetConfig.uniform(m.base_id, range(d.num_layers), d.num_kv_heads, d.heads_per_group, d.intermediate_size)


def near_budget(m: Measurements, candidates: list[SubnetConfig], share: float, seq_len: Any, past_len: Any,
                band: float = BAND, seed: int = 0) -> list[SubnetConfig]:
    """The candidates a predictor fitted to ``m`` puts within ``band`` (relative) of ``share``
    x the full model's predicted latency."""
    p = BoostedCostModel(m.dims, m.phase, seed=seed).fit(m.batch, m.seq_len, m.past_len, m.y_ms)
    target = share * float(p.predict(ConfigBatch.from_configs([full_config(m)], m.dims.num_layers), seq_len, past_len)[0])
    pred = p.predict(ConfigBatch.from_configs(candidates, m.dims.num_layers), seq_len, past_len)
    return [c for c, v in zip(candidates, pred) if abs(v / target - 1) <= band]


def select(m: Measurements, candidates: list[SubnetConfig], n: int, seq_len: Any, past_len: Any,
           seed: int = 0, near: float | None = None, band: float = BAND) -> list[SubnetConfig]:
    """The ``n`` candidates the measurements know least about, spread out: each pick differs
    in parameter count by at least 2% from the picks before it. With ``near``, chosen among
    those predicted within ``band`` of ``near`` x the full model's latency first, the rest
    (if that region has too few) from everywhere."""
    measured = set(m.subnet_hashes.tolist())
    cands = [c for c in candidates if c.config_hash() not in measured]
    if not cands or n < 1:
        return []
    if near is not None:
        region = near_budget(m, cands, near, seq_len, past_len, band, seed)
        picks = select(m, region, n, seq_len, past_len, seed) if region else []
        if len(picks) < n:
            taken = {c.config_hash() for c in picks}
            picks += select(m, [c for c in cands if c.config_hash() not in taken], n - len(picks), seq_len, past_len, seed)
        return picks
    u = uncertainty(m, ConfigBatch.from_configs(cands, m.dims.num_layers), seq_len, past_len, seed=seed)
    params = np.array([count_params(c, m.dims) for c in cands], dtype=np.float64)
    chosen: list[int] = []
    for i in np.argsort(-u, kind="stable"):
        if all(abs(params[i] / params[j] - 1) >= 0.02 for j in chosen):
            chosen.append(int(i))
            if len(chosen) == n:
                break
    return [cands[i] for i in chosen]
