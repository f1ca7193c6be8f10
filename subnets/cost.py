"""Analytic size and cost of a sub-network: parameters, MACs/FLOPs and bytes moved.

These follow the exported ONNX graphs: the prefill graph computes the full S x S attention
score matrix (masked, not skipped) and the LM head on the last position only; a decode step
attends over P past positions plus itself."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Literal

from subnets.config import LayerChoice, SubnetConfig
from subnets.dims import BaseDims

Phase = Literal["prefill", "decode"]


@dataclass(frozen=True)
class Cost:
    """Cost of one forward pass of ``phase`` at a shape, batch 1 unless stated."""

    phase: str
    seq_len: int
    past_len: int
    params: int
    linear_macs: int
    attention_macs: int
    lm_head_macs: int
    weight_bytes: int
    kv_cache_bytes: int  # the KV cache read by this pass (past), plus what it writes
    activation_bytes: int

    @property
    def macs(self) -> int:
        return self.linear_macs + self.attention_macs + self.lm_head_macs

    @property
    def flops(self) -> int:
        return 2 * self.macs

    @property
    def bytes_moved(self) -> int:
        return self.weight_bytes + self.kv_cache_bytes + self.activation_bytes

    def to_dict(self) -> dict[str, int | str]:
        d = asdict(self)
        d.update(macs=self.macs, flops=self.flops, bytes_moved=self.bytes_moved)
        return d


def layer_params(lc: LayerChoice, dims: BaseDims) -> int:
    d, hd = dims.hidden_size, dims.head_dim
    q = lc.num_heads * hd
    kv = lc.kv_groups * hd
    attn = d * q + 2 * d * kv + q * d
    if dims.attention_bias:
        attn += q + 2 * kv + d
    mlp = 3 * d * lc.neurons + (2 * lc.neurons + d if dims.mlp_bias else 0)
    return attn + mlp + 2 * d  # two RMSNorm weights


def count_params(config: SubnetConfig, dims: BaseDims) -> int:
    embed = dims.vocab_size * dims.hidden_size
    head = 0 if dims.tie_word_embeddings else embed
    return embed + head + dims.hidden_size + sum(layer_params(lc, dims) for lc in config.layers)


def cost(
    config: SubnetConfig,
    dims: BaseDims,
    phase: Phase,
    seq_len: int = 128,
    past_len: int = 0,
    batch: int = 1,
    dtype_bytes: int = 4,
) -> Cost:
    """Cost of a prefill over ``seq_len`` tokens, or of one decode step after ``past_len``."""
    if phase == "prefill":
        tokens, context, past = seq_len, seq_len, 0
    elif phase == "decode":
        tokens, context, past = 1, past_len + 1, past_len
    else:
        raise ValueError(f"unknown phase {phase!r}")
    d, hd, v = dims.hidden_size, dims.head_dim, dims.vocab_size
    linear = attention = kv_bytes = act = 0
    weight_params = 0
    for lc in config.layers:
        h, g, n = lc.num_heads, lc.kv_groups, lc.neurons
        per_token = d * h * hd + 2 * d * g * hd + h * hd * d + 3 * d * n
        linear += tokens * per_token
        attention += 2 * h * tokens * context * hd
        weight_params += layer_params(lc, dims)
        kv_bytes += 2 * g * hd * (past + tokens) * dtype_bytes
        # residual stream in/out, q, attention scores, MLP hidden (dominant activations)
        act += tokens * (4 * d + 2 * h * hd + 2 * n) * dtype_bytes + h * tokens * context * dtype_bytes
    lm_head = d * v
    weight_bytes = (weight_params + lm_head + d) * dtype_bytes + tokens * d * dtype_bytes
    return Cost(
        phase=phase,
        seq_len=seq_len if phase == "prefill" else 1,
        past_len=past,
        params=count_params(config, dims),
        linear_macs=batch * linear,
        attention_macs=batch * attention,
        lm_head_macs=batch * lm_head,
        weight_bytes=weight_bytes,
        kv_cache_bytes=batch * kv_bytes,
        activation_bytes=batch * act,
    )
