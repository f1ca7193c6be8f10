"""llama.cpp's own quantization presets (Q6_K, Q5_K_M, Q4_K_M, Q3_K_M), written by upstream
``llama-quantize`` from the sub-network's F32 GGUF, as a user of llama.cpp would write them.

A preset is llama.cpp's hand-made per-tensor mix: K-quant types where a tensor's rows split
into 256-value super-blocks, legacy types where they do not (SmolLM2's 576-wide rows: its
Q4_K_M is mostly Q5_0, its ``attn_v`` and ``ffn_down`` in some layers and its embedding
higher), chosen by tensor name and layer. Its quality is judged on exactly the values the
file holds (read back and dequantized by the ``gguf`` package) with the activations rounded
as llama.cpp's CPU kernels round them for each tensor's type: Q8_K (256-value blocks, fp32
scale) for K-quant weights, Q8_0 for legacy block types."""

from __future__ import annotations

import dataclasses
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from export.llama_cpp_tools import LLAMA_CPP_BUILD

K_TYPES = ("q2_k", "q3_k", "q4_k", "q5_k", "q6_k")
# llama.cpp tensor name suffix -> the torch module of a decoder layer
_MODULES = {"attn_q": ("self_attn", "q_proj"), "attn_k": ("self_attn", "k_proj"), "attn_v": ("self_attn", "v_proj"),
            "attn_output": ("self_attn", "o_proj"), "ffn_gate": ("mlp", "gate_proj"), "ffn_up": ("mlp", "up_proj"),
            "ffn_down": ("mlp", "down_proj")}


def _unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's adjacent-pair RoPE layout back to HF's rotate-half (the exporter's inverse)."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def read_weights(path: Path, w: Any) -> tuple[Any, dict[str, str]]:
    """The weights ``path`` holds for sub-network weights ``w`` (dequantized, as ``w``'s
    tensors), and each tensor's type by llama.cpp name."""
    import gguf
    import torch

    tensors = {t.name: t for t in gguf.GGUFReader(str(path)).tensors}
    types = {name: t.tensor_type.name.lower() for name, t in tensors.items()}

    def load(name: str, like: Any) -> Any:
        t = tensors[name]
        arr = gguf.quants.dequantize(t.data, t.tensor_type).reshape(tuple(like.shape))
        return torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32)).to(like.dtype)

    layers = []
    for i, lw in enumerate(w.layers):
        p = f"blk.{i}."
        q, k = load(p + "attn_q.weight", lw.q), load(p + "attn_k.weight", lw.k)
        q = torch.from_numpy(_unpermute(q.float().numpy(), lw.num_heads)).to(lw.q.dtype)
        k = torch.from_numpy(_unpermute(k.float().numpy(), lw.num_kv_heads)).to(lw.k.dtype)
        layers.append(dataclasses.replace(
            lw, q=q, k=k, v=load(p + "attn_v.weight", lw.v), o=load(p + "attn_output.weight", lw.o),
            gate=load(p + "ffn_gate.weight", lw.gate), up=load(p + "ffn_up.weight", lw.up),
            down=load(p + "ffn_down.weight", lw.down)))
    lm_head = None if w.lm_head is None else load("output.weight", w.lm_head)
    return dataclasses.replace(w, layers=layers, embed=load("token_embd.weight", w.embed), lm_head=lm_head), types


def _q8_k_activations(_module: Any, inputs: tuple[Any, ...]) -> tuple[Any, ...]:
    """llama.cpp's CPU kernels multiply a K-quant weight with its input quantized to Q8_K:
    256-value blocks, one fp32 scale (|max| / 127), values rounded half to even."""
    import torch

    x = inputs[0]
    if x.shape[-1] % 256:
        return inputs
    blocks = x.reshape(*x.shape[:-1], -1, 256)
    d = blocks.abs().amax(dim=-1, keepdim=True) / 127.0
    q = torch.where(d > 0, torch.round(blocks / torch.where(d > 0, d, 1.0)), 0.0)
    return ((q * d).reshape(x.shape), *inputs[1:])


def activation_hook_of(kind: str) -> Any:
    """The input rounding of a weight of GGUF type ``kind`` (None: none)."""
    from export.quantize import activation_hook

    return _q8_k_activations if kind in K_TYPES else activation_hook(kind)


def emulate_types(model: Any, types: dict[str, str]) -> Any:
    """Hook each linear layer of ``model`` with its tensor's input rounding. Returns ``model``."""
    for name, kind in types.items():
        parts = name.split(".")
        if name.startswith("blk.") and parts[2] in _MODULES:
            attn_or_mlp, proj = _MODULES[parts[2]]
            module = getattr(getattr(model.model.layers[int(parts[1])], attn_or_mlp), proj)
        elif name == ("output.weight" if "output.weight" in types else "token_embd.weight"):
            module = model.lm_head  # the LM head (the embedding, when tied)
        else:
            continue
        hook = activation_hook_of(kind)
        if hook is not None:
            module.register_forward_pre_hook(hook)
    return model


@dataclass(frozen=True)
class PresetArithmetic:
    """A llama.cpp preset as the quality objective sees it (``subnets.workspace.Arithmetic``):
    the weights upstream's quantizer writes, with llama.cpp's activation rounding."""

    preset: str

    @property
    def name(self) -> str:
        return self.preset

    @property
    def block_size(self) -> int:
        return 32

    @property
    def identity(self) -> str:  # the quantizer's choices are the build's
        return f"preset|{self.preset}|llama.cpp-{LLAMA_CPP_BUILD}"

    def model(self, weights: Any) -> Any:
        from export.gguf_file import write_preset
        from subnets.extract import build_model

        with tempfile.TemporaryDirectory(prefix="edgenas-preset-") as tmp:
            path = write_preset(weights, self.preset, Path(tmp) / "model.gguf")
            w, types = read_weights(path, weights)
        return emulate_types(build_model(w), types)
