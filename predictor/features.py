"""Features of (sub-network, phase, shape) for latency prediction: one function, versioned.

Configs are handled as a ``ConfigBatch`` of per-layer arrays so that a search can score
hundreds of thousands of candidates per second; every feature is analytic (counts, MACs,
bytes), computed the same way as ``subnets.cost`` does for one config."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from subnets.config import SubnetConfig
from subnets.dims import BaseDims

FEATURE_SCHEMA_VERSION = 1

FEATURES = (
    "layers", "q_heads", "kv_heads", "neurons",
    "heads_per_layer_mean", "heads_per_layer_std", "neurons_per_layer_mean", "neurons_per_layer_std",
    "neurons_per_layer_min", "neurons_per_layer_max",
    "params", "linear_macs", "attention_macs", "lm_head_macs", "weight_bytes", "kv_bytes", "activation_bytes",
    "tokens", "context", "lm_head_share",
)
# Latency never falls when any of these grows (the predictor is constrained so).
MONOTONE = {"layers", "q_heads", "kv_heads", "neurons", "params", "linear_macs", "attention_macs", "lm_head_macs",
            "weight_bytes", "kv_bytes", "activation_bytes", "tokens", "context"}


@dataclass
class ConfigBatch:
    """N sub-networks of one base model as arrays over its L layers (0 where a layer is
    dropped)."""

    kept: np.ndarray  # [N, L] bool
    kv_groups: np.ndarray  # [N, L] int
    heads_per_group: np.ndarray  # [N, L] int
    neurons: np.ndarray  # [N, L] int

    def __len__(self) -> int:
        return int(self.kept.shape[0])

    @classmethod
    def from_configs(cls, configs: list[SubnetConfig], num_layers: int) -> ConfigBatch:
        n = len(configs)
        kept = np.zeros((n, num_layers), dtype=bool)
        kv = np.zeros((n, num_layers), dtype=np.int64)
        hpg = np.zeros((n, num_layers), dtype=np.int64)
        neu = np.zeros((n, num_layers), dtype=np.int64)
        for i, c in enumerate(configs):
            for lc in c.layers:
                kept[i, lc.layer] = True
                kv[i, lc.layer] = lc.kv_groups
                hpg[i, lc.layer] = lc.heads_per_group
                neu[i, lc.layer] = lc.neurons
        return cls(kept, kv, hpg, neu)


def feature_matrix(batch: ConfigBatch, dims: BaseDims, phase: str, seq_len: np.ndarray | int,
                   past_len: np.ndarray | int, dtype_bytes: int = 4) -> np.ndarray:
    """[N, len(FEATURES)] float64 features. ``seq_len``/``past_len`` broadcast over N."""
    n = len(batch)
    seq = np.broadcast_to(np.asarray(seq_len, dtype=np.float64), (n,))
    past = np.broadcast_to(np.asarray(past_len, dtype=np.float64), (n,))
    if phase == "prefill":
        tokens, context, past = seq, seq, np.zeros(n)
    elif phase == "decode":
        tokens, context = np.ones(n), past + 1
    else:
        raise ValueError(f"unknown phase {phase!r}")
    d, hd, v = float(dims.hidden_size), float(dims.head_dim), float(dims.vocab_size)
    kept = batch.kept
    g = np.where(kept, batch.kv_groups, 0).astype(np.float64)
    h = g * np.where(kept, batch.heads_per_group, 0)
    m = np.where(kept, batch.neurons, 0).astype(np.float64)
    layers = kept.sum(1).astype(np.float64)
    q_heads, kv_heads, neurons = h.sum(1), g.sum(1), m.sum(1)
    per_tok = d * hd * (2 * q_heads + 2 * kv_heads) + 3 * d * neurons
    linear = tokens * per_tok
    attention = 2 * q_heads * tokens * context * hd
    lm = np.full(n, d * v)
    bias = (q_heads * hd + 2 * kv_heads * hd + layers * d) if dims.attention_bias else 0.0
    layer_params = per_tok + bias + 2 * d * layers
    embed = v * d * (1 if dims.tie_word_embeddings else 2)
    params = embed + d + layer_params
    weight_bytes = (layer_params + d * v + d) * dtype_bytes + tokens * d * dtype_bytes
    kv_bytes = 2 * kv_heads * hd * (past + tokens) * dtype_bytes
    act = (tokens * (4 * d * layers + 2 * q_heads * hd + 2 * neurons) + q_heads * tokens * context) * dtype_bytes
    safe = np.maximum(layers, 1)
    hl = np.where(kept, h, np.nan)
    ml = np.where(kept, m, np.nan)
    with np.errstate(invalid="ignore", all="ignore"):
        cols = [
            layers, q_heads, kv_heads, neurons,
            q_heads / safe, np.nan_to_num(np.nanstd(hl, axis=1)), neurons / safe, np.nan_to_num(np.nanstd(ml, axis=1)),
            np.nan_to_num(np.nanmin(ml, axis=1)), np.nan_to_num(np.nanmax(ml, axis=1)),
            params, linear, attention, lm, weight_bytes, kv_bytes, act,
            tokens, context, lm / (linear + attention + lm),
        ]
    return np.stack(cols, axis=1)
