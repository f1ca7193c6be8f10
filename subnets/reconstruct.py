"""Reconstruction: a pruned layer's output projections refitted so the layer's output stays
close to the full model's, without training.

A sub-network keeps some of a layer's attention heads and MLP neurons; slicing drops the
others' contribution to the residual stream. With the Gram matrix G = sum_t a_t a_t^T of the
projection's inputs on calibration text (the MLP's intermediate activations before
``down_proj``, the heads' outputs before ``o_proj``), the kept columns K of W are refitted by
ridge least squares towards what the full projection computed:

    A = argmin ||X W^T - X_K A||^2 + r ||A - W_K^T||^2
      = (G_KK + r I)^-1 (G_K: W^T + r W_K^T),      r = ridge * mean(diag(G_KK))

so the kept units take over what the dropped ones contributed, as far as it is linear in
them (the idea of ZipLM's and FLAP's structured-pruning updates). The regularizer pulls
towards the sliced weights, not towards zero: with few calibration tokens it falls back to
plain slicing. A config that keeps every unit gets its weights back unchanged (up to
rounding). Grams are collected once per base model on the full model's activations (a
one-shot fit: the later layers see the full model's inputs) and cached like the importance."""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from subnets.importance import Importance
from subnets.paths import cache_dir
from subnets.quality import EvalTokens

log = logging.getLogger(__name__)

RECONSTRUCTION_VERSION = 1
RIDGE = 0.1  # relative to the mean of G_KK's diagonal; measured best of 0.01, 0.1, 1 on SmolLM2
CALIBRATION_TOKENS = 16384  # 4,096 over-fitted the MLP refit (1,536 inputs) on SmolLM2


@dataclass
class Grams:
    """Per base layer, the Gram matrices of ``down_proj``'s and ``o_proj``'s inputs."""

    base_id: str
    mlp: list[torch.Tensor]  # [intermediate, intermediate]
    attn: list[torch.Tensor]  # [heads * head_dim, heads * head_dim]
    calibration: dict[str, Any] = field(default_factory=dict)

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        arrays = {f"mlp_{i}": g.numpy() for i, g in enumerate(self.mlp)}
        arrays.update({f"attn_{i}": g.numpy() for i, g in enumerate(self.attn)})
        tmp = path.with_suffix(".tmp.npz")
        np.savez(tmp, **arrays)
        tmp.replace(path)
        meta = {"version": RECONSTRUCTION_VERSION, "base_id": self.base_id, "calibration": self.calibration,
                "num_layers": len(self.mlp)}
        path.with_suffix(".json").write_text(json.dumps(meta, indent=1))

    @classmethod
    def load(cls, path: Path) -> Grams:
        meta = json.loads(path.with_suffix(".json").read_text())
        n = meta["num_layers"]
        with np.load(path, allow_pickle=False) as z:
            return cls(meta["base_id"], [torch.from_numpy(z[f"mlp_{i}"]) for i in range(n)],
                       [torch.from_numpy(z[f"attn_{i}"]) for i in range(n)], meta["calibration"])

    def digest(self) -> str:
        return hashlib.sha256(json.dumps([RECONSTRUCTION_VERSION, self.base_id, self.calibration, RIDGE],
                                         sort_keys=True).encode()).hexdigest()[:16]


@torch.inference_mode()
def collect_grams(base: Any, tokens: EvalTokens, batch_size: int = 4) -> Grams:
    """The Gram matrices of every layer's output-projection inputs on ``tokens`` (float32
    sums: 1,536 x 1,536 a layer for SmolLM2's MLP)."""
    layers = base.model.model.layers
    mlp = [torch.zeros(lay.mlp.down_proj.in_features, lay.mlp.down_proj.in_features) for lay in layers]
    attn = [torch.zeros(lay.self_attn.o_proj.in_features, lay.self_attn.o_proj.in_features) for lay in layers]

    def hook(grams: list[torch.Tensor], i: int) -> Any:
        def f(_m: Any, args: tuple[torch.Tensor, ...]) -> None:
            a = args[0].reshape(-1, args[0].shape[-1]).float()
            grams[i] += a.T @ a
        return f

    hooks = []
    try:
        for i, layer in enumerate(layers):
            hooks.append(layer.mlp.down_proj.register_forward_pre_hook(hook(mlp, i)))
            hooks.append(layer.self_attn.o_proj.register_forward_pre_hook(hook(attn, i)))
        for b in range(0, tokens.windows.shape[0], batch_size):
            base.model(input_ids=tokens.windows[b : b + batch_size], use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    calib = {"corpus": tokens.corpus, "sha256": tokens.corpus_sha256, "tokens": tokens.num_tokens}
    return Grams(base.base_id, mlp, attn, calib)


def grams_for(base: Any, tokens: EvalTokens | None = None, cache: bool = True) -> Grams:
    """Cached Grams for ``base``: collected on first use from the importance's calibration
    text (``CALIBRATION_TOKENS`` of it, or ``tokens``), then read from the cache folder."""
    if tokens is None:
        from subnets.quality import tokenize
        from subnets.textdata import stdlib_docstrings

        tokens = tokenize(stdlib_docstrings("calibration"), base.tokenizer, budget=CALIBRATION_TOKENS, window=256)
    key = hashlib.sha256(f"{RECONSTRUCTION_VERSION}|{base.base_id}|{base.weights_id}|{tokens.corpus_sha256}|"
                         f"{tuple(tokens.windows.shape)}".encode()).hexdigest()[:16]
    path = cache_dir() / "reconstruction" / f"{base.base_id.replace('@', '-')}-{key}.npz"
    if cache and path.is_file():
        return Grams.load(path)
    log.info("collecting reconstruction statistics of %s on %d calibration tokens", base.base_id, tokens.num_tokens)
    grams = collect_grams(base, tokens)
    if cache:
        grams.save(path)
    return grams


def refit(weight: torch.Tensor, gram: torch.Tensor, keep: torch.Tensor, ridge: float = RIDGE) -> torch.Tensor:
    """The kept columns ``keep`` of ``weight`` [out, in], refitted (see the module's text)."""
    g = gram.double()
    g_kk = g.index_select(0, keep).index_select(1, keep)
    r = ridge * float(g_kk.diagonal().mean()) or ridge
    w = weight.detach().double()
    w_k = w.index_select(1, keep)
    rhs = g.index_select(0, keep) @ w.T + r * w_k.T
    chol = torch.linalg.cholesky(g_kk + r * torch.eye(len(keep), dtype=torch.float64))  # SPD: r > 0
    a = torch.cholesky_solve(rhs, chol)
    return a.T.to(weight.dtype).contiguous()


def reconstruct(weights: Any, base: Any, importance: Importance, grams: Grams) -> Any:
    """``weights`` (a ``SubnetWeights`` sliced from ``base``) with every kept layer's
    ``down`` and ``o`` refitted; the rest shared with ``weights``."""
    hd = weights.head_dim
    layers = []
    for lc, lw in zip(weights.config.layers, weights.layers):
        layer = base.model.model.layers[lc.layer]
        neurons = torch.as_tensor(importance.kept_neurons(lc.layer, lc.neurons))
        _, heads = importance.kept_heads(lc.layer, lc.kv_groups, lc.heads_per_group, base.dims.num_kv_heads)
        rows = torch.as_tensor((heads[:, None] * hd + np.arange(hd)[None, :]).reshape(-1))
        layers.append(replace(lw, down=refit(layer.mlp.down_proj.weight, grams.mlp[lc.layer], neurons),
                              o=refit(layer.self_attn.o_proj.weight, grams.attn[lc.layer], rows)))
    return replace(weights, layers=layers, weights_id=f"{weights.weights_id or 'base'}|reconstructed:{grams.digest()}")
