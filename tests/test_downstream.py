"""Downstream tasks through lm-evaluation-harness, offline, on a local multiple-choice file."""

from __future__ import annotations

import json

import pytest

from edgenas.cli import main as edgenas

pytest.importorskip("lm_eval")


@pytest.fixture
def mc_task(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf-datasets"))
    items = [{"question": f"What is {i} plus one?", "choices": [str(i + 1), str(i + 7), "zero"], "answer": 0}
             for i in range(5)]
    f = tmp_path / "arith.jsonl"
    f.write_text("".join(json.dumps(x) + "\n" for x in items))
    return f


def _loglikelihoods(model, tok, question: str, choices: list[str]) -> list[float]:
    """Each choice's log-likelihood after the task's prompt, computed directly in torch the way
    lm-eval splits it (the continuation is what the whole string adds to the context's tokens)."""
    import torch

    context = f"{question}\nAnswer:"
    ctx = tok(context, add_special_tokens=False).input_ids
    out = []
    for c in choices:
        whole = tok(context + " " + c, add_special_tokens=False).input_ids
        cont = whole[len(ctx):]
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([whole])).logits[0].double(), -1)
        # the token at position p is predicted by the logits at p - 1
        out.append(float(sum(logp[len(ctx) - 1 + k, t] for k, t in enumerate(cont))))
    return out


def _items_by_preference(model, tok, path, agree: bool) -> None:
    """Multiple-choice items whose answer is the model's own favourite choice (``agree``) or
    its least favourite: lm-eval must then score accuracy 1 or 0 exactly."""
    items = []
    for i in range(5):
        q, choices = f"What is {i} plus one?", [str(i + 1), str(i + 7), "zero"]
        ll = _loglikelihoods(model, tok, q, choices)
        items.append({"question": q, "choices": choices, "answer": ll.index(max(ll) if agree else min(ll))})
    path.write_text("".join(json.dumps(x) + "\n" for x in items))


def _accuracy(args: list[str], capsys) -> float:
    assert edgenas([*args, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["results"]["edgenas_arith"]["sample_len"] == 5
    return out["results"]["edgenas_arith"]["acc,none"]


def test_evaluate_scores_what_the_model_computes_on_a_model_and_a_subnet(tiny_dir, tiny_base, mc_task, tmp_path,
                                                                         capsys):
    # mc_task: for its isolated datasets cache (the items are written below)
    from subnets.workspace import Workspace

    task = tmp_path / "arith.jsonl"
    for agree in (True, False):
        _items_by_preference(tiny_base.model, tiny_base.tokenizer, task, agree)
        assert _accuracy(["evaluate", "--model-dir", str(tiny_dir), "--tasks", str(task)], capsys) == float(agree)
    cfg = tmp_path / "c.jsonl"
    config = tiny_base.space(16).sample(1, 3)[0]
    cfg.write_text(config.to_json() + "\n")
    sub = Workspace.open(str(tiny_dir), neuron_step=16).model(config).eval()
    for agree in (True, False):  # the sub-network's own preferences, not the full model's
        _items_by_preference(sub, tiny_base.tokenizer, task, agree)
        assert _accuracy(["evaluate", "--model", str(tiny_dir), "--neuron-step", "16", "--config", str(cfg),
                          "--tasks", str(task)], capsys) == float(agree)


def test_evaluate_refuses_unknown_tasks_and_malformed_items(tiny_dir, mc_task, tmp_path, capsys):
    assert edgenas(["evaluate", "--model-dir", str(tiny_dir), "--tasks", "no_such_task_xyz"]) == 2
    assert "unknown lm-eval task" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "q", "choices": ["a"], "answer": 3}\n')
    assert edgenas(["evaluate", "--model-dir", str(tiny_dir), "--tasks", str(bad)]) == 2
    assert "not a multiple-choice item" in capsys.readouterr().err
