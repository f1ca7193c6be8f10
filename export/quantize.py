"""Weight quantization for deployed ONNX graphs, in numpy.

- ``int4``: onnxruntime's ``MatMulNBits`` layout (com.microsoft): per output column, blocks of
  ``block_size`` input weights, symmetric 4-bit (zero point 8), one fp32 scale per block; two
  weights a byte, the first in the low nibble. What onnxruntime-genai ships for CPU.
- ``int8``: per output column symmetric int8 with one fp32 scale, multiplied with dynamically
  quantized (uint8) activations through ``MatMulInteger``: the pattern of onnxruntime's
  ``quantize_dynamic``, which its CPU provider fuses.

Each function also returns the dequantized weights, so torch can run exactly the weights the
graph holds (parity tests, and the quality of a quantized sub-network).

For llama.cpp's GGUF types (``f16``, ``q8_0``, ``q4_0``) the weights go through the ``gguf``
package's own block quantizers, the formats llama.cpp reads, and ``emulate_gguf`` adds what
llama.cpp's CPU kernels do to activations: a quantized weight is multiplied with activations
quantized to Q8_0 blocks (32 values, one scale), an F16 weight with F16 activations."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from subnets.errors import ConfigError

PRECISIONS = ("fp32", "fp16", "int8", "int4")
GGUF_TYPES = ("f32", "f16", "q8_0", "q4_0")
# llama.cpp's own per-tensor presets, written by upstream llama-quantize (export.gguf_presets)
GGUF_PRESETS = ("q6_k", "q5_k_m", "q4_k_m", "q3_k_m")
LLAMA_CPP_PRECISIONS = (*GGUF_TYPES, *GGUF_PRESETS)
# llama.cpp's 32-value block types this suite writes in numpy (the uniform --precision menu is
# GGUF_TYPES; mixes may use all of these); their activations are rounded to Q8_0 blocks
GGUF_BLOCK_TYPES = ("q8_0", "q5_1", "q5_0", "q4_1", "q4_0")
BLOCK_SIZES = (16, 32, 64, 128)


def quantize_int4(w: np.ndarray, block_size: int = 32) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``w`` [K, N] (MatMul layout) -> (packed uint8 [N, K/block, block/2], scales fp32
    [N * K/block], dequantized fp32 [K, N]); K is zero-padded to a whole block."""
    k, n = w.shape
    nb = -(-k // block_size)
    padded = np.zeros((nb * block_size, n), dtype=np.float32)
    padded[:k] = w
    blocks = padded.T.reshape(n, nb, block_size)  # [N, nb, block]
    scale = np.abs(blocks).max(axis=2) / 7.0
    scale[scale == 0] = 1.0
    q = np.clip(np.rint(blocks / scale[..., None]), -8, 7).astype(np.int16) + 8  # 0..15
    packed = np.ascontiguousarray((q[..., 0::2] | (q[..., 1::2] << 4)).astype(np.uint8))
    deq = ((q - 8) * scale[..., None]).reshape(n, nb * block_size).T[:k].astype(np.float32)
    return packed, scale.astype(np.float32).reshape(-1), np.ascontiguousarray(deq)


# 7-bit weights (onnxruntime's ``reduce_range``): x86 CPUs without VNNI multiply uint8 by int8
# in pairs summed into int16, which saturates with full-range weights (a single SmolLM2-sized
# layer came out 5.5% off its exact value here); +-63 cannot saturate.
INT8_LIMIT = 63


def quantize_int8(w: np.ndarray, limit: int = INT8_LIMIT) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``w`` [K, N] -> (int8 [K, N], scales fp32 [N], dequantized fp32 [K, N])."""
    scale = np.abs(w).max(axis=0) / limit
    scale[scale == 0] = 1.0
    q = np.clip(np.rint(w / scale), -limit, limit).astype(np.int8)
    return q, scale.astype(np.float32), (q.astype(np.float32) * scale).astype(np.float32)


def dequantized(w: Any, precision: str, block_size: int = 32) -> Any:
    """``SubnetWeights`` whose linear weights are exactly what a ``precision`` export holds
    (quantized then dequantized, the query's attention scale undone): torch on these computes
    what the quantized graph computes with fp32 arithmetic, so its perplexity is the
    sub-network's quality at that precision. A uniform precision is the uniform mix of it,
    the LM head included (onnxruntime: a quantized copy of it; the embedding stays fp32)."""
    from export.mix import PrecisionMix

    if precision in ("fp32", "f32"):
        return w
    if precision == "fp16":
        return _half(w)
    runtime = "llama.cpp" if precision in GGUF_TYPES else "onnxruntime"
    return mixed_weights(w, PrecisionMix.uniform(runtime, precision, len(w.layers), block_size=block_size))


def _half(w: Any) -> Any:
    """Every tensor of ``w`` rounded to fp16 (an fp16 graph stores all of them so)."""
    import dataclasses

    import torch

    def r(t: Any) -> Any:
        return None if t is None else t.to(torch.float16).to(t.dtype)

    layers = [dataclasses.replace(lw, **{f.name: r(getattr(lw, f.name)) for f in dataclasses.fields(lw)
                                         if isinstance(getattr(lw, f.name), torch.Tensor)}) for lw in w.layers]
    return dataclasses.replace(w, layers=layers, embed=r(w.embed), final_norm=r(w.final_norm), lm_head=r(w.lm_head))


def emulate(model: Any, precision: str) -> Any:
    """Make ``model`` (built from ``dequantized(w, precision)``) compute what the runtime
    computes at ``precision`` besides its weights: int8's dynamically quantized activations,
    llama.cpp's Q8_0/F16-rounded activations, fp16's half-precision activations (rounded at
    every linear layer's input, the dominant rounding). Returns ``model``."""
    if precision == "int8":
        return emulate_dynamic_int8(model)
    return emulate_gguf(model, "f16" if precision == "fp16" else precision)


def emulate_dynamic_int8(model: Any) -> Any:
    """Make ``model`` (built from ``dequantized(w, "int8")``) compute what the int8 graph
    computes: every decoder linear layer's input quantized per tensor to uint8 the way ONNX's
    ``DynamicQuantizeLinear`` does (range widened to hold 0, round half to even), then
    dequantized; the LM head's too (the graph multiplies by an int8 copy of it). Returns ``model``."""
    import torch

    for module in model.modules():
        if isinstance(module, torch.nn.Linear):
            module.register_forward_pre_hook(_dynamic_uint8_hook)
    return model


def _dynamic_uint8(inputs: tuple[Any, ...]) -> tuple[Any, ...]:
    """ONNX's ``DynamicQuantizeLinear`` on a linear layer's input, then dequantized."""
    import torch

    x = inputs[0]
    lo = torch.clamp(x.min(), max=0.0)
    hi = torch.clamp(x.max(), min=0.0)
    scale = (hi - lo) / 255.0
    if float(scale) == 0.0:
        return inputs
    zp = torch.clamp(torch.round(-lo / scale), 0, 255)
    q = torch.clamp(torch.round(x / scale) + zp, 0, 255)
    return ((q - zp) * scale, *inputs[1:])


def _dynamic_uint8_hook(_module: Any, inputs: tuple[Any, ...]) -> tuple[Any, ...]:
    return _dynamic_uint8(inputs)


def gguf_roundtrip(t: Any, precision: str) -> Any:
    """A torch weight [out, in] as a GGUF file of ``precision`` holds it (blocks along the
    input dimension; rows that do not split into 32-value blocks stay F16, as the exporter
    writes them)."""
    import gguf
    import torch

    arr = t.detach().to(torch.float32).contiguous().numpy()
    kind = stored_type("w", arr, precision)
    if kind == "f32":
        return t
    if kind == "f16":
        return torch.from_numpy(arr.astype(np.float16).astype(np.float32)).to(t.dtype)
    q = gguf.quants.quantize(arr, gguf_qtype(kind))
    return torch.from_numpy(gguf.quants.dequantize(q, gguf_qtype(kind)).reshape(arr.shape)).to(t.dtype)


def emulate_gguf(model: Any, precision: str) -> Any:
    """Make ``model`` (built from ``dequantized(w, precision)``) compute what llama.cpp's CPU
    kernels compute for a GGUF of ``precision``: every linear layer's input (the LM head's too)
    rounded to Q8_0 blocks for quantized weights, to F16 for F16 weights. Returns ``model``."""
    import torch

    hook = activation_hook(precision)
    if hook is None:
        return model
    for module in model.modules():
        if isinstance(module, torch.nn.Linear):
            module.register_forward_pre_hook(hook)
    return model


def _q8_0_activations(_module: Any, inputs: tuple[Any, ...]) -> tuple[Any, ...]:
    """llama.cpp's CPU kernels multiply a block-quantized weight with its input quantized to
    Q8_0 (Q8_1 for q4_1/q5_1: the same values): 32-value blocks, one fp16 scale."""
    import torch

    x = inputs[0]
    if x.shape[-1] % 32:
        return inputs
    blocks = x.reshape(*x.shape[:-1], -1, 32)
    d = (blocks.abs().amax(dim=-1, keepdim=True) / 127.0).to(torch.float16).to(x.dtype)
    q = torch.where(d > 0, torch.round(blocks / torch.where(d > 0, d, 1.0)), 0.0)
    return ((q * d).reshape(x.shape), *inputs[1:])


def _f16_activations(_module: Any, inputs: tuple[Any, ...]) -> tuple[Any, ...]:
    import torch

    return (inputs[0].to(torch.float16).to(inputs[0].dtype), *inputs[1:])


def activation_hook(kind: str) -> Any:
    """What a runtime does to a linear layer's input for a weight of ``kind`` (None: nothing)."""
    if kind in GGUF_BLOCK_TYPES:
        return _q8_0_activations
    if kind in ("f16", "fp16"):
        return _f16_activations
    return None


def gguf_qtype(name: str) -> Any:
    import gguf

    return {"f32": gguf.GGMLQuantizationType.F32, "f16": gguf.GGMLQuantizationType.F16,
            "q8_0": gguf.GGMLQuantizationType.Q8_0, "q5_1": gguf.GGMLQuantizationType.Q5_1,
            "q5_0": gguf.GGMLQuantizationType.Q5_0, "q4_1": gguf.GGMLQuantizationType.Q4_1,
            "q4_0": gguf.GGMLQuantizationType.Q4_0}[name]


def stored_type(name: str, arr: np.ndarray, precision: str) -> str:
    """The GGUF type a tensor is written as: norms and other 1-D tensors F32, 2-D weights at
    ``precision`` unless their rows do not split into 32-value blocks (then F16)."""
    if arr.ndim == 1 or precision == "f32":
        return "f32"
    if precision in GGUF_BLOCK_TYPES and arr.shape[-1] % 32:
        return "f16"
    return precision


@dataclass(frozen=True)
class Precision:
    """A deployed precision as the quality objective sees it (``subnets.workspace.Arithmetic``):
    the sub-network's weights as the runtime's file holds them, computed with the runtime's
    activation rounding. ``name``: an onnxruntime precision (fp32, fp16, int8, int4) or a GGUF
    type (f32, f16, q8_0, q4_0); ``block_size``: inputs per int4 scale."""

    name: str
    block_size: int = 32

    def __post_init__(self) -> None:
        if self.name not in (*PRECISIONS, *GGUF_TYPES):
            raise ConfigError(f"precision {self.name!r} is not one edgenas deploys",
                              f"use one of {', '.join((*PRECISIONS, *GGUF_TYPES))}")
        if self.block_size not in BLOCK_SIZES:
            raise ConfigError(f"int4 block size {self.block_size} is not one MatMulNBits takes",
                              f"use one of {', '.join(map(str, BLOCK_SIZES))}")

    @property
    def identity(self) -> str:
        # onnxruntime int8/int4 multiply by an int8 LM head since exporter 3: other numbers than before
        return f"{self.name}|{self.block_size}" + ("|head8" if self.name in ("int8", "int4") else "")

    def model(self, weights: Any) -> Any:
        from subnets.extract import build_model

        if self.name in ("int8", "int4"):  # each linear layer's own rounding, the int8 head's too
            from export.mix import PrecisionMix

            mix = PrecisionMix.uniform("onnxruntime", self.name, len(weights.layers), block_size=self.block_size)
            return MixArithmetic(mix).model(weights)
        return emulate(build_model(dequantized(weights, self.name, self.block_size)), self.name)


def _onnx_roundtrip(t: Any, kind: str, block_size: int, scale: float = 1.0) -> Any:
    """A torch weight [out, in] as an onnxruntime int4/int8 MatMul holds it (``scale``: the
    attention scale the exporter folds into the query weight before quantizing)."""
    import torch

    if kind == "fp32":
        return t
    arr = (t * scale).t().detach().to(torch.float32).contiguous().numpy()
    deq = quantize_int4(arr, block_size)[2] if kind == "int4" else quantize_int8(arr)[2]
    return torch.from_numpy(deq).t().contiguous().to(t.dtype) / scale


def mixed_weights(w: Any, mix: Any) -> Any:
    """``SubnetWeights`` whose every linear weight is what the mix's file holds for it
    (quantized to its tensor group's type, then dequantized)."""
    import dataclasses

    from export.mix import ATTENTION, MLP

    mix.check_layers(len(w.layers))
    onnx = mix.runtime == "onnxruntime"
    q_scale = w.head_dim ** -0.5

    def rt(t: Any, kind: str, scale: float = 1.0) -> Any:
        return _onnx_roundtrip(t, kind, mix.block_size, scale) if onnx else gguf_roundtrip(t, kind)

    layers = [dataclasses.replace(lw, **{part: rt(getattr(lw, part), mix.layer_type(i, part),
                                                  q_scale if part == "q" else 1.0) for part in (*ATTENTION, *MLP)})
              for i, lw in enumerate(w.layers)]
    if onnx:  # the embedding is gathered from fp32; the LM head multiplies by its own copy
        head = w.embed if w.lm_head is None else w.lm_head
        lm_head = w.lm_head if mix.head == "fp32" else rt(head, mix.head)
        return dataclasses.replace(w, layers=layers, lm_head=lm_head)
    head = None if w.lm_head is None else gguf_roundtrip(w.lm_head, mix.head)
    return dataclasses.replace(w, layers=layers, embed=gguf_roundtrip(w.embed, mix.head), lm_head=head)


def emulate_mix(model: Any, mix: Any) -> Any:
    """Make ``model`` (built from ``mixed_weights(w, mix)``) round each linear layer's input as
    its runtime does for that layer's weight type. Returns ``model``."""
    from export.mix import ATTENTION, MLP

    def hook_for(kind: str) -> Any:
        if mix.runtime == "onnxruntime":
            return _dynamic_uint8_hook if kind == "int8" else None
        return activation_hook(kind)

    for i, layer in enumerate(model.model.layers):
        for part in (*ATTENTION, *MLP):
            module = getattr(layer.self_attn if part in ATTENTION else layer.mlp, f"{part}_proj")
            hook = hook_for(mix.layer_type(i, part))
            if hook is not None:
                module.register_forward_pre_hook(hook)
    head_hook = hook_for(mix.head)
    if head_hook is not None:
        model.lm_head.register_forward_pre_hook(head_hook)
    return model


@dataclass(frozen=True)
class MixArithmetic:
    """A precision mix as the quality objective sees it (``subnets.workspace.Arithmetic``)."""

    mix: Any  # export.mix.PrecisionMix

    @property
    def name(self) -> str:
        kind = self.mix.uniform_type()
        return f"mix:{self.mix.runtime}:{kind or self.mix.digest()}"

    @property
    def block_size(self) -> int:
        return int(self.mix.block_size)

    @property
    def identity(self) -> str:
        return f"mix|{self.mix.to_json()}"

    def model(self, weights: Any) -> Any:
        from subnets.extract import build_model

        return emulate_mix(build_model(mixed_weights(weights, self.mix)), self.mix)
