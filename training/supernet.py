"""The super-network view: any sub-network's forward pass over the shared, importance-sorted
weights of one base model, by prefix slices.

For a ``SubnetConfig`` each kept layer uses its first ``kv_groups`` KV groups, the first
``heads_per_group`` query heads of each of them, and its first ``neurons`` MLP neurons (see
``training.sorting``). The slices are views of the full-size parameters, so a backward pass
puts gradients into the shared weights and exactly zero into every unit the config drops.
With ``config=None`` the wrapped model runs its own forward (a dense model being
fine-tuned)."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from subnets.config import LayerChoice, SubnetConfig
from subnets.dims import BaseDims


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return F.linear(x, weight, bias)


class SuperNetwork(nn.Module):
    """A causal LM (``LlamaForCausalLM``-shaped, importance-sorted) whose every sub-network
    can be run by prefix slicing. Parameters are the wrapped model's."""

    def __init__(self, model: nn.Module, dims: BaseDims | None = None) -> None:
        super().__init__()
        self.model = model
        self.dims = dims

    # --- slicing -------------------------------------------------------------------------
    def _attention(self, layer: nn.Module, x: torch.Tensor, lc: LayerChoice, cos: torch.Tensor,
                   sin: torch.Tensor) -> torch.Tensor:
        d = self.dims
        attn = layer.self_attn
        G, per, hd, hidden = d.num_kv_heads, d.heads_per_group, d.head_dim, d.hidden_size
        g, h = lc.kv_groups, lc.heads_per_group
        nq = g * h

        def q_slice(t: torch.Tensor) -> torch.Tensor:  # rows of [G, per, hd, ...] -> first g groups, h heads each
            return t.view(G, per, hd, *t.shape[1:])[:g, :h].reshape(nq * hd, *t.shape[1:])

        qb, kb, vb = (getattr(m, "bias", None) for m in (attn.q_proj, attn.k_proj, attn.v_proj))
        q = _linear(x, q_slice(attn.q_proj.weight), None if qb is None else q_slice(qb))
        k = _linear(x, attn.k_proj.weight[: g * hd], None if kb is None else kb[: g * hd])
        v = _linear(x, attn.v_proj.weight[: g * hd], None if vb is None else vb[: g * hd])
        B, S = x.shape[:2]
        q = q.view(B, S, nq, hd).transpose(1, 2)
        k = k.view(B, S, g, hd).transpose(1, 2)
        v = v.view(B, S, g, hd).transpose(1, 2)
        c, s = cos.unsqueeze(1), sin.unsqueeze(1)
        q = q * c + _rotate_half(q) * s
        k = k * c + _rotate_half(k) * s
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=hd**-0.5, enable_gqa=h > 1)
        out = out.transpose(1, 2).reshape(B, S, nq * hd)
        w_o = attn.o_proj.weight.view(hidden, G, per, hd)[:, :g, :h].reshape(hidden, nq * hd)
        return _linear(out, w_o, getattr(attn.o_proj, "bias", None))

    def _mlp(self, layer: nn.Module, x: torch.Tensor, n: int) -> torch.Tensor:
        mlp = layer.mlp
        gb, ub = getattr(mlp.gate_proj, "bias", None), getattr(mlp.up_proj, "bias", None)
        gate = _linear(x, mlp.gate_proj.weight[:n], None if gb is None else gb[:n])
        up = _linear(x, mlp.up_proj.weight[:n], None if ub is None else ub[:n])
        return _linear(mlp.act_fn(gate) * up, mlp.down_proj.weight[:, :n], getattr(mlp.down_proj, "bias", None))

    def sliced_forward(self, input_ids: torch.Tensor, config: SubnetConfig) -> torch.Tensor:
        """Logits [B, S, vocab] of ``config`` through the shared weights."""
        body = self.model.model
        h = body.embed_tokens(input_ids)
        pos = torch.arange(input_ids.shape[1], device=input_ids.device).unsqueeze(0)
        cos, sin = body.rotary_emb(h, pos)
        for lc in config.layers:
            layer = body.layers[lc.layer]
            h = h + self._attention(layer, layer.input_layernorm(h), lc, cos, sin)
            h = h + self._mlp(layer, layer.post_attention_layernorm(h), lc.neurons)
        return self.model.lm_head(body.norm(h))

    def forward(self, input_ids: torch.Tensor, config: SubnetConfig | None = None) -> torch.Tensor:
        if config is None:
            return self.model(input_ids=input_ids, use_cache=False).logits
        return self.sliced_forward(input_ids, config)


def trainable_parameters(model: nn.Module, freeze_embeddings: bool) -> list[nn.Parameter]:
    """Parameters the optimizer updates; the (tied) embedding stays fixed when asked: it is
    a fifth of SmolLM2's weights, and the probe that motivated recovery training froze it."""
    embed = model.get_input_embeddings().weight
    head = model.get_output_embeddings().weight
    for p in model.parameters():
        p.requires_grad_(True)
    if freeze_embeddings:
        embed.requires_grad_(False)
        head.requires_grad_(False)
    return [p for p in model.parameters() if p.requires_grad]


def param_digest(model: nn.Module) -> str:
    """A digest of every parameter's bytes: equal on two ranks iff their weights are equal."""
    import hashlib

    h = hashlib.sha256()
    for name, p in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(p.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def unwrap(model: Any) -> Any:
    return getattr(model, "module", model)
