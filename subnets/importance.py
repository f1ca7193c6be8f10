"""Importance of heads, neurons and layers, computed once per base model and cached.

Neurons and heads are scored by the norm of their contribution to the residual stream on
calibration text (activation-aware): for neuron j of layer l, ||a_j|| * ||W_down[:, j]||
over all calibration tokens; for query head h, ||x_h W_o,h^T||_F, from the accumulated
Gram matrix of the head's attention output. Weight magnitude (product of the row/column
norms) is the cheap fallback. Layers are scored by block influence, 1 - cos(input, output)
averaged over tokens: a layer that barely changes its input can go."""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from subnets.errors import InputFileError
from subnets.paths import cache_dir
from subnets.quality import EvalTokens

log = logging.getLogger(__name__)

Method = Literal["activation", "magnitude"]
IMPORTANCE_VERSION = 1


@dataclass
class Importance:
    base_id: str
    method: str
    neuron_scores: list[np.ndarray]  # per base layer, [intermediate_size]
    head_scores: list[np.ndarray]  # per base layer, [num_heads]
    block_influence: np.ndarray  # [num_layers]
    calibration: dict[str, Any] = field(default_factory=dict)

    # --- rankings ------------------------------------------------------------------------
    def layer_ranking(self) -> list[int]:
        """Base layer indices, most influential first (ties by index, for determinism)."""
        return sorted(range(len(self.block_influence)), key=lambda i: (-self.block_influence[i], i))

    def kept_layers(self, k: int) -> list[int]:
        return sorted(self.layer_ranking()[:k])

    def kept_neurons(self, layer: int, n: int) -> np.ndarray:
        s = self.neuron_scores[layer]
        order = np.lexsort((np.arange(len(s)), -s))
        return np.sort(order[:n])

    def kept_heads(self, layer: int, kv_groups: int, heads_per_group: int, num_kv_heads: int) -> tuple[np.ndarray, np.ndarray]:
        """(kept KV groups, kept query heads) for a layer, both in base order; query heads
        are listed group by group so that head i of the sub-layer uses KV head
        i // heads_per_group, as Hugging Face's GQA expects."""
        s = self.head_scores[layer]
        per = len(s) // num_kv_heads
        groups = s.reshape(num_kv_heads, per)
        g_order = np.lexsort((np.arange(num_kv_heads), -groups.sum(1)))
        kept_groups = np.sort(g_order[:kv_groups])
        heads = []
        for g in kept_groups:
            h_order = np.lexsort((np.arange(per), -groups[g]))
            heads.extend(int(g) * per + np.sort(h_order[:heads_per_group]))
        return kept_groups, np.asarray(heads, dtype=np.int64)

    # --- persistence (npz + json, no pickle) ---------------------------------------------
    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        arrays = {f"neurons_{i}": a for i, a in enumerate(self.neuron_scores)}
        arrays.update({f"heads_{i}": a for i, a in enumerate(self.head_scores)})
        arrays["block_influence"] = self.block_influence
        tmp = path.with_suffix(".tmp.npz")
        np.savez(tmp, **arrays)
        tmp.replace(path)
        meta = {"version": IMPORTANCE_VERSION, "base_id": self.base_id, "method": self.method,
                "calibration": self.calibration, "num_layers": len(self.neuron_scores)}
        path.with_suffix(".json").write_text(json.dumps(meta, indent=1))

    @classmethod
    def load(cls, path: Path) -> Importance:
        meta = json.loads(path.with_suffix(".json").read_text())
        with np.load(path, allow_pickle=False) as z:
            n = meta["num_layers"]
            return cls(
                meta["base_id"], meta["method"],
                [z[f"neurons_{i}"] for i in range(n)], [z[f"heads_{i}"] for i in range(n)],
                z["block_influence"], meta["calibration"],
            )


def _layers(model: Any) -> Any:
    return model.model.layers


class _Activations:
    """Calibration statistics gathered by forward hooks: each MLP neuron's squared activation,
    each head's output Gram matrix (the inputs of ``o_proj``), each layer's input/output cosine."""

    def __init__(self, dims: Any) -> None:
        L, self.H, self.hd = dims.num_layers, dims.num_heads, dims.head_dim
        self.act_sq = [torch.zeros(dims.intermediate_size, dtype=torch.float64) for _ in range(L)]
        self.gram = [torch.zeros(self.H, self.hd, self.hd, dtype=torch.float64) for _ in range(L)]
        self.cos_sum = torch.zeros(L, dtype=torch.float64)
        self.n_tok = 0

    def mlp_hook(self, i: int) -> Any:
        def f(_m: Any, args: tuple[torch.Tensor, ...]) -> None:
            a = args[0].reshape(-1, args[0].shape[-1]).double()
            self.act_sq[i] += (a * a).sum(0)
        return f

    def attn_hook(self, i: int) -> Any:
        def f(_m: Any, args: tuple[torch.Tensor, ...]) -> None:
            x = args[0].reshape(-1, self.H, self.hd).double()
            self.gram[i] += torch.einsum("nhi,nhj->hij", x, x)
        return f

    def layer_hook(self, i: int) -> Any:
        def f(_m: Any, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any) -> None:
            x_in = args[0] if args else kwargs["hidden_states"]
            x_out = out[0] if isinstance(out, tuple) else out
            self.cos_sum[i] += torch.nn.functional.cosine_similarity(x_in.double(), x_out.double(), dim=-1).sum()
        return f

    def collect(self, model: Any, layers: list[Any], tokens: EvalTokens, batch_size: int) -> None:
        hooks = []
        try:
            for i, layer in enumerate(layers):
                hooks.append(layer.mlp.down_proj.register_forward_pre_hook(self.mlp_hook(i)))
                hooks.append(layer.self_attn.o_proj.register_forward_pre_hook(self.attn_hook(i)))
                hooks.append(layer.register_forward_hook(self.layer_hook(i), with_kwargs=True))
            for b in range(0, tokens.windows.shape[0], batch_size):
                batch = tokens.windows[b : b + batch_size]
                model(input_ids=batch, use_cache=False)
                self.n_tok += batch.numel()
        finally:
            for h in hooks:
                h.remove()


def _unit_scores(layer: Any, i: int, stats: _Activations, dims: Any, method: Method) -> tuple[np.ndarray, np.ndarray]:
    """(neuron scores, head scores) of one layer: the norm of each unit's contribution to the
    residual stream (activation x output weights), or weight magnitudes alone."""
    H, hd = dims.num_heads, dims.head_dim
    down = layer.mlp.down_proj.weight.double()  # [d, I]
    o = layer.self_attn.o_proj.weight.double().view(dims.hidden_size, H, hd)  # [d, H, hd]
    if method == "activation":
        # ||x_h W_h^T||_F^2 = trace(W_h G_h W_h^T)
        contrib = torch.einsum("dhi,hij,dhj->h", o, stats.gram[i], o)
        return (stats.act_sq[i].sqrt() * down.norm(dim=0)).numpy(), contrib.clamp_min(0).sqrt().numpy()
    if method == "magnitude":
        up = layer.mlp.up_proj.weight.double()
        gate = layer.mlp.gate_proj.weight.double()
        q = layer.self_attn.q_proj.weight.double().view(H, hd, dims.hidden_size)
        return ((gate.norm(dim=1) * up.norm(dim=1) * down.norm(dim=0)).numpy(),
                (q.flatten(1).norm(dim=1) * o.permute(1, 0, 2).flatten(1).norm(dim=1)).numpy())
    raise ValueError(f"unknown importance method {method!r}")


@torch.inference_mode()
def compute_importance(base: Any, tokens: EvalTokens, method: Method = "activation", batch_size: int = 4) -> Importance:
    """Score every neuron, head and layer of ``base`` (a ``BaseModel``) on ``tokens``."""
    layers = _layers(base.model)
    stats = _Activations(base.dims)
    stats.collect(base.model, layers, tokens, batch_size)
    scores = [_unit_scores(layer, i, stats, base.dims, method) for i, layer in enumerate(layers)]
    bi = (1.0 - stats.cos_sum / stats.n_tok).numpy()
    calib = {"corpus": tokens.corpus, "sha256": tokens.corpus_sha256, "tokens": tokens.num_tokens}
    return Importance(base.base_id, method, [n for n, _ in scores], [h for _, h in scores], bi, calib)


def importance_for(base: Any, tokens: EvalTokens | None = None, method: Method = "activation",
                   cache: bool = True) -> Importance:
    """Cached importance for ``base``: computed on first use from stdlib calibration text
    (or ``tokens``), then read from the cache folder."""
    if tokens is None:
        from subnets.quality import tokenize
        from subnets.textdata import stdlib_docstrings

        if base.tokenizer is None:
            raise InputFileError(
                "importance needs calibration text, but the base model has no tokenizer",
                "save a tokenizer into the model folder",
            )
        tokens = tokenize(stdlib_docstrings("calibration"), base.tokenizer, budget=4096, window=256)
    key = hashlib.sha256(
        f"{IMPORTANCE_VERSION}|{base.base_id}|{method}|{tokens.corpus_sha256}|{tokens.windows.shape}".encode()
    ).hexdigest()[:16]
    path = cache_dir() / "importance" / f"{base.base_id.replace('@', '-')}-{method}-{key}.npz"
    if cache and path.is_file():
        return Importance.load(path)
    log.info("computing %s importance of %s on %d calibration tokens", method, base.base_id, tokens.num_tokens)
    imp = compute_importance(base, tokens, method)
    if cache:
        imp.save(path)
    return imp
