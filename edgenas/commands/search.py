"""``edgenas search`` (``search-subnets``): the parser builds a ``SearchRequest``; the tables
are drawn from the ``SearchOutcome`` that ``search.run.search`` returns."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from edgenas.clikit import add_granularity, add_reconstruct, make_parser, progress_bar, request_from_args, run
from profiler.database import describe, store_location
from search.request import ALGORITHMS, SearchError, SearchRequest, check_precisions
from search.run import SearchOutcome, search

out_console = Console(width=None if sys.stdout.isatty() else 150)


def _precisions(text: str) -> str:
    try:
        check_precisions(text)
    except SearchError as e:
        raise argparse.ArgumentTypeError(e.problem) from None
    return text


def add_search_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", required=True, help="the device the predictor is for (and --verify measures on)")
    p.add_argument("--predictor", type=Path, nargs="+", required=True,
                   help="folder with prefill/ and decode/ predictors; with several --precision values, one folder per "
                        "precision (each is matched by the measurements it was trained on)")
    p.add_argument("--latency-budget-ms", type=float, required=True, help="hard limit on the predicted upper bound")
    p.add_argument("--workload", default="128,64", help="S,N: a prompt of S tokens then N generated (default 128,64)")
    p.add_argument("--algorithm", choices=ALGORITHMS, default="nsga2")
    p.add_argument("--evals", type=int, default=100, help="sub-networks evaluated for perplexity (the search's cost; candidates over the budget are "
                   "rejected by the predictor and not counted)")
    add_granularity(p, "the genome searched")
    add_reconstruct(p)
    p.add_argument("--max-params", type=float, default=None, help="hard limit on parameters")
    p.add_argument("--max-perplexity", default=None, metavar="PPL|Rx",
                   help="quality ceiling, a constraint like the budget: a perplexity (e.g. 60) or a multiple of the "
                        "full model's (e.g. 3x); the plot and --verify keep to it (default: none; plot capped at 10x)")
    p.add_argument("--verify", type=int, default=0, help="measure K front points on the device")
    p.add_argument("--host", default=None, help="where --verify measures (default: --device)")
    p.add_argument("--db", type=store_location, default=Path("runs/measurements.db"),
                   help="store --verify adds to (a file or a postgresql:// URL)")
    p.add_argument("--out", type=Path, default=Path("runs/search"))
    p.add_argument("--storage", default=None, metavar="URL",
                   help="Optuna storage of the study: an RDB URL (postgresql://user@host/db, mysql+pymysql://..., "
                        "sqlite:///file.db) or journal:PATH (a journal file on a shared filesystem); default: OUT/study.db. "
                        "Workers on several machines share a study through it")
    p.add_argument("--study-name", default=None,
                   help="the study to create or join (default: named after the search's settings, so equal settings "
                        "resume it); a name that exists with other settings is refused")
    p.add_argument("--workers", type=int, default=1,
                   help="search processes on this machine sharing the study (each evaluates other candidates; the "
                        "cores are split between them); more can join from elsewhere with the same --storage and "
                        "--study-name")
    p.add_argument("--model", default="smollm2")
    p.add_argument("--neuron-step", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quality-tokens", type=int, default=1024, help="held-out tokens per perplexity (default 1024)")
    p.add_argument("--text", default=None, help="held-out text file (default: stdlib docstrings)")
    p.add_argument("--supernet", type=Path, default=None,
                   help="evaluate quality on a trained super-network's weights (`edgenas train-supernet --out`)")
    p.add_argument("--precision", type=_precisions, default="fp32",
                   help="the weight precision the sub-networks are deployed at (fp32, fp16, int8, int4 for onnxruntime; f32, "
                        "f16, q8_0, q4_0 for llama.cpp): quality is measured as that graph computes, and the predictor "
                        "must be trained on measurements of it (edgenas profile --precision). Several, comma-separated "
                        "(e.g. q8_0,q4_0, with a --predictor for each): search architecture x precision")
    p.add_argument("--block-size", type=int, default=32, choices=[16, 32, 64, 128], help="int4 weights: inputs per scale")
    p.add_argument("--no-baselines", action="store_true")
    p.add_argument("--override", action="store_true", help="use a predictor made for another device or base model")


def front_table(res: Any, full_ppl: float, shown: float, budget_ms: float, device: str, wl: Any) -> Table:
    """The front sorted by latency, fastest first, with quality relative to the full model;
    points above the useful ceiling are counted, not listed."""
    useful = sorted((p for p in res.front if p["perplexity"] <= shown), key=lambda p: p["latency_ms"])
    hidden = len(res.front) - len(useful)
    t = Table(title=f"Pareto front: {len(res.front)} of {len(res.points)} trials "
                    f"({sum(p['feasible'] for p in res.points)} feasible), budget {budget_ms:g} ms on {device}, "
                    f"workload {wl.prompt_len}+{wl.gen_tokens}; full model perplexity {full_ppl:.1f}"
                    + (f"; {hidden} point(s) above perplexity {shown:.0f} not listed" if hidden else ""))
    for c in ("sub-network", "hash", "params (M)", "perplexity", "x full", "predicted ms", "upper ms"):
        t.add_column(c, justify="left" if c in ("sub-network", "hash") else "right")
    for p in useful:
        t.add_row(p["summary"], p["config_hash"][:10], f"{p['params'] / 1e6:.1f}", f"{p['perplexity']:.1f}",
                  f"{p['perplexity'] / full_ppl:.2f}", f"{p['latency_ms']:.1f}", f"{p['upper_ms']:.1f}")
    return t


def bound_note(outcome: SearchOutcome, console: Console) -> None:
    bound = outcome.bound
    console.print(f"latency bound: holds for a new sub-network's workload with probability >= {bound['guaranteed']:.0%} "
                  f"(nominal {bound['nominal']:.0%}; CV+ by sub-network, each phase at half the miss rate)")
    if bound["widened"]:
        console.print("[yellow]warning:[/] the predictors hold too few sub-networks for the nominal level: the bound is "
                      "their widest value and guarantees only the level above; profile more sub-networks "
                      "(profile-device --samples 20) and retrain")


def baselines_table(rows: list[dict[str, Any]]) -> Table:
    bt = Table(title="baselines under the budget: the fastest searched sub-network at least as good")
    for c in ("baseline", "sub-network", "perplexity", "predicted ms", "searched ms", "searched ppl", "latency cut"):
        bt.add_column(c)
    for r in rows:
        bt.add_row(r["baseline"], r["summary"], f"{r['baseline_ppl']:.1f}", f"{r['baseline_ms']:.1f}",
                   "-" if r["searched_ms"] is None else f"{r['searched_ms']:.1f}",
                   "-" if r["searched_ms"] is None else f"{r['searched_ppl']:.1f}",
                   "-" if r["reduction"] is None else f"{r['reduction']:.0%}")
    return bt


def verified_table(rows: list[dict[str, Any]], host: str) -> Table:
    vt = Table(title=f"verified on {host} (measured workload = prefill + Simpson sum of decode steps)")
    for c in ("sub-network", "perplexity", "predicted ms", "measured ms", "error", "meets budget"):
        vt.add_column(c)
    for r in rows:
        measured = r.get("measured_ms") is not None
        vt.add_row(r["summary"], f"{r['perplexity']:.1f}", f"{r['latency_ms']:.1f}",
                   f"{r['measured_ms']:.1f}" if measured else "-", f"{r['error_pct']:+.1%}" if measured else "-",
                   ("yes" if r["meets_budget"] else "NO") if measured else "-")
    return vt


def render(outcome: SearchOutcome, console: Console = out_console) -> None:
    """What the search command prints after a search."""
    req, res = outcome.request, outcome.result
    bound_note(outcome, console)
    console.print(res.resumed)
    console.print(front_table(res, outcome.full_perplexity, outcome.shown, req.latency_budget_ms, outcome.device_name,
                              outcome.workload))
    sec = res.seconds
    console.print(f"hypervolume {res.hypervolume:.1f} (log-perplexity x ms, reference ppl 1e5 and the budget); "
                  f"{res.ppl_evaluations} perplexity evaluations now; predictor {sec['predictor']:.2f} s = "
                  f"{sec['predictor'] / max(sec['total'], 1e-9):.2%} of {sec['total']:.0f} s search time")
    if outcome.baselines:
        console.print(baselines_table(outcome.matched))
    if outcome.verified is not None:
        console.print(verified_table(outcome.verified, req.verify_host))
        ok = [r for r in outcome.verified if r.get("measured_ms") is not None]
        console.print(f"{sum(r['meets_budget'] for r in ok)}/{len(ok)} verified points meet the budget on the device; "
                      f"measurements added to {describe(req.db)}")
    out = req.out
    console.print(f"front: {out / 'front.json'}, {out / 'front.csv'}, configs {out / 'front.jsonl'}, plot {outcome.plot}")


def run_with_progress(request: SearchRequest, ws: Any = None, console: Console = out_console) -> SearchOutcome:
    """The search under a progress bar, then its tables."""
    with progress_bar() as prog:
        task = prog.add_task(f"{request.algorithm} search", total=request.evals)
        outcome = search(request, ws, lambda done, total, text: prog.update(task, completed=done, description=text))
    render(outcome, console)
    return outcome


def handle(args: argparse.Namespace) -> int:
    run_with_progress(request_from_args(SearchRequest, args))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    p = make_parser("search-subnets", "Search sub-networks for quality and predicted latency under a budget.")
    add_search_args(p)
    return run(p, argv, handle)


if __name__ == "__main__":
    raise SystemExit(main())
