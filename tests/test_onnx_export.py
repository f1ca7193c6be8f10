from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from subnets.basemodel import load_base_model
from subnets.config import LayerChoice, SubnetConfig
from subnets.errors import ExportError
from subnets.extract import build_model, slice_weights
from subnets.importance import compute_importance
from subnets.onnx_export import WEIGHTS_FILE, ExportOptions, export_subnet, min_ir_version
from subnets.quality import tokenize
from subnets.textdata import stdlib_docstrings
from tests.tiny import make_tiny_model

# float32 graphs against float32 torch on tiny models: observed max error ~5e-6
ATOL = 1e-4


def session(path) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def check_parity(base, imp, config: SubnetConfig, root, opset: int) -> None:
    w = slice_weights(base, imp, config)
    model = build_model(w)
    exp = export_subnet(w, root, ExportOptions(opset=opset))
    onnx.checker.check_model(str(exp.path("prefill")))
    x = torch.randint(0, base.dims.vocab_size, (2, 17), generator=torch.Generator().manual_seed(0))
    pre = session(exp.path("prefill")).run(None, {"input_ids": x.numpy()})
    with torch.no_grad():
        ref = model(x, use_cache=True)
    np.testing.assert_allclose(pre[0][:, 0], ref.logits[:, -1].numpy(), atol=ATOL)
    cache = ref.cache if hasattr(ref, "cache") else ref.past_key_values
    for i in range(len(config.layers)):
        np.testing.assert_allclose(pre[1 + 2 * i], cache.layers[i].keys.numpy(), atol=ATOL)
        np.testing.assert_allclose(pre[2 + 2 * i], cache.layers[i].values.numpy(), atol=ATOL)
    # three decode steps, each fed the previous step's present KV
    feeds = {f"past_key_values.{i}.{kv}": pre[1 + 2 * i + j] for i in range(len(config.layers)) for j, kv in enumerate(("key", "value"))}
    dec = session(exp.path("decode"))
    for step in range(3):
        nxt = torch.tensor([[5 + step], [7 + step]])
        out = dec.run(None, {"input_ids": nxt.numpy(), **feeds})
        with torch.no_grad():
            ref = model(nxt, cache=cache, use_cache=True)
        cache = ref.cache if hasattr(ref, "cache") else ref.past_key_values
        np.testing.assert_allclose(out[0][:, 0], ref.logits[:, -1].numpy(), atol=ATOL)
        assert out[1].shape == (2, config.layers[0].kv_groups, 18 + step, base.dims.head_dim)
        feeds = {f"past_key_values.{i}.{kv}": out[1 + 2 * i + j] for i in range(len(config.layers)) for j, kv in enumerate(("key", "value"))}


@pytest.mark.parametrize("opset", [13, 17, 18])
def test_onnxruntime_matches_torch(tiny_base, tiny_importance, tmp_path, opset: int) -> None:
    for config in [
        tiny_base.space().full(),
        SubnetConfig(tiny_base.base_id, (LayerChoice(0, 1, 2, 64), LayerChoice(2, 2, 3, 128), LayerChoice(3, 2, 1, 32))),
    ]:
        check_parity(tiny_base, tiny_importance, config, tmp_path, opset)


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
