"""Recovery training on tiny random Llama models: the super-network view, losses, sampling,
data, checkpoints and resume, distributed runs, fine-tuning and export."""

from __future__ import annotations

import copy
import json
import os
import random
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from subnets.config import LayerChoice, SubnetConfig
from subnets.extract import extract
from tests.tiny import make_tiny_model
from training.loss import LossWeights, kl_teacher_student, member_loss
from training.sampler import SubnetSampler, analytic_latency
from training.settings import TrainSettings
from training.sorting import prefix_importance, sort_by_importance
from training.supernet import SuperNetwork

REPO = Path(__file__).resolve().parents[1]


def _sorted_supernet(base, importance) -> SuperNetwork:
    model = copy.deepcopy(base.model)
    sort_by_importance(model, importance, base.dims.num_kv_heads, base.dims.head_dim)
    return SuperNetwork(model, base.dims)


def _parity_configs(space, importance) -> list[SubnetConfig]:
    bid, d = space.base_id, space.dims
    rng = random.Random(3)
    tapered = SubnetConfig(bid, tuple(LayerChoice(i, 2, 3 - (i % 2), 128 - 32 * i) for i in range(d.num_layers)))
    return [
        space.full(),
        SubnetConfig.uniform(bid, range(d.num_layers), 1, 2, 64),  # uniform, all layers
        SubnetConfig.uniform(bid, importance.kept_layers(2), 2, 3, 128),  # dropped layers, full width
        tapered,
        *[space.sample_one(rng, "per-layer", importance.layer_ranking()) for _ in range(4)],
        *[space.sample_one(rng, "per-layer") for _ in range(2)],  # any layer subset
    ]


@pytest.mark.parametrize("model_type", ["llama", "qwen2"])
def test_sliced_logits_equal_extracted_dense_model(tmp_path, model_type) -> None:
    from subnets.basemodel import load_base_model
    from subnets.importance import compute_importance
    from subnets.quality import tokenize
    from subnets.textdata import stdlib_docstrings

    base = load_base_model(make_tiny_model(tmp_path / model_type, model_type=model_type, seed=4))
    imp = compute_importance(base, tokenize(stdlib_docstrings("calibration", 20_000), base.tokenizer, 256, 64))
    net = _sorted_supernet(base, imp)
    ids = torch.randint(0, 320, (2, 40))
    for c in _parity_configs(base.space(16), imp):
        with torch.no_grad():
            dense = extract(base, imp, c)(input_ids=ids).logits
            sliced = net(ids, c)
        assert (dense - sliced).abs().max().item() < 1e-5, c.summary()


def test_units_outside_the_config_get_exactly_zero_gradient(tiny_base, tiny_importance) -> None:
    net = _sorted_supernet(tiny_base, tiny_importance)
    d = tiny_base.dims
    c = SubnetConfig(tiny_base.base_id, (LayerChoice(0, 1, 2, 48), LayerChoice(2, 2, 1, 96)))
    ids = torch.randint(0, 320, (2, 16))
    net(ids, c).float().pow(2).mean().backward()
    layers = net.model.model.layers
    hd, per = d.head_dim, d.heads_per_group
    for i in (1, 3):  # dropped layers: nothing at all
        assert all(p.grad is None or not p.grad.any() for p in layers[i].parameters())
    for lc in c.layers:
        layer = layers[lc.layer]
        gate = layer.mlp.gate_proj.weight.grad
        assert gate[: lc.neurons].abs().sum() > 0 and not gate[lc.neurons :].any()
        assert not layer.mlp.down_proj.weight.grad[:, lc.neurons :].any()
        q = layer.self_attn.q_proj.weight.grad.view(d.num_kv_heads, per, hd, -1)
        kept = torch.zeros(d.num_kv_heads, per, dtype=torch.bool)
        kept[: lc.kv_groups, : lc.heads_per_group] = True
        assert q[kept].abs().sum() > 0 and not q[~kept].any()
        o = layer.self_attn.o_proj.weight.grad.view(d.hidden_size, d.num_kv_heads, per, hd)
        assert not o[:, ~kept].any()
        k = layer.self_attn.k_proj.weight.grad
        assert k[: lc.kv_groups * hd].abs().sum() > 0 and not k[lc.kv_groups * hd :].any()


def test_prefix_importance_makes_extraction_keep_prefixes(tiny_base, tiny_importance) -> None:
    imp = prefix_importance(tiny_importance, tiny_base.dims.num_kv_heads)
    assert list(imp.kept_neurons(0, 5)) == [0, 1, 2, 3, 4]
    groups, heads = imp.kept_heads(1, 1, 2, tiny_base.dims.num_kv_heads)
    assert list(groups) == [0] and list(heads) == [0, 1]
    groups, heads = imp.kept_heads(1, 2, 1, tiny_base.dims.num_kv_heads)
    assert list(groups) == [0, 1] and list(heads) == [0, 3]
    assert imp.layer_ranking() == tiny_importance.layer_ranking()


def test_kl_is_zero_for_identical_logits_and_no_gradient_reaches_the_teacher() -> None:
    student = torch.randn(2, 5, 11, requires_grad=True)
    teacher = student.detach().clone().requires_grad_(True)
    kl = kl_teacher_student(student, teacher, temperature=2.0)
    assert abs(float(kl.detach())) < 1e-6
    loss, parts = member_loss(student * 1.5, torch.randint(0, 11, (2, 5)), teacher, LossWeights(0.5, 1.0, 2.0))
    loss.backward()
    assert teacher.grad is None and student.grad is not None and parts["kl"] > 0


def test_loss_falls_on_a_memorised_batch_for_largest_smallest_and_random(tiny_base, tiny_importance) -> None:
    from training.objective import RecoveryObjective

    space = tiny_base.space(16)
    net = _sorted_supernet(tiny_base, tiny_importance)
    sampler = SubnetSampler(space, tiny_importance.layer_ranking(), analytic_latency(space, 32, 8), "sandwich", k=1,
                            latency_range=(0.3, 1.0), seed=1)
    configs = sampler.configs(0)
    objective = RecoveryObjective(net, "inplace", LossWeights(ce=0.5, kd=1.0))
    ids = torch.randint(0, 320, (2, 32), generator=torch.Generator().manual_seed(0))
    opt = torch.optim.AdamW(net.parameters(), lr=3e-3)
    first = None
    for _ in range(25):
        loss, stats = objective(ids, configs, None)
        opt.zero_grad()
        loss.backward()
        opt.step()
        first = first or [s["ce"] for s in stats]
    last = [s["ce"] for s in stats]
    assert len(last) == 3 and all(b < 0.7 * a for a, b in zip(first, last)), (first, last)


def test_sampler_stays_in_its_latency_range_and_is_a_function_of_the_step(tiny_ws) -> None:
    space = tiny_ws.space
    lat = analytic_latency(space, 32, 8)
    s = SubnetSampler(space, tiny_ws.importance.layer_ranking(), lat, "sandwich", k=3, latency_range=(0.5, 0.9), seed=2)
    full = float(lat([space.full()])[0])
    shares = lat(s.pool) / full
    assert shares.min() >= 0.5 and shares.max() <= 0.9
    assert abs(float(lat([s.smallest])[0]) / full - shares.min()) < 1e-12  # the range's smallest, not a 1-layer model
    step5 = s.configs(5)
    assert len(step5) == 5 and step5 == s.configs(5) and step5 != s.configs(6)
    assert step5[0] == max(s.pool, key=lambda c: float(lat([c])[0]))  # HI < 1: the range's largest
    counts = np.bincount([min(7, int((float(lat([c])[0]) / full - 0.5) / 0.05)) for st in range(200)
                          for c in s.configs(st)[2:]], minlength=8)
    assert (counts > 0).sum() >= 4  # drawn over the bins, not piled at the mean


def test_default_corpus_is_disjoint_from_the_heldout_text() -> None:
    from subnets.textdata import _split_of, _stdlib_files, stdlib_docstrings
    from training.data import read_documents

    train = read_documents(["stdlib"])[0].text
    heldout = stdlib_docstrings("heldout")
    files = _stdlib_files()
    assert {f.name for f in files if _split_of(f) == "heldout"}.isdisjoint(
        {f.name for f in files if _split_of(f) == "calibration"})
    # no held-out paragraph of any length appears in the training text
    paras = [p for p in heldout.text.split("\n\n") if len(p) > 300]
    assert len(paras) > 50
    leaked = [p for p in paras if p in train]
    assert len(leaked) <= len(paras) // 100, leaked[:2]


def test_text_jsonl_and_folders_pack_into_windows(tiny_base, tmp_path) -> None:
    from training.data import pack, read_documents

    (tmp_path / "a.txt").write_text("def f(x):\n    return x + 1\n" * 200)
    (tmp_path / "b.jsonl").write_text("".join(json.dumps({"body": f"line {i} of text"}) + "\n" for i in range(300)))
    docs = read_documents([str(tmp_path / "a.txt"), str(tmp_path / "b.jsonl")], field="body")
    assert len(docs) == 301
    w = pack(docs, tiny_base.tokenizer, 32)
    assert w.windows.shape[1] == 32 and w.num_tokens > 1000
    again = pack(read_documents([str(tmp_path)], field="body"), tiny_base.tokenizer, 32)
    assert again.digest == w.digest  # the folder reads the same files in name order
    b0 = w.batch(3, 0, 0, 2, 4, 1, seed=0)
    b1 = w.batch(3, 0, 1, 2, 4, 1, seed=0)
    assert b0.shape == (4, 32) and not torch.equal(b0, b1)  # ranks read different windows
    assert torch.equal(b0, w.batch(3, 0, 0, 2, 4, 1, seed=0))


def _settings(**kw) -> TrainSettings:
    base = dict(steps=4, batch_size=2, seq_len=32, lr=2e-3, warmup_steps=1, checkpoint_every=2, k=1,
                latency_range=(0.4, 1.0), seed=0)
    base.update(kw)
    return TrainSettings(**base)


def _data(tmp_path: Path) -> list[str]:
    from subnets.textdata import stdlib_docstrings

    f = tmp_path / "train.txt"
    f.write_text(stdlib_docstrings("calibration", 30_000).text)
    return [str(f)]


def test_killed_run_resumes_and_reproduces_the_losses(tiny_dir, tmp_path) -> None:
    from training.recovery import train_supernet

    data = _data(tmp_path)
    whole = train_supernet(str(tiny_dir), data, _settings(), tmp_path / "whole", neuron_step=16)
    assert whole.steps_done == 4
    part = train_supernet(str(tiny_dir), data, _settings(), tmp_path / "killed", neuron_step=16, stop_after=3)
    assert part.steps_done == 3  # the checkpoint holds 2 steps; step 3 is lost with the "kill"
    rest = train_supernet(str(tiny_dir), data, _settings(), tmp_path / "killed", neuron_step=16)
    assert rest.resumed_from == 2 and rest.steps_done == 4
    losses = [r["loss"] for r in whole.log]
    resumed = [json.loads(line)["loss"] for line in (tmp_path / "killed" / "log.jsonl").read_text().splitlines()]
    assert resumed == pytest.approx(losses, rel=1e-6, abs=1e-7)
    assert (tmp_path / "whole" / "loss.png").is_file()


def test_supernet_folder_opens_as_a_workspace_with_trained_prefix_weights(tiny_dir, tiny_base, tmp_path) -> None:
    from training.recovery import open_supernet, train_supernet

    out = tmp_path / "sn"
    train_supernet(str(tiny_dir), _data(tmp_path), _settings(steps=2), out, neuron_step=16)
    ws = open_supernet(out, neuron_step=16, base_id=tiny_base.base_id)
    assert ws.base.base_id == tiny_base.base_id and ws.base.weights_id.startswith("supernet:")
    c = SubnetConfig.uniform(tiny_base.base_id, [0, 2, 3], 1, 2, 64)
    ids = torch.randint(0, 320, (1, 24))
    with torch.no_grad():
        dense = ws.model(c)(input_ids=ids).logits
        sliced = SuperNetwork(ws.base.model, ws.base.dims)(ids, c)
    assert (dense - sliced).abs().max() < 1e-5
    with pytest.raises(Exception, match="trained from base model"):
        open_supernet(out, base_id="other@000")


def test_finetuned_subnet_reloads_as_hf_folder_and_its_onnx_matches(tiny_dir, tmp_path) -> None:
    import onnxruntime as ort

    from export.onnx_graphs import ExportOptions, export_subnet
    from subnets.basemodel import load_base_model
    from subnets.extract import load_subnet, weights_of_model
    from training.recovery import finetune

    base_id = load_base_model(tiny_dir).base_id
    c = SubnetConfig(base_id, (LayerChoice(0, 2, 2, 64), LayerChoice(3, 1, 3, 96)))
    res, model = finetune(str(tiny_dir), c, _data(tmp_path), _settings(steps=3, kd="teacher"), tmp_path / "ft",
                          neuron_step=16)
    assert res.steps_done == 3 and res.log[-1]["members"][0]["kl"] >= 0
    # from the refitted weights instead: another run (a folder of the plain one does not resume it)
    refit, _ = finetune(str(tiny_dir), c, _data(tmp_path), _settings(steps=1, kd="teacher"), tmp_path / "ft-r",
                        neuron_step=16, reconstruct=True)
    assert refit.steps_done == 1 and refit.log[0]["loss"] != res.log[0]["loss"]
    reloaded = load_subnet(tmp_path / "ft" / "hf")
    ids = torch.randint(0, 320, (1, 20))
    with torch.no_grad():
        a = model.eval()(input_ids=ids).logits
        b = reloaded(input_ids=ids).logits
    assert (a - b).abs().max() < 1e-6
    exp = export_subnet(weights_of_model(reloaded, c, "finetune:test"), tmp_path / "onnx", ExportOptions())
    sess = ort.InferenceSession(str(exp.path("prefill")), providers=["CPUExecutionProvider"])
    onnx_logits = sess.run(None, {"input_ids": ids.numpy()})[0]
    assert np.abs(onnx_logits.reshape(-1) - b[0, -1].numpy()).max() < 1e-4


def test_resuming_with_changed_settings_is_refused(tiny_dir, tmp_path) -> None:
    from training.recovery import TrainingError, train_supernet

    out = tmp_path / "run"
    train_supernet(str(tiny_dir), _data(tmp_path), _settings(steps=2), out, neuron_step=16)
    with pytest.raises(TrainingError, match="changed: lr"):
        train_supernet(str(tiny_dir), _data(tmp_path), replace(_settings(steps=2), lr=1e-3), out, neuron_step=16)


DDP_WORKER = """
import json, os, sys
sys.path.insert(0, {repo!r})
from training.recovery import train_supernet
from training.settings import TrainSettings
from training.supernet import param_digest
from training.trainer import make_accelerator
from subnets.basemodel import load_base_model
import training.recovery as rec

s = TrainSettings(steps=2, batch_size=2, seq_len=32, lr=2e-3, warmup_steps=1, checkpoint_every=2, k=1,
                  latency_range=(0.2, 0.5), strategy="random", seed=0)
holder = {{}}
orig = rec.Trainer.run
def run(self, *a, **kw):
    r = orig(self, *a, **kw)
    holder["digest"] = param_digest(self.model)
    return r
rec.Trainer.run = run
acc = make_accelerator(s, cpu=True)
train_supernet({model!r}, [{data!r}], s, {out!r}, neuron_step=16, accelerator=acc)
with open(os.path.join({out!r}, f"digest-{{acc.process_index}}.json"), "w") as f:
    json.dump({{"digest": holder["digest"], "world": acc.num_processes, "type": str(acc.distributed_type)}}, f)
"""


def test_two_process_gloo_run_keeps_identical_weights_with_layer_dropping(tiny_dir, tmp_path) -> None:
    out = tmp_path / "ddp"
    data = _data(tmp_path)[0]
    script = tmp_path / "worker.py"
    script.write_text(DDP_WORKER.format(repo=str(REPO), model=str(tiny_dir), data=data, out=str(out)))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                           "--master_port", str(29500 + os.getpid() % 1000), str(script)],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads((out / f"digest-{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["world"] == 2 and "MULTI_CPU" in ranks[0]["type"]
    assert ranks[0]["digest"] == ranks[1]["digest"]
    # the steps ran sub-networks that drop layers (unused parameters under DDP)
    log = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    assert any(not m["subnet"].startswith("4L") for r in log for m in r["members"])


def test_commands_train_export_and_finetune_with_the_supernet(tiny_dir, tiny_base, tmp_path, capsys) -> None:
    from edgenas.cli import main as edgenas
    from subnets.extract import load_subnet

    data = _data(tmp_path)[0]
    common = ["--model", str(tiny_dir), "--neuron-step", "16", "--batch-size", "2", "--seq-len", "32", "--data", data]
    sn = tmp_path / "sn"
    assert edgenas(["train-supernet", *common, "--steps", "2", "--k", "1", "--out", str(sn)]) == 0
    assert "trained steps 0..2 of 2" in capsys.readouterr().out
    assert edgenas(["train-supernet", *common, "--steps", "2", "--k", "1", "--out", str(sn)]) == 0  # nothing left
    assert "resumed at step 2" in capsys.readouterr().out
    cfg = tmp_path / "c.jsonl"
    c = SubnetConfig.uniform(tiny_base.base_id, [0, 1, 3], 2, 2, 64)
    cfg.write_text(c.to_json() + "\n")
    assert edgenas(["export", "--model", str(tiny_dir), "--neuron-step", "16", "--config", str(cfg), "--supernet", str(sn),
                    "--out", str(tmp_path / "exp"), "--no-perplexity"]) == 0
    from training.recovery import open_supernet

    ws = open_supernet(sn, 16)
    ids = torch.randint(0, 320, (1, 12))
    with torch.no_grad():
        exported = load_subnet(tmp_path / "exp" / "hf")(input_ids=ids).logits
        sliced = SuperNetwork(ws.base.model, ws.base.dims)(ids, c)
        untrained = extract(tiny_base, _imp(tiny_base), c)(input_ids=ids).logits
    assert (exported - sliced).abs().max() < 1e-5 and (exported - untrained).abs().max() > 1e-3
    ft = tmp_path / "ft"
    assert edgenas(["finetune", *common, "--config", str(cfg), "--supernet", str(sn), "--steps", "2", "--onnx",
                    "--out", str(ft)]) == 0
    assert (ft / "hf" / "config.json").is_file() and list((ft / "onnx").glob("*/prefill.onnx"))


def _imp(base):
    from subnets.importance import importance_for

    return importance_for(base)


def test_a_dataset_name_that_is_not_available_offline_is_a_clear_error() -> None:
    pytest.importorskip("datasets")
    from subnets.errors import InputFileError
    from training.data import read_documents

    with pytest.raises(InputFileError, match="could not be loaded offline"):
        read_documents(["no-such-org/no-such-dataset"])


def test_gradient_accumulation_equals_the_larger_batch(tiny_dir, tmp_path) -> None:
    """Two micro-batches of 1 accumulate to the update of one batch of 2 (the same windows)."""
    from training.recovery import open_supernet, train_supernet

    data = _data(tmp_path)
    b2 = train_supernet(str(tiny_dir), data, _settings(steps=2, batch_size=2), tmp_path / "b2", neuron_step=16)
    a2 = train_supernet(str(tiny_dir), data, _settings(steps=2, batch_size=1, grad_accum=2), tmp_path / "a2",
                        neuron_step=16)
    # the gradient (its norm before clipping) is the mean over both micro-batches, not half of it
    assert [r["grad_norm"] for r in a2.log] == pytest.approx([r["grad_norm"] for r in b2.log], rel=1e-4)
    assert [r["loss"] for r in a2.log] == pytest.approx([r["loss"] for r in b2.log], rel=1e-4)
    one = open_supernet(tmp_path / "b2", 16).base.model.state_dict()
    two = open_supernet(tmp_path / "a2", 16).base.model.state_dict()
    assert all(torch.allclose(one[k], two[k], atol=1e-5) for k in one)
    moved = open_supernet(tmp_path / "b2", 16).base.model.model.layers[0].mlp.up_proj.weight
    assert not torch.equal(moved, _sorted_up(tiny_dir))


def _sorted_up(tiny_dir):
    from training.recovery import sorted_base

    base, _ = sorted_base(str(tiny_dir))
    return base.model.model.layers[0].mlp.up_proj.weight
