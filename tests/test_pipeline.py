"""The main job end to end on the tiny model (profile, quality, predictors, search, verify),
and the predictor commands' normal paths on the store it leaves."""

from __future__ import annotations

import json

from edgenas.cli import main as edgenas
from predictor.cli import evaluate_main, predict_main


def test_pipeline_end_to_end(tiny_dir, tmp_path, capsys) -> None:
    out = tmp_path / "run"
    code = edgenas(["pipeline", "--model", str(tiny_dir), "--neuron-step", "16", "--n", "20", "--workload", "16,8",
                    "--evals", "20", "--budget-share", "0.95", "--verify", "2", "--quality-tokens", "256", "--min-time", "0.05", "--train-steps", "2",
                    "--out", str(out)])
    text = capsys.readouterr().out
    assert code == 0, text
    assert "edgenas predictor" in text
    assert "Pareto front" in text
    assert "verified on local" in text, text[-3000:]
    rows = json.loads((out / "subnets.json").read_text())
    assert len(rows) == 21 and all(r["prefill_ms"] and r["perplexity"] > 1 for r in rows)
    for phase in ("prefill", "decode"):
        assert (out / "predictors" / "local" / phase / "meta.json").is_file()
        assert (out / "predictors" / "local" / phase / "predicted_vs_measured.png").is_file()
    front = json.loads((out / "search" / "front.json").read_text())
    assert front and (out / "search" / "front.png").is_file()
    # the search ran on the trained super-network's weights, in a study of its own
    assert (out / "supernet" / "checkpoint" / "model" / "config.json").is_file()
    assert "super-network: 2 steps" in text
    assert "new study" in text and len(list((out / "search").glob("perplexity-*.jsonl"))) == 1

    db = out / "measurements.db"
    assert evaluate_main(["--predictor", str(out / "predictors" / "local" / "decode"), "--db", str(db)]) == 0
    assert "saved predictor" in capsys.readouterr().out
    assert predict_main(["--predictor", str(out / "predictors" / "local" / "prefill"), "--configs",
                         str(out / "search" / "front.jsonl"), "--seq-len", "16", "--json"]) == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines() if x.startswith("{")]
    assert len(lines) == len(front) and all(x["latency_ms"] > 0 and x["upper_ms"] >= x["latency_ms"] for x in lines)
