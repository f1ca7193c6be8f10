from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from subnets.config import LayerChoice, SubnetConfig
from subnets.errors import InputFileError
from subnets.extract import extract, load_subnet, save_subnet
from subnets.importance import Importance, compute_importance
from subnets.quality import perplexity, tokenize
from subnets.textdata import Corpus, read_text_file, stdlib_docstrings


@pytest.fixture(scope="module")
def tokens(tiny_base):
    return tokenize(stdlib_docstrings("heldout", 20_000), tiny_base.tokenizer, budget=256, window=64)


def per_layer_config(base_id: str) -> SubnetConfig:
    return SubnetConfig(base_id, (LayerChoice(0, 1, 2, 64), LayerChoice(2, 2, 3, 128), LayerChoice(3, 2, 1, 32)))


def test_full_config_reproduces_base_logits(tiny_base, tiny_importance, tokens) -> None:
    model = extract(tiny_base, tiny_importance, tiny_base.space().full())
    x = tokens.windows[:2]
    with torch.no_grad():
        assert torch.equal(model(x).logits, tiny_base.model(x).logits)


def masked_base_logits(base, imp: Importance, config: SubnetConfig, x: torch.Tensor) -> torch.Tensor:
    """The base model with every unit the config drops zeroed at its output projection:
    a dropped layer with zero o_proj and down_proj is the identity on the residual stream."""
    import copy

    m = copy.deepcopy(base.model)
    d = base.dims
    kept = {lc.layer: lc for lc in config.layers}
    with torch.no_grad():
        for i, layer in enumerate(m.model.layers):
            o = layer.self_attn.o_proj.weight
            down = layer.mlp.down_proj.weight
            if i not in kept:
                o.zero_()
                down.zero_()
                continue
            lc = kept[i]
            _, heads = imp.kept_heads(i, lc.kv_groups, lc.heads_per_group, d.num_kv_heads)
            head_mask = torch.zeros(d.num_heads, dtype=torch.bool)
            head_mask[torch.as_tensor(heads)] = True
            o[:, ~head_mask.repeat_interleave(d.head_dim)] = 0
            neuron_mask = torch.zeros(d.intermediate_size, dtype=torch.bool)
            neuron_mask[torch.as_tensor(imp.kept_neurons(i, lc.neurons))] = True
            down[:, ~neuron_mask] = 0
        return m(x).logits


def test_pruned_model_equals_masked_base(tiny_base, tiny_importance, tokens) -> None:
    x = tokens.windows[:2]
    for config in [per_layer_config(tiny_base.base_id), SubnetConfig.uniform(tiny_base.base_id, [1, 3], 1, 3, 48)]:
        pruned = extract(tiny_base, tiny_importance, config)
        with torch.no_grad():
            got = pruned(x).logits
        want = masked_base_logits(tiny_base, tiny_importance, config, x)
        torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-5)


def test_gqa_heads_are_kept_group_by_group(tiny_importance) -> None:
    groups, heads = tiny_importance.kept_heads(0, 2, 2, num_kv_heads=2)
    assert list(groups) == [0, 1]
    assert len(heads) == 4 and all(h // 3 == g for h, g in zip(heads, [0, 0, 1, 1]))
    groups, heads = tiny_importance.kept_heads(1, 1, 3, num_kv_heads=2)
    assert len(groups) == 1 and list(heads) == [3 * groups[0] + j for j in range(3)]


def test_uniform_subnet_saves_as_plain_llama_folder(tiny_base, tiny_importance, tokens, tmp_path) -> None:
    from transformers import AutoModelForCausalLM, LlamaForCausalLM

    config = SubnetConfig.uniform(tiny_base.base_id, [0, 2, 3], 2, 2, 64)
    model = extract(tiny_base, tiny_importance, config)
    save_subnet(model, tmp_path, config, tiny_base.tokenizer)
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["model_type"] == "llama" and cfg["num_attention_heads"] == 4 and cfg["num_hidden_layers"] == 3
    assert not (tmp_path / "modeling_edgenas_llama.py").exists()
    plain = AutoModelForCausalLM.from_pretrained(tmp_path)  # no remote code
    assert type(plain) is LlamaForCausalLM
    x = tokens.windows[:1]
    with torch.no_grad():
        torch.testing.assert_close(plain(x).logits, model(x).logits, atol=1e-5, rtol=1e-5)


def test_per_layer_subnet_loads_with_project_loader_and_remote_code(tiny_base, tiny_importance, tokens, tmp_path) -> None:
    from transformers import AutoModelForCausalLM

    config = per_layer_config(tiny_base.base_id)
    model = extract(tiny_base, tiny_importance, config)
    save_subnet(model, tmp_path, config, tiny_base.tokenizer)
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["model_type"] == "edgenas_llama"
    assert cfg["layer_num_attention_heads"] == [2, 6, 2]
    assert cfg["layer_num_key_value_heads"] == [1, 2, 2]
    assert cfg["layer_intermediate_sizes"] == [64, 128, 32]
    x = tokens.windows[:1]
    with torch.no_grad():
        want = model(x).logits
        torch.testing.assert_close(load_subnet(tmp_path)(x).logits, want, atol=1e-5, rtol=1e-5)
        remote = AutoModelForCausalLM.from_pretrained(tmp_path, trust_remote_code=True, attn_implementation="eager")
        torch.testing.assert_close(remote(x).logits, want, atol=1e-5, rtol=1e-5)
        # generation with a KV cache works across layers of different KV widths
        gen = remote.generate(x[:, :8], max_new_tokens=4, do_sample=False)
    assert gen.shape == (1, 12)


def test_perplexity_is_deterministic_and_drops_with_pruning(tiny_base, tiny_importance, tokens) -> None:
    p1 = perplexity(tiny_base.model, tokens)
    p2 = perplexity(tiny_base.model, tokens)
    assert p1 == p2 and np.isfinite(p1)
    small = extract(tiny_base, tiny_importance, SubnetConfig.uniform(tiny_base.base_id, [0], 1, 1, 16))
    assert perplexity(small, tokens) != p1


def test_tokenize_uses_a_fixed_budget(tiny_base) -> None:
    t = tokenize(stdlib_docstrings("heldout", 20_000), tiny_base.tokenizer, budget=300, window=100)
    assert t.windows.shape == (3, 100)
    with pytest.raises(InputFileError, match="fewer than one window"):
        tokenize(Corpus("x", "hi"), tiny_base.tokenizer, budget=300, window=100)


def test_calibration_and_heldout_text_are_disjoint() -> None:
    cal = stdlib_docstrings("calibration", 50_000).text
    held = stdlib_docstrings("heldout", 50_000).text
    assert cal and held and cal[:2000] not in held


def test_bad_text_files(tmp_path) -> None:
    with pytest.raises(InputFileError, match="does not exist"):
        read_text_file(tmp_path / "nope.txt")
    (tmp_path / "bin.txt").write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(InputFileError, match="not UTF-8"):
        read_text_file(tmp_path / "bin.txt")
    (tmp_path / "empty.txt").write_text("  \n")
    with pytest.raises(InputFileError, match="empty"):
        read_text_file(tmp_path / "empty.txt")


def test_importance_roundtrip_and_methods(tiny_base, tmp_path) -> None:
    toks = tokenize(stdlib_docstrings("calibration", 20_000), tiny_base.tokenizer, budget=256, window=64)
    act = compute_importance(tiny_base, toks, "activation")
    mag = compute_importance(tiny_base, toks, "magnitude")
    assert not np.allclose(act.neuron_scores[0], mag.neuron_scores[0])
    assert np.allclose(act.block_influence, mag.block_influence)
    act.save(tmp_path / "imp.npz")
    back = Importance.load(tmp_path / "imp.npz")
    assert back.layer_ranking() == act.layer_ranking()
    assert all(np.array_equal(a, b) for a, b in zip(back.head_scores, act.head_scores))


def test_reconstruction_refits_what_slicing_drops(tiny_base, tiny_ws, tokens, tmp_path) -> None:
    """The refitted kept columns reproduce the full projection's output on the calibration
    activations better than the sliced ones (the ridge pulls towards the slice, so this holds
    by construction); keeping every unit changes nothing; a workspace that reconstructs is
    another quality question; the statistics survive the cache."""

    from subnets.reconstruct import Grams, collect_grams, refit

    grams = collect_grams(tiny_base, tokens)
    layer = tiny_base.model.model.layers[1]
    w, g = layer.mlp.down_proj.weight.detach().double(), grams.mlp[1].double()
    keep = torch.as_tensor(tiny_ws.importance.kept_neurons(1, w.shape[1] // 2))

    def error(a: torch.Tensor) -> float:
        d = w.clone()
        d[:, keep] -= a.double()
        return float(torch.einsum("oi,ij,oj->", d, g, d))

    assert error(refit(w.float(), grams.mlp[1], keep)) < 0.9 * error(w[:, keep])
    every = torch.arange(w.shape[1])
    assert torch.allclose(refit(w.float(), grams.mlp[1], every), w.float(), atol=1e-4)

    ws = tiny_ws.reconstructing(grams=grams)
    cfg = per_layer_config(tiny_base.base_id)
    plain, refitted = tiny_ws.weights(cfg), ws.weights(cfg)
    assert [lw.down.shape for lw in refitted.layers] == [lw.down.shape for lw in plain.layers]
    assert not torch.allclose(refitted.layers[0].down, plain.layers[0].down)
    assert torch.equal(refitted.layers[0].gate, plain.layers[0].gate)
    assert ws.quality_id() != tiny_ws.quality_id() and refitted.weights_id != plain.weights_id
    assert np.isfinite(ws.perplexity(cfg))
    grams.save(tmp_path / "g.npz")
    again = Grams.load(tmp_path / "g.npz")
    assert again.digest() == grams.digest() and torch.equal(again.attn[0], grams.attn[0])
