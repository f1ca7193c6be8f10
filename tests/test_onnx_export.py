from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from export.onnx_graphs import WEIGHTS_FILE, ExportOptions, export_subnet, min_ir_version
from profiler.sweep import SweepSpec
from subnets.basemodel import load_base_model
from subnets.config import LayerChoice, SubnetConfig
from subnets.errors import ConfigError, ExportError
from subnets.extract import build_model, slice_weights
from subnets.importance import compute_importance
from subnets.quality import tokenize
from subnets.textdata import stdlib_docstrings
from tests.tiny import make_tiny_model

# float32 graphs against float32 torch on tiny models: observed max error ~5e-6; int4 graphs
# against torch on the same dequantized weights: the same. int8 graphs quantize activations per
# tensor: an fp32 input 1e-7 away from a rounding boundary lands one step over, so the graph and
# its exact emulation in torch agree to within a few such steps (observed 0.5% of the logits'
# range on a decode step), not to 1e-4.
# int4 at accuracy level 4 (int8 compute, activations quantized per block; the default)
# against torch on the dequantized weights: observed 2.2% of the logits' range.
ATOL = 1e-4
REL = {"int8": 0.02, "int4-acc4": 0.05, "fp16": 0.02}


def close(actual, desired, precision: str) -> None:
    atol = REL[precision] * float(np.abs(desired).max()) if precision in REL else ATOL
    np.testing.assert_allclose(actual, desired, atol=atol)


def session(path) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def check_parity(base, imp, config: SubnetConfig, root, opset: int, precision: str = "fp32", block_size: int = 32,
                 accuracy_level: int = 0, graph: str = "plain", mix=None) -> None:
    """The graph against torch running exactly the graph's arithmetic: for int4 the same
    dequantized weights, for int8 those and per-tensor uint8 activations (emulated). int4 at
    accuracy level 4 quantizes activations per block too: checked at int8's tolerance. With a
    precision ``mix``, each MatMul at its layer's type against ``MixArithmetic``'s emulation."""
    from export.quantize import MixArithmetic, Precision, dequantized, emulate

    w = slice_weights(base, imp, config)
    if mix is None and precision in ("int8", "int4"):  # the quality objective's own view (the int8 head's too)
        model = Precision(precision, block_size).model(w)
    elif mix is None:
        model = emulate(build_model(dequantized(w, precision, block_size)), precision)
    else:
        model = MixArithmetic(mix).model(w)
        precision = "int8" if "int8" in (*mix.attention, *mix.mlp) else "fp32"
    exp = export_subnet(w, root, ExportOptions(opset=opset, precision="fp32" if mix else precision,
                                               block_size=block_size, accuracy_level=accuracy_level, graph=graph,
                                               mix=mix))
    # int4 graphs multiply by an int8 head: its logits carry int8's per-tensor activation rounding
    precision = "int4-acc4" if precision == "int4" and accuracy_level == 4 else "int8" if precision == "int4" else precision
    if graph == "plain":  # the fused graph's SimplifiedLayerNormalization is onnxruntime's, unknown to onnx
        onnx.checker.check_model(str(exp.path("prefill")))
    x = torch.randint(0, base.dims.vocab_size, (2, 17), generator=torch.Generator().manual_seed(0))
    pre = session(exp.path("prefill")).run(None, {"input_ids": x.numpy()})
    with torch.no_grad():
        ref = model(x, use_cache=True)
    pre = [a.astype(np.float32) for a in pre]
    close(pre[0][:, 0], ref.logits[:, -1].numpy(), precision)
    cache = ref.cache if hasattr(ref, "cache") else ref.past_key_values
    for i in range(len(config.layers)):
        close(pre[1 + 2 * i], cache.layers[i].keys.numpy(), precision)
        close(pre[2 + 2 * i], cache.layers[i].values.numpy(), precision)
    # three decode steps, each fed the previous step's present KV
    dtype = np.float16 if precision == "fp16" else np.float32
    feeds = {f"past_key_values.{i}.{kv}": pre[1 + 2 * i + j].astype(dtype) for i in range(len(config.layers)) for j, kv in enumerate(("key", "value"))}
    dec = session(exp.path("decode"))
    for step in range(3):
        nxt = torch.tensor([[5 + step], [7 + step]])
        out = dec.run(None, {"input_ids": nxt.numpy(), **feeds})
        with torch.no_grad():
            ref = model(nxt, cache=cache, use_cache=True)
        cache = ref.cache if hasattr(ref, "cache") else ref.past_key_values
        close(out[0][:, 0].astype(np.float32), ref.logits[:, -1].numpy(), precision)
        assert out[1].shape == (2, config.layers[0].kv_groups, 18 + step, base.dims.head_dim)
        feeds = {f"past_key_values.{i}.{kv}": out[1 + 2 * i + j] for i in range(len(config.layers)) for j, kv in enumerate(("key", "value"))}


@pytest.mark.parametrize("opset", [13, 17, 18])
def test_onnxruntime_matches_torch(tiny_base, tiny_importance, tmp_path, opset: int) -> None:
    for config in [
        tiny_base.space().full(),
        SubnetConfig(tiny_base.base_id, (LayerChoice(0, 1, 2, 64), LayerChoice(2, 2, 3, 128), LayerChoice(3, 2, 1, 32))),
    ]:
        check_parity(tiny_base, tiny_importance, config, tmp_path, opset)


@pytest.mark.parametrize(("precision", "block_size", "level"), [("int8", 32, 0), ("int4", 32, 0), ("int4", 128, 0),
                                                                ("int4", 32, 4), ("fp16", 32, 0)])
def test_quantized_graphs_compute_their_stated_arithmetic(tiny_base, tiny_importance, tmp_path, precision,
                                                          block_size, level) -> None:
    """int4 (MatMulNBits) and int8 (dynamic, MatMulInteger) graphs match torch on the same
    quantized weights (and, for int8, activations) within the fp32 tolerance; they are
    smaller, and farther from the fp32 model (the quantization error itself)."""
    per_layer = SubnetConfig(tiny_base.base_id, (LayerChoice(0, 1, 2, 64), LayerChoice(2, 2, 3, 128)))
    for config in (tiny_base.space().full(), per_layer):
        check_parity(tiny_base, tiny_importance, config, tmp_path, 17, precision, block_size, level)
    w = slice_weights(tiny_base, tiny_importance, tiny_base.space().full())
    fp32 = export_subnet(w, tmp_path / "f", ExportOptions())
    quant = export_subnet(w, tmp_path / "q", ExportOptions(precision=precision, block_size=block_size))
    assert quant.weights_bytes < fp32.weights_bytes and quant.options["precision"] == precision
    ops = {n.op_type for n in onnx.load(str(quant.path("decode")), load_external_data=False).graph.node}
    assert ("MatMulNBits" in ops) == (precision == "int4") and ("MatMulInteger" in ops) == (precision in ("int8", "int4"))
    if precision in ("int4", "int8"):  # every linear layer, and the LM head at int8; the embedding gathered from fp32
        matmuls = [n.op_type for n in onnx.load(str(quant.path("decode")), load_external_data=False).graph.node]
        layers = 7 * len(w.layers)
        assert matmuls.count("MatMulNBits") == (layers if precision == "int4" else 0)
        assert matmuls.count("MatMulInteger") == (1 if precision == "int4" else layers + 1)
        assert next(r for r in quant.tensors if r.name == "embed").dtype == "float32"
    if precision in ("int4", "int8"):
        check_packed_weights(w, quant, precision, block_size)
    # the quantization error itself: near the fp32 graph's logits, and not equal to them
    x = np.random.default_rng(1).integers(0, tiny_base.dims.vocab_size, (2, 17))
    ref = session(fp32.path("prefill")).run(None, {"input_ids": x})[0].astype(np.float32)
    got = session(quant.path("prefill")).run(None, {"input_ids": x})[0].astype(np.float32)
    err = float(np.abs(got - ref).max() / np.ptp(ref))
    assert 1e-6 < err < {"int8": 0.1, "int4": 0.6, "fp16": 0.01}[precision], err  # random tiny weights: int4 is coarse


def _stored(exp, name: str) -> np.ndarray:
    rec = next(r for r in exp.tensors if r.name == name)
    raw = np.fromfile(exp.folder / exp.weights_file, dtype=np.uint8, count=rec.length, offset=rec.offset)
    return raw.view(np.dtype(rec.dtype)).reshape(rec.shape)


def check_packed_weights(w, exp, precision: str, block_size: int) -> None:
    """The weights the graph holds, unpacked by the formats' own definitions (MatMulNBits:
    two 4-bit values a byte, low nibble first, zero point 8, one scale per block of inputs;
    int8: one scale per output column, +-63), equal a quantization written here from the
    same definitions, not by the exporter's quantizer."""
    for i, lw in enumerate(w.layers):
        for name in ("gate", "up", "down"):
            dense = getattr(lw, name).t().detach().to(torch.float32).numpy()  # [in, out]
            k, n = dense.shape
            packed, scale = _stored(exp, f"l{i}.{name}.q"), _stored(exp, f"l{i}.{name}.scale")
            if precision == "int8":
                want_scale = np.abs(dense).max(axis=0) / 63
                want = np.clip(np.rint(dense / want_scale), -63, 63) * want_scale
                np.testing.assert_allclose(packed.astype(np.float32) * scale, want, rtol=1e-5, atol=1e-7)
                continue
            nb = -(-k // block_size)
            q = np.stack([packed & 0x0F, packed >> 4], axis=-1).reshape(n, nb * block_size).astype(np.float32) - 8
            got = (q.reshape(n, nb, block_size) * scale.reshape(n, nb, 1)).reshape(n, -1)[:, :k].T
            blocks = np.zeros((nb * block_size, n), np.float32)
            blocks[:k] = dense
            blocks = blocks.T.reshape(n, nb, block_size)
            bscale = np.abs(blocks).max(axis=2, keepdims=True) / 7
            want = (np.clip(np.rint(blocks / np.where(bscale > 0, bscale, 1)), -8, 7) * bscale).reshape(n, -1)[:, :k].T
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)


def test_a_graph_only_quantized_export_runs_on_board_made_weights(tiny_ws, tmp_path) -> None:
    """Profiling ships int4/int8 graphs without weights; the board fills the packed values
    and scales by kind and dtype. The precision is part of the back-end tag and protocol."""
    from export.mix import PrecisionMix
    from profiler.store import Store
    from tests.helpers import sweep

    db = tmp_path / "m.db"
    cs = tiny_ws.space.sample(2, seed=31)
    for precision in ("int4", "int8"):
        s = sweep(tiny_ws, "local", db, cs, phases=("prefill", "decode"), precision=precision)
        assert s.measured == 4 and not s.failed
    # a per-MatMul mix (each layer's types, the LM head at int4) is a back-end of its own
    L = len(tiny_ws.space.full().layers)
    mix = PrecisionMix("onnxruntime", "int4", ("int4",) * (L - 1) + ("fp32",), ("int8",) + ("int4",) * (L - 1))
    s = sweep(tiny_ws, "local", db, [tiny_ws.space.full()], phases=("prefill", "decode"), mix=mix)
    assert s.measured == 2 and not s.failed
    store = Store(db)
    try:
        rows = list(store.measurement_rows())
        protocols = store.protocols()
    finally:
        store.close()
    tag = f"ort-cpu:mix-{mix.digest()}"
    assert {r["backend"] for r in rows} == {"ort-cpu:int4-b32-qhead", "ort-cpu:int8-qhead", tag}
    assert {protocols[r["protocol"]].precision for r in rows} == {"int4-b32-qhead", "int8-qhead", f"mix-{mix.digest()}"}
    with pytest.raises(ConfigError, match=r"cannot be swept on llama\.cpp"):
        SweepSpec(backend="llama.cpp", mix=mix).check()


def test_qwen2_biases_and_untied_head(tmp_path) -> None:
    base = load_base_model(make_tiny_model(tmp_path / "qwen", model_type="qwen2", tie=False, seed=1))
    assert base.dims.attention_bias and not base.dims.tie_word_embeddings
    toks = tokenize(stdlib_docstrings("calibration", 20_000), base.tokenizer, budget=256, window=64)
    imp = compute_importance(base, toks)
    check_parity(base, imp, SubnetConfig(base.base_id, (LayerChoice(1, 1, 3, 64), LayerChoice(3, 2, 2, 128))), tmp_path / "e", 17)


def test_export_is_content_addressed(tiny_base, tiny_importance, tmp_path) -> None:
    w = slice_weights(tiny_base, tiny_importance, tiny_base.space().full())
    a = export_subnet(w, tmp_path)
    mtime = a.path("prefill").stat().st_mtime_ns
    b = export_subnet(w, tmp_path)
    assert a.key == b.key and b.path("prefill").stat().st_mtime_ns == mtime
    assert len([p for p in tmp_path.iterdir() if not p.name.startswith(".")]) == 1
    c = export_subnet(w, tmp_path, ExportOptions(opset=18))
    assert c.key != a.key
    w2 = slice_weights(tiny_base, tiny_importance, SubnetConfig.uniform(tiny_base.base_id, [0, 1], 2, 3, 64))
    assert export_subnet(w2, tmp_path).key != a.key
    # both graphs share one weights file
    assert (a.folder / WEIGHTS_FILE).stat().st_size == a.weights_bytes


def test_graph_only_export_writes_no_weights(tiny_base, tiny_importance, tmp_path) -> None:
    w = slice_weights(tiny_base, tiny_importance, tiny_base.space().full())
    e = export_subnet(w, tmp_path, ExportOptions(weights="none"))
    assert not (e.folder / WEIGHTS_FILE).exists() and e.weights_sha256 is None
    assert sum(t.length for t in e.tensors) <= e.weights_bytes
    assert {t.kind for t in e.tensors} == {"embed", "linear", "norm"}
    assert e.path("prefill").stat().st_size < 100_000


def test_opset_and_ir_version_are_selectable(tiny_base, tiny_importance, tmp_path) -> None:
    w = slice_weights(tiny_base, tiny_importance, tiny_base.space().full())
    e = export_subnet(w, tmp_path, ExportOptions(opset=14, ir_version=8))
    m = onnx.load(str(e.path("decode")), load_external_data=False)
    assert m.opset_import[0].version == 14 and m.ir_version == 8
    assert min_ir_version(14) == 7
    with pytest.raises(ExportError, match="opset 9 is not supported"):
        ExportOptions(opset=9).validate()
    with pytest.raises(ExportError, match="cannot carry opset 21"):
        ExportOptions(opset=21, ir_version=7).validate()


@pytest.fixture(scope="module")
def tiny16(tmp_path_factory):
    """A tiny Llama with head size 16: onnxruntime's GroupQueryAttention needs a multiple of 16."""
    base = load_base_model(make_tiny_model(tmp_path_factory.mktemp("t16") / "tiny16", hidden=64, heads=4, kv_heads=2,
                                           head_dim=16))
    tokens = tokenize(stdlib_docstrings("calibration", 20_000), base.tokenizer, budget=512, window=128)
    return base, compute_importance(base, tokens)


@pytest.mark.parametrize(("precision", "level"), [("fp32", 0), ("int4", 0), ("fp16", 0)])
def test_the_fused_graph_computes_what_torch_does(tiny16, tmp_path, precision, level) -> None:
    """GroupQueryAttention (RoPE, mask and KV append inside) and SkipSimplifiedLayerNormalization,
    per layer with its own head and KV-head counts: prefill and three decode steps as torch."""
    base, imp = tiny16
    per_layer = SubnetConfig(base.base_id, (LayerChoice(0, 1, 2, 64), LayerChoice(2, 2, 1, 128), LayerChoice(3, 2, 2, 32)))
    for config in (base.space().full(), per_layer):
        check_parity(base, imp, config, tmp_path, 17, precision, accuracy_level=level, graph="fused")
    w = slice_weights(base, imp, per_layer)
    exp = export_subnet(w, tmp_path / "f", ExportOptions(graph="fused"))
    ops = [n.op_type for n in onnx.load(str(exp.path("decode")), load_external_data=False).graph.node]
    assert ops.count("GroupQueryAttention") == 3 and ops.count("SkipSimplifiedLayerNormalization") == 6
    assert "Softmax" not in ops and "Concat" not in ops


def test_the_shared_kv_buffer_is_appended_in_place(tiny16, tmp_path) -> None:
    """fused-shared: the decode graph's past and present are one preallocated buffer per layer
    (bound so), GroupQueryAttention writes each step's key and value into it in place, and
    the logits are torch's."""
    base, imp = tiny16
    config = SubnetConfig(base.base_id, (LayerChoice(0, 1, 2, 64), LayerChoice(2, 2, 1, 128), LayerChoice(3, 2, 2, 32)))
    w = slice_weights(base, imp, config)
    exp = export_subnet(w, tmp_path, ExportOptions(graph="fused-shared"))
    x = torch.randint(0, base.dims.vocab_size, (1, 20), generator=torch.Generator().manual_seed(1))
    pre = session(exp.path("prefill")).run(None, {"input_ids": x[:, :16].numpy()})
    dec, max_len = session(exp.path("decode")), 32
    binding, buffers = dec.io_binding(), []
    for i in range(len(config.layers)):
        for j, kv in enumerate(("key", "value")):
            buf = np.zeros((1, pre[1 + 2 * i + j].shape[1], max_len, base.dims.head_dim), np.float32)
            buf[:, :, :16] = pre[1 + 2 * i + j]
            buffers.append(ort.OrtValue.ortvalue_from_numpy(buf))
            binding.bind_ortvalue_input(f"past_key_values.{i}.{kv}", buffers[-1])
            binding.bind_ortvalue_output(f"present.{i}.{kv}", buffers[-1])
    binding.bind_output("logits")
    for pos in range(16, 20):
        binding.bind_cpu_input("input_ids", x[:, pos:pos + 1].numpy())
        binding.bind_cpu_input("attention_mask", np.ones((1, pos + 1), np.int64))
        dec.run_with_iobinding(binding)
    with torch.no_grad():
        ref = build_model(w)(x, use_cache=True)
    close(binding.get_outputs()[-1].numpy()[:, 0], ref.logits[:, -1].numpy(), "fp32")
    cache = ref.cache if hasattr(ref, "cache") else ref.past_key_values
    close(buffers[0].numpy()[:, :, :20], cache.layers[0].keys.numpy(), "fp32")
    assert binding.get_outputs()[0].data_ptr() == buffers[0].data_ptr()


def test_the_fused_graph_refuses_a_head_size_it_cannot_run(tiny_base, tiny_importance, tmp_path) -> None:
    w = slice_weights(tiny_base, tiny_importance, tiny_base.space().full())  # head size 8
    with pytest.raises(ExportError, match="divisible by 16"):
        export_subnet(w, tmp_path, ExportOptions(graph="fused"))


def test_a_fused_graph_sweep_is_its_own_back_end(tiny16, tmp_path) -> None:
    from profiler.store import Store
    from subnets.workspace import Workspace
    from tests.helpers import sweep

    base, imp = tiny16
    ws = Workspace(base, imp, base.space(16), eval_budget=256)
    db = tmp_path / "m.db"
    for graph in ("fused", "fused-shared"):
        s = sweep(ws, "local", db, ws.space.sample(2, 0), graph=graph)
        assert s.measured == 4 and not s.failed, s.failed
    store = Store(db)
    assert {r["backend"] for r in store.measurement_rows()} == {"ort-cpu:fused", "ort-cpu:fused-shared"}
    assert "fused" in json.loads(store.devices()[0]["info"])["hello"]["onnxruntime"]["graphs"]
    store.close()


def test_a_mixed_precision_graph_computes_its_mix(tiny16, tmp_path) -> None:
    """Each layer's MatMuls at their own type (fp32, int8 MatMulInteger, int4 MatMulNBits) in
    one graph: prefill and decode steps as torch computes the same mix; the file holds
    exactly that, and a layer's type changes its weights' bytes."""
    from export.mix import PrecisionMix

    base, imp = tiny16
    config = SubnetConfig(base.base_id, (LayerChoice(0, 1, 2, 64), LayerChoice(2, 2, 1, 128), LayerChoice(3, 2, 2, 32)))
    int4_only = PrecisionMix("onnxruntime", "fp32", ("int4", "fp32", "int4"), ("fp32", "int4", "int4"))
    check_parity(base, imp, config, tmp_path / "a", 17, mix=int4_only)
    with_int8 = PrecisionMix("onnxruntime", "fp32", ("int8", "fp32", "int4"), ("int4", "int8", "fp32"))
    check_parity(base, imp, config, tmp_path / "b", 17, mix=with_int8)
    for head in ("int4", "int8"):  # the LM head as a quantized copy, the embedding gathered from fp32
        check_parity(base, imp, config, tmp_path / f"h{head}", 17, mix=replace(with_int8, head=head))
    w = slice_weights(base, imp, config)
    exp = export_subnet(w, tmp_path / "c", ExportOptions(mix=with_int8))
    kinds = {r.name: r.kind for r in exp.tensors}
    assert kinds["l0.q.q"] == "q8" and kinds["l0.gate.q"] == "q4" and kinds["l1.q"] == "linear" and \
        kinds["l1.gate.q"] == "q8" and kinds["l2.gate"] == "linear" and exp.options["mix"] == with_int8.to_dict()
    ops = [n.op_type for n in onnx.load(str(exp.path("decode")), load_external_data=False).graph.node]
    assert ops.count("MatMulNBits") == 4 + 3 and ops.count("MatMulInteger") == 4 + 3
    uniform = export_subnet(w, tmp_path / "d", ExportOptions(mix=PrecisionMix.uniform("onnxruntime", "fp32", 3)))
    assert exp.key != uniform.key and exp.weights_bytes < uniform.weights_bytes


def test_a_mix_the_runtime_cannot_run_is_refused() -> None:
    from export.mix import PrecisionMix
    from subnets.errors import ConfigError

    with pytest.raises(ConfigError, match="onnxruntime has no weight type q4_0") as e:
        PrecisionMix("onnxruntime", "fp32", ("q4_0",), ("int4",))
    assert "fp32, int8, int4" in e.value.fix
    with pytest.raises(ConfigError, match=r"llama\.cpp has no weight type q4_k"):
        PrecisionMix("llama.cpp", "q8_0", ("q4_k",), ("q4_0",))
    with pytest.raises(ConfigError, match="one of each per kept layer"):
        PrecisionMix("llama.cpp", "q8_0", ("q8_0", "q4_0"), ("q4_0",))
