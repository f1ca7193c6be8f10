"""Weight quantization for deployed ONNX graphs, in numpy.

- ``int4``: onnxruntime's ``MatMulNBits`` layout (com.microsoft): per output column, blocks of
  ``block_size`` input weights, symmetric 4-bit (zero point 8), one fp32 scale per block; two
  weights a byte, the first in the low nibble. What onnxruntime-genai ships for CPU.
- ``int8``: per output column symmetric int8 with one fp32 scale, multiplied with dynamically
  quantized (uint8) activations through ``MatMulInteger``: the pattern of onnxruntime's
  ``quantize_dynamic``, which its CPU provider fuses.

Each function also returns the dequantized weights, so torch can run exactly the weights the
graph holds (parity tests, and the quality of a quantized sub-network)."""

from __future__ import annotations

from typing import Any

import numpy as np

PRECISIONS = ("fp32", "int8", "int4")
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
    sub-network's quality at that precision."""
    import dataclasses

    import torch

    if precision == "fp32":
        return w
    scale = w.head_dim ** -0.5
    layers = []
    for lw in w.layers:
        new = {}
        for name in ("q", "k", "v", "o", "gate", "up", "down"):
            t = getattr(lw, name)
            s = scale if name == "q" else 1.0
            arr = (t * s).t().detach().to(torch.float32).contiguous().numpy()
            deq = quantize_int4(arr, block_size)[2] if precision == "int4" else quantize_int8(arr)[2]
            new[name] = torch.from_numpy(deq).t().contiguous().to(t.dtype) / s
        layers.append(dataclasses.replace(lw, **new))
    return dataclasses.replace(w, layers=layers)


def emulate_dynamic_int8(model: Any) -> Any:
    """Make ``model`` (built from ``dequantized(w, "int8")``) compute what the int8 graph
    computes: every decoder linear layer's input quantized per tensor to uint8 the way ONNX's
    ``DynamicQuantizeLinear`` does (range widened to hold 0, round half to even), then
    dequantized. The LM head stays fp32, as in the graph. Returns ``model``."""
    import torch

    def fake_quant(_module: Any, inputs: tuple[Any, ...]) -> tuple[Any, ...]:
        x = inputs[0]
        lo = torch.clamp(x.min(), max=0.0)
        hi = torch.clamp(x.max(), min=0.0)
        scale = (hi - lo) / 255.0
        if float(scale) == 0.0:
            return inputs
        zp = torch.clamp(torch.round(-lo / scale), 0, 255)
        q = torch.clamp(torch.round(x / scale) + zp, 0, 255)
        return ((q - zp) * scale, *inputs[1:])

    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and "lm_head" not in name:
            module.register_forward_pre_hook(fake_quant)
    return model
