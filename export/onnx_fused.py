"""The decoder graph as onnxruntime-genai deploys it: onnxruntime's fused operators.

The plain graph (``onnx_export.build_graph``) spells attention out in standard operators
(MatMul, Softmax, a KV cache grown by Concat). What users ship instead, and what
onnxruntime-genai's model builder emits, uses onnxruntime's contrib operators:

- ``SimplifiedLayerNormalization`` (RMSNorm) for the first norm, then
  ``SkipSimplifiedLayerNormalization`` (com.microsoft) for every residual add + RMSNorm pair;
- ``GroupQueryAttention`` (com.microsoft): grouped-query attention with RoPE inside
  (``do_rotary``, cos/sin caches), the causal mask, and the KV cache's append, per layer with
  that layer's own head and KV-head counts;
- the linear layers as in the plain graph (MatMul, or MatMulNBits / MatMulInteger by precision).

Inputs and outputs are the plain graph's (``input_ids``, ``past_key_values.{i}.key|value`` as
[B, kv_heads, P, head_dim] with rotated keys; ``logits``, ``present.{i}.*``), so the agent
times both alike; GroupQueryAttention's sequence lengths are computed in the graph from the
shapes, and it copies the past into a new present buffer every step.

``shared=True`` is onnxruntime-genai's ``past_present_share_buffer``: the decode graph's
``past_key_values.{i}.*`` are preallocated buffers [B, kv_heads, M, head_dim] (M, the
maximum length, at least the total) that the runtime binds as ``present.{i}.*`` too, so the
operator writes the new token's key and value in place and copies nothing; the lengths come
from an ``attention_mask`` [B, total] input, as onnxruntime-genai feeds it. The prefill graph
is the unshared one (its present is the prompt's cache, copied into the buffers once)."""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper

# the longest context the cos/sin caches cover (SmolLM2's own limit is 8192)
MAX_CACHE = 8192


def _rope_caches(w: Any) -> tuple[np.ndarray, np.ndarray]:
    n = min(int(getattr(w.hf_config, "max_position_embeddings", 2048)), MAX_CACHE)
    freqs = np.arange(n, dtype=np.float64)[:, None] * w.inv_freq.double().numpy()[None, :]
    scale = float(w.rope_scaling)
    return (np.cos(freqs) * scale).astype(np.float32), (np.sin(freqs) * scale).astype(np.float32)


def _mask_lengths(g: Any) -> tuple[str, str]:
    """seqlens_k and total_sequence_length from ``attention_mask`` [B, total], as
    onnxruntime-genai computes them: the buffers' shape says nothing of the length."""
    seqlens = g.op("Sub", [g.op("ReduceSum", ["attention_mask", g.const([1])], keepdims=0), g.const(1)])
    total = g.op("Gather", [g.op("Shape", ["attention_mask"]), g.const(1)], axis=0)
    return g.op("Cast", [seqlens], to=TensorProto.INT32), g.op("Cast", [total], to=TensorProto.INT32)


def _lengths(g: Any, phase: str) -> tuple[str, str]:
    """GroupQueryAttention's seqlens_k ([B] int32, total length - 1) and total_sequence_length
    (int32 scalar), from the shapes of the inputs."""
    shape = g.op("Shape", ["input_ids"])
    total = g.op("Gather", [shape, g.const(1)], axis=0)
    if phase == "decode":
        past = g.op("Gather", [g.op("Shape", ["past_key_values.0.key"]), g.const(2)], axis=0)
        total = g.op("Add", [total, past])
    total32 = g.op("Cast", [total], to=TensorProto.INT32)
    batch = g.op("Reshape", [g.op("Gather", [shape, g.const(0)], axis=0), g.const([1])])
    seqlens = g.op("Expand", [g.op("Reshape", [g.op("Sub", [total32, g.const(1, np.int32)]), g.const([1])]), batch])
    return seqlens, g.op("Reshape", [total32, g.const([], np.int64)])


def build_fused_graph(g: Any, w: Any, names: dict[str, str], phase: str,
                      shared: bool = False) -> tuple[list[Any], list[Any]]:
    """Fill ``g`` (an ``onnx_export._Graph``) with the fused decoder; return (inputs, outputs).
    ``shared``: the decode graph appends to preallocated buffers in place (module docstring)."""
    f32 = g.float
    hd, d, eps = w.head_dim, w.hidden_size, w.rms_norm_eps
    if hd % 16:
        from subnets.errors import ExportError

        raise ExportError(f"onnxruntime's GroupQueryAttention needs a head size divisible by 16; this model's is {hd}",
                          "export it with --graph plain")
    inputs = [helper.make_tensor_value_info("input_ids", TensorProto.INT64,
                                            ["batch", "sequence" if phase == "prefill" else 1])]
    outputs = [helper.make_tensor_value_info("logits", f32, ["batch", 1, int(w.embed.shape[0])])]
    cos, sin = _rope_caches(w)
    cos_c, sin_c = g.fconst(cos), g.fconst(sin)
    shared = shared and phase == "decode"
    if shared:
        inputs.append(helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "total_sequence"]))
    seqlens, total = _mask_lengths(g) if shared else _lengths(g, phase)
    past_dim = "max_sequence" if shared else "past_sequence"
    x = g.op("Gather", [names["embed"], "input_ids"], axis=0)
    residual, pending = x, None  # pending: the sub-layer output still to be added to residual
    for i, lw in enumerate(w.layers):
        p = f"l{i}."
        h, residual = _norm(g, residual, pending, names[p + "in_norm"], eps)
        q = g.linear(h, names[p + "q"], names.get(p + "q_bias"))
        k = g.linear(h, names[p + "k"], names.get(p + "k_bias"))
        v = g.linear(h, names[p + "v"], names.get(p + "v_bias"))
        pk, pv = (f"past_key_values.{i}.key", f"past_key_values.{i}.value") if phase == "decode" else ("", "")
        if phase == "decode":
            inputs += [helper.make_tensor_value_info(n, f32, ["batch", lw.num_kv_heads, past_dim, hd])
                       for n in (pk, pv)]
        kname, vname = f"present.{i}.key", f"present.{i}.value"
        total_dim = "sequence" if phase == "prefill" else past_dim if shared else "total_sequence"
        outputs += [helper.make_tensor_value_info(n, f32, ["batch", lw.num_kv_heads, total_dim, hd])
                    for n in (kname, vname)]
        attn = f"attn_{i}"
        g._n += 1
        # the query weights carry 1/sqrt(head_dim) already (plan_weights): scale 1
        g.nodes.append(helper.make_node(
            "GroupQueryAttention", [q, k, v, pk, pv, seqlens, total, cos_c, sin_c], [attn, kname, vname],
            name=f"n{g._n}_gqa", domain="com.microsoft", num_heads=lw.num_heads, kv_num_heads=lw.num_kv_heads,
            do_rotary=1, rotary_interleaved=0, scale=1.0))
        o = g.linear(attn, names[p + "o"], names.get(p + "o_bias"))
        h, residual = _norm(g, residual, o, names[p + "post_norm"], eps)
        gate = g.linear(h, names[p + "gate"])
        act = g.op("Mul", [g.op("Mul", [gate, g.op("Sigmoid", [gate])]), g.linear(h, names[p + "up"])])
        pending = g.linear(act, names[p + "down"])
    x, _ = _norm(g, residual, pending, names["final_norm"], eps)
    if phase == "prefill":
        x = g.slice(x, -1, np.iinfo(np.int64).max, 1)
    flat = g.op("Reshape", [x, g.const([-1, d])])
    logits = g.lm_head(flat, names)
    g.op("Unsqueeze", [logits, g.const([1])], "logits")
    return inputs, outputs


def _norm(g: Any, residual: str, pending: str | None, weight: str, eps: float) -> tuple[str, str]:
    """RMSNorm of ``residual + pending`` (fused with the add when there is one): (normed, sum)."""
    if pending is None:
        return g.op("SimplifiedLayerNormalization", [residual, weight], axis=-1, epsilon=eps, stash_type=1), residual
    g._n += 1
    out, total = f"skipnorm_{g._n}", f"skipsum_{g._n}"
    g.nodes.append(helper.make_node("SkipSimplifiedLayerNormalization", [pending, residual, weight],
                                    [out, "", "", total], name=f"n{g._n}_skipnorm", domain="com.microsoft",
                                    epsilon=eps))
    return out, total


def fused_opsets(opset: int) -> list[onnx.OperatorSetIdProto]:
    return [helper.make_opsetid("", opset), helper.make_opsetid("com.microsoft", 1)]
