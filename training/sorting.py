"""Importance sorting: the base model's units reordered so that every sub-network a config
names is a prefix slice of the same weights.

Extraction keeps, per layer, the top KV groups (by the sum of their heads' scores), the top
query heads within each kept group, and the top MLP neurons (``subnets.importance``). After
sorting, KV group j is the j-th most important, head i of a group its i-th most important,
and neuron n the n-th most important, so those kept sets are the first groups, the first
heads of each group and the first neurons. Attention sums over heads and the MLP over
neurons, so the reordered model computes the same function."""

from __future__ import annotations

import numpy as np
import torch

from subnets.importance import Importance


def _order(scores: np.ndarray) -> np.ndarray:
    """Indices by descending score, ties by index: the order ``Importance`` keeps units in."""
    return np.lexsort((np.arange(len(scores)), -scores))


def head_order(importance: Importance, layer: int, num_kv_heads: int) -> tuple[np.ndarray, np.ndarray]:
    """(group order [G], query-head order [H]) of one layer: new head j*per+i is old head
    group_order[j]*per + (the i-th best head of that group)."""
    s = importance.head_scores[layer]
    per = len(s) // num_kv_heads
    groups = s.reshape(num_kv_heads, per)
    g_order = _order(groups.sum(1))
    heads = np.concatenate([g * per + _order(groups[g]) for g in g_order])
    return g_order, heads


def _rows(blocks: np.ndarray, size: int) -> torch.Tensor:
    """Row indices of whole blocks of ``size`` rows, in the order ``blocks`` gives."""
    return torch.as_tensor((blocks[:, None] * size + np.arange(size)[None, :]).reshape(-1))


@torch.no_grad()
def _permute(linear: torch.nn.Module, idx: torch.Tensor, dim: int) -> None:
    linear.weight.copy_(linear.weight.index_select(dim, idx))
    if dim == 0 and getattr(linear, "bias", None) is not None:
        linear.bias.copy_(linear.bias.index_select(0, idx))


@torch.no_grad()
def sort_by_importance(model: torch.nn.Module, importance: Importance, num_kv_heads: int, head_dim: int) -> None:
    """Reorder ``model``'s heads, KV groups and neurons in place, most important first."""
    for i, layer in enumerate(model.model.layers):
        attn, mlp = layer.self_attn, layer.mlp
        groups, heads = head_order(importance, i, num_kv_heads)
        q_rows, kv_rows = _rows(heads, head_dim), _rows(groups, head_dim)
        _permute(attn.q_proj, q_rows, 0)
        _permute(attn.k_proj, kv_rows, 0)
        _permute(attn.v_proj, kv_rows, 0)
        _permute(attn.o_proj, q_rows, 1)
        neurons = torch.as_tensor(_order(importance.neuron_scores[i]))
        _permute(mlp.gate_proj, neurons, 0)
        _permute(mlp.up_proj, neurons, 0)
        _permute(mlp.down_proj, neurons, 1)


def prefix_importance(importance: Importance, num_kv_heads: int) -> Importance:
    """The importance of a sorted model: every ranking is the identity, so extraction keeps
    prefixes. Block influence (which layers a search keeps first) is the base model's."""
    heads = []
    for s in importance.head_scores:
        per = len(s) // num_kv_heads
        g, i = np.divmod(np.arange(len(s)), per)
        # group sums fall with the group index, heads within a group with their index
        heads.append(((num_kv_heads - g) * (per + 1) * per + (per - i)).astype(np.float64))
    neurons = [np.arange(len(s), 0, -1, dtype=np.float64) for s in importance.neuron_scores]
    return Importance(importance.base_id, f"prefix({importance.method})", neurons, heads,
                      np.asarray(importance.block_influence, dtype=np.float64).copy(), dict(importance.calibration))
