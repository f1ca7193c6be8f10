"""ONNX export of sub-networks, built straight from the sliced weights.

The graphs are assembled node by node with ``onnx.helper`` from a ``SubnetWeights`` (no
tracing): a Llama decoder is a short, fixed recipe, and building it directly takes
milliseconds where torch's exporters take 7-48 s per graph. Two graphs per sub-network share
one external weights file:

- prefill: ``input_ids[B,S]`` -> ``logits[B,1,V]`` (last position: generation needs no
  more) and ``present.{i}.key|value[B,G_i,S,hd]``;
- decode: ``input_ids[B,1]``, ``past_key_values.{i}.key|value[B,G_i,P,hd]`` -> ``logits[B,1,V]``
  and ``present.{i}.key|value[B,G_i,P+1,hd]``.

S, P and B are dynamic, so one file serves a grid of shapes. Query heads are laid out group
by group and attend to their KV head by broadcasting (no repeat), as GQA runtimes do.

Exports are content-addressed: the folder name is a hash of the config, the base model and
the export options, so a sub-network is never exported twice."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper

from export.artifact import MANIFEST, ExportedSubnet, TensorRecord
from export.quantize import BLOCK_SIZES, PRECISIONS, quantize_int4, quantize_int8
from subnets.errors import ExportError
from subnets.extract import SubnetWeights

log = logging.getLogger(__name__)

EXPORTER_VERSION = 3  # 2: int8/int4 graphs multiply by a quantized LM head; 3: int8 for int4 graphs
GRAPHS = ("plain", "fused", "fused-shared")
MIN_OPSET = 13  # Unsqueeze/Slice with axes as inputs, Softmax over one axis
WEIGHTS_FILE = "weights.bin"
_ALIGN = 64
Phase = Literal["prefill", "decode"]
PHASES: tuple[Phase, ...] = ("prefill", "decode")


def max_opset() -> int:
    return onnx.defs.onnx_opset_version()


def min_ir_version(opset: int) -> int:
    """The oldest IR version that carries ``opset``: the most runtimes can load it."""
    best = None
    for _release, ir, op, *_ in helper.VERSION_TABLE:
        if op >= opset and (best is None or ir < best):
            best = ir
    return best if best is not None else onnx.IR_VERSION


@dataclass(frozen=True)
class ExportOptions:
    opset: int = 17
    ir_version: int | None = None  # None: the oldest that carries ``opset``
    weights: Literal["real", "none"] = "real"  # "none": graph + manifest only (profiling)
    # linear layers' weights: fp32, int8 (MatMulInteger with dynamic activation quantization)
    # or int4 (MatMulNBits, blocks of block_size); embeddings, norms and the LM head stay fp32.
    # fp16: every weight, activation, KV cache and the logits in half precision, the graph
    # onnxruntime-genai builds for GPUs (and ARM CPUs with fp16 arithmetic)
    precision: str = "fp32"
    block_size: int = 32
    # int4: MatMulNBits' accuracy_level. 4 multiplies in int8 (activations quantized per block),
    # what onnxruntime-genai builds for CPUs: here it halved a SmolLM2 decode step (31.1 ->
    # 16.3 ms, 1 thread) where 0 (fp32 compute) ran at fp32 speed. 0 computes exactly.
    accuracy_level: int = 4
    # "plain": attention in standard operators; "fused": onnxruntime's contrib decoder operators
    # (GroupQueryAttention, SkipSimplifiedLayerNormalization), as onnxruntime-genai deploys;
    # "fused-shared": those with onnxruntime-genai's past_present_share_buffer KV cache (one
    # preallocated buffer per layer, appended in place; see onnx_fused)
    graph: str = "plain"
    # per-MatMul types (export.mix.PrecisionMix of runtime onnxruntime: fp32, int8, int4 for each
    # layer's attention and MLP); None: every linear layer at ``precision``
    mix: Any = None

    def validate(self) -> None:
        if self.mix is not None:
            if self.mix.runtime != "onnxruntime" or self.precision != "fp32" or self.graph != "plain":
                raise ExportError(f"an ONNX precision mix is an onnxruntime mix over fp32 plain graphs, not "
                                  f"{self.mix.runtime} over {self.precision} {self.graph} graphs",
                                  "give an onnxruntime mix (fp32, int8, int4 per layer) with --graph plain")
        if self.graph not in GRAPHS:
            raise ExportError(f"graph variant {self.graph!r} is not one edgenas exports", f"use {', '.join(GRAPHS)}")
        if self.precision not in PRECISIONS:
            raise ExportError(f"precision {self.precision!r} is not one edgenas exports",
                              f"use one of {', '.join(PRECISIONS)}")
        if self.precision == "int4" and self.block_size not in BLOCK_SIZES:
            raise ExportError(f"int4 block size {self.block_size} is not supported",
                              f"use one of {', '.join(map(str, BLOCK_SIZES))}")
        top = max_opset()
        if not MIN_OPSET <= self.opset <= top:
            raise ExportError(
                f"opset {self.opset} is not supported: edgenas exports opsets {MIN_OPSET}..{top}",
                "choose --opset in that range (the board's handshake says what its runtime loads)",
            )
        if self.ir_version is not None and self.ir_version < min_ir_version(self.opset):
            raise ExportError(
                f"IR version {self.ir_version} cannot carry opset {self.opset} "
                f"(needs IR >= {min_ir_version(self.opset)})",
                "raise --ir-version or lower --opset",
            )
        if self.weights not in ("real", "none"):
            raise ExportError(f"unknown weights mode {self.weights!r}", "use 'real' or 'none'")

    @property
    def resolved_ir_version(self) -> int:
        return self.ir_version if self.ir_version is not None else min_ir_version(self.opset)


# --------------------------------------------------------------------------------------
# weights plan: every tensor once, in one file shared by both graphs
# --------------------------------------------------------------------------------------
def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().to(torch.float32).contiguous().numpy()


def plan_weights(w: SubnetWeights, precision: str = "fp32", block_size: int = 32,
                 mix: Any = None) -> list[tuple[str, np.ndarray, str]]:
    """(name, array, kind) for every initializer. Linear weights are stored [in, out] for
    MatMul (or quantized, see ``_quantized``; with a ``mix``, each at its layer's type); the
    query projection carries the 1/sqrt(head_dim) attention scale (RoPE is linear, so
    scaling before it is exact)."""
    if mix is not None:
        mix.check_layers(len(w.layers))

        def kind_of(name: str) -> str:
            if name == "lm_head":
                return mix.head
            layer, part = name.split(".")
            return mix.layer_type(int(layer[1:]), part)

        return _quantized(_plan_fp32(w, mix.head), kind_of, mix.block_size)
    if precision == "fp16":
        return [(name, arr.astype(np.float16), kind) for name, arr, kind in _plan_fp32(w)]
    if precision == "fp32":
        return _plan_fp32(w)
    from export.mix import default_head

    head = default_head("onnxruntime", precision)
    return _quantized(_plan_fp32(w, head), lambda name: head if name == "lm_head" else precision, block_size)


def _quantized(plan: list[tuple[str, np.ndarray, str]], kind_of: Any,
               block_size: int) -> list[tuple[str, np.ndarray, str]]:
    """Each linear weight as its quantized values (``name.q``) and scales (``name.scale``),
    at ``kind_of(name)`` (int4, int8; fp32 keeps the weight as it is)."""
    out = []
    for name, arr, kind in plan:
        precision = kind_of(name) if kind == "linear" else "fp32"
        if precision == "fp32":
            out.append((name, arr, kind))
            continue
        if precision == "int4":
            q, scale, _ = quantize_int4(arr, block_size)
            out += [(name + ".q", q, "q4"), (name + ".scale", scale, "scale")]
        else:
            q, scale, _ = quantize_int8(arr)
            out += [(name + ".q", q, "q8"), (name + ".scale", scale, "scale")]
    return out


def _plan_fp32(w: SubnetWeights, head: str = "fp32") -> list[tuple[str, np.ndarray, str]]:
    """``head``: the LM head's type; quantized, it is a linear weight of its own ([in, out])
    beside the fp32 embedding the graph gathers from (tied or not)."""
    scale = w.head_dim**-0.5
    out: list[tuple[str, np.ndarray, str]] = [("embed", _np(w.embed), "embed")]
    for i, lw in enumerate(w.layers):
        p = f"l{i}."
        out.append((p + "in_norm", _np(lw.input_norm), "norm"))
        out.append((p + "q", _np((lw.q * scale).t()), "linear"))
        out.append((p + "k", _np(lw.k.t()), "linear"))
        out.append((p + "v", _np(lw.v.t()), "linear"))
        out.append((p + "o", _np(lw.o.t()), "linear"))
        for n, b, s in (("q_bias", lw.q_bias, scale), ("k_bias", lw.k_bias, 1.0),
                        ("v_bias", lw.v_bias, 1.0), ("o_bias", lw.o_bias, 1.0)):
            if b is not None:
                out.append((p + n, _np(b * s), "bias"))
        out.append((p + "post_norm", _np(lw.post_norm), "norm"))
        out.append((p + "gate", _np(lw.gate.t()), "linear"))
        out.append((p + "up", _np(lw.up.t()), "linear"))
        out.append((p + "down", _np(lw.down.t()), "linear"))
    out.append(("final_norm", _np(w.final_norm), "norm"))
    if head != "fp32":
        out.append(("lm_head", _np((w.embed if w.lm_head is None else w.lm_head).t()), "linear"))
    elif w.lm_head is not None:
        out.append(("lm_head", _np(w.lm_head), "embed"))
    return out


def _layout(plan: list[tuple[str, np.ndarray, str]]) -> list[TensorRecord]:
    recs, off = [], 0
    for name, arr, kind in plan:
        off = (off + _ALIGN - 1) // _ALIGN * _ALIGN
        recs.append(TensorRecord(name, list(arr.shape), off, arr.nbytes, kind, str(arr.dtype)))
        off += arr.nbytes
    return recs


def _write_weights(plan: list[tuple[str, np.ndarray, str]], recs: list[TensorRecord], path: Path) -> str:
    h = hashlib.sha256()
    pos = 0
    with path.open("wb") as f:
        for (_, arr, _), rec in zip(plan, recs):
            if rec.offset > pos:
                pad = b"\0" * (rec.offset - pos)
                f.write(pad)
                h.update(pad)
            mv = memoryview(np.ascontiguousarray(arr)).cast("B")
            f.write(mv)
            h.update(mv)
            pos = rec.offset + rec.length
    return h.hexdigest()


# --------------------------------------------------------------------------------------
# graph builder
# --------------------------------------------------------------------------------------
class _Graph:
    def __init__(self, opset: int, precision: str = "fp32", block_size: int = 32, accuracy_level: int = 4) -> None:
        self.opset = opset
        self.precision, self.block_size, self.accuracy_level = precision, block_size, accuracy_level
        # the activations' type: fp16 graphs compute, cache and answer in half precision
        self.float = TensorProto.FLOAT16 if precision == "fp16" else TensorProto.FLOAT
        self.np_float: type = np.float16 if precision == "fp16" else np.float32
        self.shapes: dict[str, list[int]] = {}
        self._k: dict[str, int] = {}  # in-features of each quantized linear layer
        self.kinds: dict[str, str] = {}  # each quantized linear layer's type (int4, int8)
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[TensorProto] = []
        self._n = 0
        self._consts: dict[tuple[object, ...], str] = {}

    def op(self, op_type: str, inputs: list[str], out: str | None = None, **attrs: object) -> str:
        self._n += 1
        name = out or f"{op_type.lower()}_{self._n}"
        self.nodes.append(helper.make_node(op_type, inputs, [name], name=f"n{self._n}_{op_type}", **attrs))
        return name

    def const(self, value: object, dtype: type = np.int64) -> str:
        arr = np.asarray(value, dtype=dtype)
        key = (arr.dtype.str, arr.shape, arr.tobytes())
        if key not in self._consts:
            name = f"c{len(self._consts)}"
            self.inits.append(onnx.numpy_helper.from_array(arr, name))
            self._consts[key] = name
        return self._consts[key]

    def external(self, rec: TensorRecord) -> str:
        t = TensorProto()
        t.name = rec.name
        t.data_type = helper.np_dtype_to_tensor_dtype(np.dtype(rec.dtype))
        t.dims.extend(rec.shape)
        self.shapes[rec.name] = rec.shape
        t.data_location = TensorProto.EXTERNAL
        for k, v in (("location", WEIGHTS_FILE), ("offset", str(rec.offset)), ("length", str(rec.length))):
            e = t.external_data.add()
            e.key, e.value = k, v
        self.inits.append(t)
        return rec.name

    # composite ops --------------------------------------------------------------------
    def unsqueeze(self, x: str, axes: list[int]) -> str:
        return self.op("Unsqueeze", [x, self.const(axes)])

    def slice(self, x: str, start: int, end: int, axis: int) -> str:
        return self.op("Slice", [x, self.const([start]), self.const([end]), self.const([axis])])

    def fconst(self, value: object) -> str:
        """A constant of the activations' type."""
        return self.const(value, self.np_float)

    def rms_norm(self, x: str, weight: str, eps: float) -> str:
        # Pow/ReduceMean/Add/Sqrt/Div/Mul: the pattern onnxruntime fuses into
        # SimplifiedLayerNormalization. In fp16 the statistics are computed in fp32, as that
        # operator's stash_type does: a residual of a few hundred squares past fp16's 65504.
        half = self.float == TensorProto.FLOAT16
        if half:
            x = self.op("Cast", [x], to=TensorProto.FLOAT)
        sq = self.op("Pow", [x, self.const(2.0, np.float32)])
        if self.opset >= 18:
            mean = self.op("ReduceMean", [sq, self.const([-1])], keepdims=1)
        else:
            mean = self.op("ReduceMean", [sq], axes=[-1], keepdims=1)
        std = self.op("Sqrt", [self.op("Add", [mean, self.const(eps, np.float32)])])
        normed = self.op("Div", [x, std])
        if half:
            normed = self.op("Cast", [normed], to=TensorProto.FLOAT16)
        return self.op("Mul", [normed, weight])

    def linear(self, x: str, w: str, b: str | None = None) -> str:
        kind = self.kinds.get(w, "fp32")
        if kind == "int4":
            n, k = self.shapes[w + ".q"][0], self._k[w]
            y = self.op("MatMulNBits", [x, w + ".q", w + ".scale"], domain="com.microsoft", K=k, N=n, bits=4,
                        block_size=self.block_size, accuracy_level=self.accuracy_level)
        elif kind == "int8":
            xq, xs, xz = (f"{x}_q{self._n}", f"{x}_s{self._n}", f"{x}_z{self._n}")
            self._n += 1
            self.nodes.append(helper.make_node("DynamicQuantizeLinear", [x], [xq, xs, xz], name=f"n{self._n}_dql"))
            acc = self.op("MatMulInteger", [xq, w + ".q", xz])
            y = self.op("Mul", [self.op("Mul", [self.op("Cast", [acc], to=TensorProto.FLOAT), xs]), w + ".scale"])
        else:
            y = self.op("MatMul", [x, w])
        return self.op("Add", [y, b]) if b else y

    def lm_head(self, flat: str, names: dict[str, str]) -> str:
        """Logits of the final hidden states [tokens, hidden]: a quantized LM head's MatMul, or
        the fp32 head (the embedding when tied) by Gemm with its [vocab, hidden] layout."""
        if "lm_head" in self.kinds:
            return self.linear(flat, names["lm_head"])
        return self.op("Gemm", [flat, names.get("lm_head", names["embed"])], transB=1)

    def rope(self, x: str, cos: str, sin: str, half: int) -> str:
        x1 = self.slice(x, 0, half, -1)
        x2 = self.slice(x, half, 2 * half, -1)
        rot = self.op("Concat", [self.op("Neg", [x2]), x1], axis=-1)
        return self.op("Add", [self.op("Mul", [x, cos]), self.op("Mul", [rot, sin])])


def _positions(g: _Graph, w: SubnetWeights, phase: Phase) -> tuple[str, str, str | None]:
    """(cos, sin, causal mask or None): positions and RoPE tables, computed in the graph
    from the dynamic shapes (angles in fp32 at any precision)."""
    if phase == "prefill":
        seq = g.op("Gather", [g.op("Shape", ["input_ids"]), g.const(1)], axis=0)
        pos = g.op("Range", [g.const(0), seq, g.const(1)])
        kpos = g.unsqueeze(pos, [0])
        qpos = g.unsqueeze(pos, [1])
        mask = g.op("Where", [g.op("Greater", [kpos, qpos]), g.fconst(np.finfo(g.np_float).min), g.fconst(0.0)])
    else:
        past = g.op("Gather", [g.op("Shape", ["past_key_values.0.key"]), g.const(2)], axis=0)
        pos = g.op("Reshape", [past, g.const([1])])
        mask = None
    posf = g.unsqueeze(g.op("Cast", [pos], to=TensorProto.FLOAT), [1])
    freqs = g.op("Mul", [posf, g.const(w.inv_freq.numpy()[None, :], np.float32)])
    emb = g.op("Concat", [freqs, freqs], axis=1)
    cos, sin = g.op("Cos", [emb]), g.op("Sin", [emb])
    if w.rope_scaling != 1.0:
        s = g.const(w.rope_scaling, np.float32)
        cos, sin = g.op("Mul", [cos, s]), g.op("Mul", [sin, s])
    if g.float != TensorProto.FLOAT:
        cos, sin = g.op("Cast", [cos], to=g.float), g.op("Cast", [sin], to=g.float)
    return cos, sin, mask


def _attention_kv(g: _Graph, w: SubnetWeights, i: int, h: str, names: dict[str, str], rope: tuple[str, str],
                  phase: Phase, io: tuple[list[Any], list[Any]]) -> tuple[str, str]:
    """Layer ``i``'s keys and values with RoPE, appended to the past in decode; the present
    KV graph outputs (and past inputs) added to ``io``."""
    lw, p, hd = w.layers[i], f"l{i}.", w.head_dim
    G, (cos, sin), (inputs, outputs) = lw.num_kv_heads, rope, io
    k = g.linear(h, names[p + "k"], names.get(p + "k_bias"))
    k = g.op("Transpose", [g.op("Reshape", [k, g.const([0, 0, G, hd])])], perm=[0, 2, 1, 3])
    v = g.linear(h, names[p + "v"], names.get(p + "v_bias"))
    v = g.op("Transpose", [g.op("Reshape", [v, g.const([0, 0, G, hd])])], perm=[0, 2, 1, 3])
    kname, vname = f"present.{i}.key", f"present.{i}.value"
    if phase == "decode":
        pk, pv = f"past_key_values.{i}.key", f"past_key_values.{i}.value"
        inputs += [helper.make_tensor_value_info(n, g.float, ["batch", G, "past_sequence", hd]) for n in (pk, pv)]
        k = g.op("Concat", [pk, g.rope(k, cos, sin, hd // 2)], kname, axis=2)
        v = g.op("Concat", [pv, v], vname, axis=2)
    else:
        k = g.op("Identity", [g.rope(k, cos, sin, hd // 2)], kname)
        v = g.op("Identity", [v], vname)
    total = "sequence" if phase == "prefill" else "total_sequence"
    outputs += [helper.make_tensor_value_info(n, g.float, ["batch", G, total, hd]) for n in (kname, vname)]
    return k, v


def _decoder_layer(g: _Graph, w: SubnetWeights, i: int, x: str, names: dict[str, str],
                   rope: tuple[str, str, str | None], phase: Phase, io: tuple[list[Any], list[Any]]) -> str:
    """One GQA decoder layer in standard operators; returns the residual stream after it."""
    lw, p, hd = w.layers[i], f"l{i}.", w.head_dim
    G, hpg = lw.num_kv_heads, lw.num_heads // lw.num_kv_heads
    cos, sin, mask = rope
    h = g.rms_norm(x, names[p + "in_norm"], w.rms_norm_eps)
    q = g.linear(h, names[p + "q"], names.get(p + "q_bias"))
    q = g.op("Transpose", [g.op("Reshape", [q, g.const([0, 0, G, hpg, hd])])], perm=[0, 2, 3, 1, 4])
    q = g.rope(q, cos, sin, hd // 2)  # [B,G,hpg,S,hd]
    k, v = _attention_kv(g, w, i, h, names, (cos, sin), phase, io)
    kt = g.unsqueeze(g.op("Transpose", [k], perm=[0, 1, 3, 2]), [2])  # [B,G,1,hd,T]
    scores = g.op("MatMul", [q, kt])  # [B,G,hpg,S,T]
    if mask is not None:
        scores = g.op("Add", [scores, mask])
    probs = g.op("Softmax", [scores], axis=-1)
    ctx = g.op("MatMul", [probs, g.unsqueeze(v, [2])])  # [B,G,hpg,S,hd]
    ctx = g.op("Reshape", [g.op("Transpose", [ctx], perm=[0, 3, 1, 2, 4]), g.const([0, 0, -1])])
    x = g.op("Add", [x, g.linear(ctx, names[p + "o"], names.get(p + "o_bias"))])
    h = g.rms_norm(x, names[p + "post_norm"], w.rms_norm_eps)
    gate = g.linear(h, names[p + "gate"])
    act = g.op("Mul", [g.op("Mul", [gate, g.op("Sigmoid", [gate])]), g.linear(h, names[p + "up"])])
    return g.op("Add", [x, g.linear(act, names[p + "down"])])


def _initializer_names(g: _Graph, w: SubnetWeights, recs: list[TensorRecord], options: ExportOptions) -> dict[str, str]:
    names = {r.name: g.external(r) for r in recs}
    # a quantized linear layer is named by its weight; its parts carry suffixes
    # (by the record's kind: an fp32 query projection is also named "l<i>.q")
    quantized = [r for r in recs if r.kind in ("q4", "q8")]
    for r in quantized:
        names[r.name[:-2]] = r.name[:-2]
        g.kinds[r.name[:-2]] = {"q4": "int4", "q8": "int8"}[r.kind]
    g._k = {r.name[:-2]: _in_features(w, r.name[:-2]) for r in quantized}
    return names


def build_graph(w: SubnetWeights, recs: list[TensorRecord], phase: Phase, options: ExportOptions) -> onnx.ModelProto:
    block = options.mix.block_size if options.mix is not None else options.block_size
    g = _Graph(options.opset, options.precision, block, options.accuracy_level)
    names = _initializer_names(g, w, recs, options)
    if options.graph != "plain":
        from export.onnx_fused import build_fused_graph

        return _model(g, *build_fused_graph(g, w, names, phase, shared=options.graph == "fused-shared"), phase, options)
    vocab = int(w.embed.shape[0])
    inputs = [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "sequence" if phase == "prefill" else 1])]
    outputs = [helper.make_tensor_value_info("logits", g.float, ["batch", 1, vocab])]
    rope = _positions(g, w, phase)
    x = g.op("Gather", [names["embed"], "input_ids"], axis=0)
    for i in range(len(w.layers)):
        x = _decoder_layer(g, w, i, x, names, rope, phase, (inputs, outputs))
    x = g.rms_norm(x, names["final_norm"], w.rms_norm_eps)
    if phase == "prefill":
        x = g.slice(x, -1, np.iinfo(np.int64).max, 1)
    flat = g.op("Reshape", [x, g.const([-1, w.hidden_size])])
    g.op("Unsqueeze", [g.lm_head(flat, names), g.const([1])], "logits")
    return _model(g, inputs, outputs, phase, options)


def _model(g: _Graph, inputs: list[Any], outputs: list[Any], phase: Phase, options: ExportOptions) -> onnx.ModelProto:
    graph = helper.make_graph(g.nodes, f"edgenas_{phase}", inputs, outputs, g.inits)
    opsets = [helper.make_opsetid("", options.opset)]
    if "int4" in g.kinds.values() or options.graph != "plain":
        opsets.append(helper.make_opsetid("com.microsoft", 1))
    model = helper.make_model(graph, opset_imports=opsets,
                              producer_name="edgenas", producer_version=str(EXPORTER_VERSION))
    model.ir_version = options.resolved_ir_version
    return model


# --------------------------------------------------------------------------------------
# content-addressed export
# --------------------------------------------------------------------------------------
def _in_features(w: SubnetWeights, name: str) -> int:
    """K of linear layer ``l{i}.{proj}`` (or the LM head): the input width its weight multiplies."""
    if name == "lm_head":
        return int(w.embed.shape[1])
    layer, proj = name.split(".")
    lw = w.layers[int(layer[1:])]
    return int(getattr(lw, proj).shape[1])


def export_key(w: SubnetWeights, options: ExportOptions) -> str:
    ident = {"exporter": EXPORTER_VERSION, "config": w.config.to_dict(), "opset": options.opset,
             "ir": options.resolved_ir_version, "weights": options.weights}
    if options.precision != "fp32":
        int4 = options.precision == "int4"
        ident.update(precision=options.precision, block_size=options.block_size if int4 else None,
                     accuracy_level=options.accuracy_level if int4 else None)
    if w.weights_id is not None and options.weights == "real":
        ident["weights_id"] = w.weights_id
    if options.graph != "plain":
        ident["graph"] = options.graph
    if options.mix is not None:
        ident.update(mix=options.mix.to_dict(), accuracy_level=options.accuracy_level)
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:20]




def _complete(folder: Path, phases: tuple[Phase, ...]) -> bool:
    try:
        done = json.loads((folder / MANIFEST).read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return all(p in done.get("graphs", {}) for p in phases)


def _publish(tmp: Path, folder: Path, phases: tuple[Phase, ...]) -> None:
    """Move a finished export into place. Another process exporting the same key (same
    content) may have published first and may be reading it: then its copy stays."""
    if _complete(folder, phases):
        return
    if folder.exists():
        shutil.rmtree(folder, ignore_errors=True)  # an incomplete export of fewer phases
    try:
        os.replace(tmp, folder)
    except OSError:
        if not _complete(folder, phases):
            raise


def export_subnet(
    w: SubnetWeights,
    root: Path,
    options: ExportOptions | None = None,
    phases: tuple[Phase, ...] = PHASES,
) -> ExportedSubnet:
    """Export ``w`` under ``root/<key>/`` unless that export already exists; return it."""
    options = options or ExportOptions()
    options.validate()
    key = export_key(w, options)
    folder = Path(root) / key
    manifest = folder / MANIFEST
    if manifest.is_file():
        done = ExportedSubnet.from_dict(json.loads(manifest.read_text()))
        done.folder = folder
        if all(p in done.graphs for p in phases):
            log.debug("export %s already exists", key)
            return done
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=".tmp-"))
    try:
        plan = plan_weights(w, options.precision, options.block_size, options.mix)
        recs = _layout(plan)
        weights_sha = None
        if options.weights == "real":
            weights_sha = _write_weights(plan, recs, tmp / WEIGHTS_FILE)
        graphs, shas = {}, {}
        for phase in phases:
            data = build_graph(w, recs, phase, options).SerializeToString()
            fname = f"{phase}.onnx"
            (tmp / fname).write_bytes(data)
            graphs[phase], shas[phase] = fname, hashlib.sha256(data).hexdigest()
        size = recs[-1].offset + recs[-1].length if recs else 0
        done = ExportedSubnet(key, folder, graphs, shas, WEIGHTS_FILE, size, weights_sha,
                              {"opset": options.opset, "ir_version": options.resolved_ir_version,
                               "weights": options.weights, "exporter": EXPORTER_VERSION,
                               "precision": options.precision, "block_size": options.block_size,
                               "accuracy_level": options.accuracy_level, "graph": options.graph,
                               **({} if options.mix is None else {"mix": options.mix.to_dict()})}, recs)
        rec = done.to_dict()
        rec["config"] = w.config.to_dict()
        (tmp / MANIFEST).write_text(json.dumps(rec, indent=1))
        _publish(tmp, folder, phases)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return done
