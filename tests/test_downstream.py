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


def test_evaluate_runs_a_local_task_offline_on_a_model_and_a_subnet(tiny_dir, tiny_base, mc_task, tmp_path, capsys):
    assert edgenas(["evaluate", "--model-dir", str(tiny_dir), "--tasks", str(mc_task), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    acc = out["results"]["edgenas_arith"]["acc,none"]
    assert 0 <= acc <= 1 and out["results"]["edgenas_arith"]["sample_len"] == 5
    cfg = tmp_path / "c.jsonl"
    cfg.write_text(tiny_base.space(16).sample(1, 3)[0].to_json() + "\n")
    assert edgenas(["evaluate", "--model", str(tiny_dir), "--neuron-step", "16", "--config", str(cfg),
                    "--tasks", str(mc_task)]) == 0
    assert "edgenas_arith" in capsys.readouterr().out


def test_evaluate_refuses_unknown_tasks_and_malformed_items(tiny_dir, mc_task, tmp_path, capsys):
    assert edgenas(["evaluate", "--model-dir", str(tiny_dir), "--tasks", "no_such_task_xyz"]) == 2
    assert "unknown lm-eval task" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "q", "choices": ["a"], "answer": 3}\n')
    assert edgenas(["evaluate", "--model-dir", str(tiny_dir), "--tasks", str(bad)]) == 2
    assert "not a multiple-choice item" in capsys.readouterr().err
