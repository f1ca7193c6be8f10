"""End-to-end checks on the real SmolLM2-135M-Instruct (a minute in all)."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch

from export.onnx_graphs import ExportOptions, export_subnet
from subnets.config import SubnetConfig
from subnets.extract import build_model
from subnets.importance import compute_importance
from subnets.quality import perplexity, tokenize
from subnets.textdata import stdlib_docstrings

pytestmark = pytest.mark.slow


def test_smollm2_is_the_published_architecture(smollm2) -> None:
    d = smollm2.space.dims
    assert (d.num_layers, d.hidden_size, d.num_heads, d.num_kv_heads, d.intermediate_size) == (30, 576, 9, 3, 1536)
    assert smollm2.base.base_id.startswith("smollm2-135m-instruct@")


def test_importance_ranking_is_what_keeps_quality(smollm2) -> None:
    bid = smollm2.base.base_id
    full = smollm2.perplexity(smollm2.space.full())
    assert full < 40
    by_bi = smollm2.perplexity(SubnetConfig.uniform(bid, smollm2.importance.kept_layers(24), 3, 3, 1536))
    first = smollm2.perplexity(SubnetConfig.uniform(bid, range(24), 3, 3, 1536))
    assert by_bi < 4 * full and first > 100 * by_bi
    mlp = SubnetConfig.uniform(bid, range(30), 3, 3, 1024)
    act = smollm2.perplexity(mlp)
    toks = tokenize(stdlib_docstrings("calibration"), smollm2.base.tokenizer, budget=1024, window=256)
    mag_imp = compute_importance(smollm2.base, toks, "magnitude")
    from subnets.extract import extract

    mag = perplexity(extract(smollm2.base, mag_imp, mlp), smollm2.eval_tokens())
    assert act < 3 * full and mag > 10 * act


def test_onnx_matches_torch_on_smollm2(smollm2, tmp_path) -> None:
    cfg = smollm2.space.sample(1, seed=5, layer_ranking=smollm2.importance.layer_ranking())[0]
    for config in (smollm2.space.full(), cfg):
        w = smollm2.weights(config)
        exp = export_subnet(w, tmp_path, ExportOptions())
        x = smollm2.eval_tokens().windows[:1, :64]
        so = ort.SessionOptions()
        so.intra_op_num_threads = 1
        got = ort.InferenceSession(str(exp.path("prefill")), so, providers=["CPUExecutionProvider"]).run(
            ["logits"], {"input_ids": x.numpy()})[0]
        with torch.no_grad():
            want = build_model(w)(x).logits[:, -1].numpy()
        # logits span about +-30; float32 reassociation differences stay far below 1e-3
        np.testing.assert_allclose(got[:, 0], want, atol=1e-3)
