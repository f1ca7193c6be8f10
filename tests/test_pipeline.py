"""The main job end to end on the tiny model (profile, quality, predictors, search, verify),
and the predictor commands' normal paths on the store it leaves."""

from __future__ import annotations

import json
import sqlite3

from edgenas.cli import main as edgenas
from edgenas.commands.predictor import evaluate_main, predict_main
from subnets.config import SubnetConfig


def test_pipeline_end_to_end(tiny_dir, tmp_path, capsys) -> None:
    out = tmp_path / "run"
    code = edgenas(["pipeline", "--model", str(tiny_dir), "--neuron-step", "16", "--n", "12", "--workload", "16,8",
                    "--evals", "20", "--budget-share", "0.95", "--verify", "2", "--quality-tokens", "256", "--min-time", "0.05", "--train-steps", "2",
                    "--out", str(out)])
    text = capsys.readouterr().out
    assert code == 0, text
    assert "edgenas predictor" in text
    # the sweep measured a few cells twice; each predictor is stated against that noise floor
    assert "repeatability, decode: 3 cells re-measured" in text and "noise floor: " in text  # 10% of 26, at least 3
    meta = json.loads((out / "predictors" / "local" / "decode" / "meta.json").read_text())
    assert meta["metrics"]["repeatability"]["n"] == 3
    # each predictor says what it is made of: the base's shape chosen by cross-validation
    assert "predictor: base: " in text and meta["fit_info"]["base"] in meta["fit_info"]["cv_base_error"]
    assert "Pareto front" in text
    assert "What to ship" in text and "measured against a budget" in text, text[-3000:]
    rows = json.loads((out / "subnets.json").read_text())
    assert len(rows) == 13 and all(r["prefill_ms"] and r["perplexity"] > 1 for r in rows)
    for phase in ("prefill", "decode"):
        assert (out / "predictors" / "local" / phase / "meta.json").is_file()
        assert (out / "predictors" / "local" / phase / "predicted_vs_measured.png").is_file()
    front = json.loads((out / "search" / "front.json").read_text())
    assert front and (out / "search" / "front.png").is_file()
    # the search ran on the trained super-network's weights, in a study of its own
    assert (out / "supernet" / "checkpoint" / "model" / "config.json").is_file()
    assert "super-network: 2 steps" in text
    assert "new study" in text
    with sqlite3.connect(out / "search" / "study.db") as c:  # one quality question per precision searched
        assert len(c.execute("SELECT DISTINCT quality_id FROM edgenas_perplexity").fetchall()) == 3

    db = out / "measurements.db"
    assert evaluate_main(["--predictor", str(out / "predictors" / "local" / "decode"), "--db", str(db)]) == 0
    assert "saved predictor" in capsys.readouterr().out
    assert predict_main(["--predictor", str(out / "predictors" / "local" / "prefill"), "--configs",
                         str(out / "search" / "front.jsonl"), "--seq-len", "16", "--json"]) == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines() if x.startswith("{")]
    assert len(lines) == len(front) and all(x["latency_ms"] > 0 and x["upper_ms"] >= x["latency_ms"] for x in lines)

    # the run's report: one self-contained page with every section, images embedded
    report = check_report(out / "report.html")
    assert "what to ship" in report["headings"]
    assert edgenas(["report", str(out), "--out", str(tmp_path / "again.html")]) == 0
    assert check_report(tmp_path / "again.html")["headings"] == report["headings"]
    check_recommendation(out, text)

    # limits that admit nothing: the nearest candidates and what to relax, exit status 1
    code = edgenas(["pipeline", "--model", str(tiny_dir), "--neuron-step", "16", "--n", "12", "--workload", "16,8",
                    "--evals", "4", "--budget-share", "0.95", "--verify", "1", "--quality-tokens", "256",
                    "--min-time", "0.05", "--max-perplexity", "1.5", "--out", str(out)])
    text = capsys.readouterr().out
    assert code == 1, text[-3000:]
    assert "nothing meets both limits" in text and "nearest" in text and "a perplexity ceiling of" in text
    assert json.loads((out / "recommendation.json").read_text())["nearest"]


def check_recommendation(out, text: str) -> None:
    """The main job's answer: a deployment within the budget, measured on the device, beside
    the full model at every precision searched (onnxruntime fp32, int8, int4 by default
    here: the tests' cache has no llama.cpp tools), exported as the files its runtime loads."""
    assert "What to ship" in text and "ship " in text
    rec = json.loads((out / "recommendation.json").read_text())
    chosen = rec["chosen"]
    assert chosen and chosen["meets_budget"] and chosen["upper_ms"] <= rec["budget_ms"]
    assert chosen["perplexity"] <= rec["max_perplexity"]
    fulls = {a["precision"] for a in rec["alternatives"] if a["family"] == "full model"} | (
        {chosen["precision"]} if chosen["family"] == "full model" else set())
    assert fulls == {"fp32", "int8", "int4"}
    for p in ("int8", "int4"):  # each precision's predictors, transferred from the fp32 ones
        assert (out / "predictors" / f"local-{p}" / "decode" / "meta.json").is_file()
    summary = json.loads((out / "ship" / "summary.json").read_text())
    assert summary["config_hash"] == SubnetConfig.from_dict(chosen["config"]).config_hash()
    assert summary["reconstructed"] and (out / "ship" / "hf" / "config.json").is_file()
    if chosen.get("mix"):
        assert summary["mix"] == chosen["mix"]
    elif chosen["precision"] != "fp32":
        assert summary["mix"]["attention"][0] == chosen["precision"]
    assert (out / "recommendation.png").is_file()  # the table's rows as a plot, in the report too


def test_pipeline_searches_the_trained_weights_refitted_at_the_deployed_precision(tiny_dir, tmp_path, capsys) -> None:
    """Every setting of the main job reaches its search: after recovery training the search
    judges the super-network's weights, refitted (--reconstruct) and at int4 (--precision)."""
    from export.arithmetic import at_precision
    from training.recovery import open_supernet

    out = tmp_path / "run"
    code = edgenas(["pipeline", "--model", str(tiny_dir), "--neuron-step", "16", "--n", "20", "--workload", "16,8",
                    "--evals", "6", "--budget-share", "0.95", "--verify", "0", "--quality-tokens", "256",
                    "--min-time", "0.05", "--train-steps", "2", "--reconstruct", "--precision", "int4", "--out", str(out)])
    captured = capsys.readouterr()
    assert code == 0, captured.err[-3000:]
    judged = json.loads((out / "search" / "search.json").read_text())["judged"]
    assert judged["weights"].startswith("supernet:") and judged["reconstructed"] and judged["precision"] == "int4"
    trained = open_supernet(out / "supernet", 16, None, 256)
    want = at_precision(trained.reconstructing(True), "int4")
    assert judged["quality_id"] == want.quality_id()
    with sqlite3.connect(out / "search" / "study.db") as c:  # every perplexity of that one question
        assert c.execute("SELECT DISTINCT quality_id FROM edgenas_perplexity").fetchall() == [(want.quality_id(),)]


def test_bad_pipeline_settings_are_refused_before_any_work(tmp_path, capsys) -> None:
    out = tmp_path / "run"
    assert edgenas(["pipeline", "--budget-share", "0", "--out", str(out)]) == 2
    assert "--budget-share 0.0 is not a share" in capsys.readouterr().err
    assert edgenas(["pipeline", "--samples", "3", "--out", str(out)]) == 2
    assert "--samples 3 is too few" in capsys.readouterr().err
    assert not out.exists()  # nothing profiled, nothing written


def check_report(path) -> dict:
    from html.parser import HTMLParser

    class Page(HTMLParser):
        def __init__(self) -> None:
            super().__init__()
            self.headings: list[str] = []
            self.srcs: list[str] = []
            self.links: list[str] = []
            self.tables = 0
            self._h = False

        def handle_starttag(self, tag, attrs):  # type: ignore[no-untyped-def]
            a = dict(attrs)
            self._h = tag == "h2"
            self.tables += tag == "table"
            if tag in ("img", "script") and a.get("src"):
                self.srcs.append(a["src"])
            if tag in ("a", "link") and a.get("href"):
                self.links.append(a["href"])

        def handle_data(self, data):  # type: ignore[no-untyped-def]
            if self._h:
                self.headings.append(data.strip().lower())
                self._h = False

    page = Page()
    page.feed(path.read_text())
    for section in ("device", "latency predictors", "pareto front", "settings and versions"):
        assert section in page.headings, page.headings
    assert len(page.srcs) >= 3 and all(s.startswith("data:image/png;base64,") for s in page.srcs)
    assert not page.links and page.tables >= 4  # nothing to fetch: the page stands alone
    return {"headings": page.headings}


def test_the_report_of_a_search_that_found_nothing(tmp_path) -> None:
    """A run whose search met no constraint still gets its report, saying so."""
    from edgenas.report import write_report

    (tmp_path / "search").mkdir()
    (tmp_path / "search" / "search.json").write_text(json.dumps({
        "front": [], "full_perplexity": 33.2, "max_perplexity": 99.6, "study": "s",
        "matched": [{"baseline": "layer dropping", "summary": "19L", "baseline_ppl": 859.2, "baseline_ms": 923.2,
                     "searched_ms": None, "reduction": None}]}))
    text = write_report(tmp_path).read_text()
    assert "No sub-network met both" in text and "layer dropping" in text
