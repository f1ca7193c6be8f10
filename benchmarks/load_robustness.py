"""How the main job's measurements hold up on an ordinary machine: the same sub-networks
profiled with the main job's sweep settings on a quiet machine and under the load generator
(a share of one core in bursts), per runtime: the re-measurement spread (every cell of a
share measured twice), the held-out predictor accuracy beside linear-in-FLOPs, and the
sweep's rate. Each runtime's predictor is trained on its own measurements (not transferred),
so the rows compare like with like.

    python benchmarks/load_robustness.py --out runs/load-robustness \\
        --precisions fp32,int4,q8_0,q4_0 --samples 12 --share 0.4 --burst 2 --protocols today,rounds

``--protocols``: today's (each cell timed to completion) and interleaved rounds
(``--rounds``; ``rounds-norm``: with drift normalisation), one after the other per runtime
and condition, each in its own store.

Run it on an otherwise idle machine: the quiet condition must be quiet. llama.cpp's rows
need its tools (scripts/build_llama_cpp.sh). About 4-5 minutes per runtime and condition
on a 2-core x86 CPU at 1 thread.
"""

from __future__ import annotations

import argparse
import json
import logging
from dataclasses import replace
from pathlib import Path
from typing import Any

from edgenas.pipeline import PipelineRequest
from export.quantize import LLAMA_CPP_PRECISIONS
from predictor.fitting import PredictorRequest, train_predictors
from profiler.hosts import resolve_host
from profiler.load_generator import BackgroundLoad, LoadSpec
from profiler.request import profile
from subnets.workspace import Workspace


def measure(main: PipelineRequest, ws: Workspace, configs: list[Any], precision: str, db: Path,
            out: Path, repeat_share: float, rounds: int = 0, normalize: bool = False, max_rounds: int = 8,
            quantile: float = 0.5) -> dict[str, Any]:
    """One runtime under one condition and protocol: its sweep, then its own predictors."""
    sweep = replace(main.sweep(precision), db=db, past_len=main.past_lens(), repeat_share=repeat_share, repeat_min=5,
                    rounds=rounds, normalize_drift=normalize, max_rounds=max_rounds, round_quantile=quantile)
    summary = profile(sweep, ws, configs).boards[0]
    tag = sweep.spec(resolve_host(main.host)).backend_tag
    reports = train_predictors(PredictorRequest(device=main.host, db=db, out=out / precision, model=main.model,
                                                backend=tag, include_unstable=True, no_plot=True))
    label = "today" if not rounds else (f"rounds {rounds}-{max_rounds}, q{quantile:g}"
                                        + (", normalised" if normalize else ""))
    if rounds:
        row_drift = drift_effect(db)
    row: dict[str, Any] = {"precision": precision, "backend": tag, "protocol": label, "seconds": summary.seconds["total"],
                           "subnets_per_hour": summary.subnets_per_hour, "unstable": summary.unstable,
                           "cells": summary.measured, "phases": {}}
    for phase, r in reports.items():
        row["phases"][phase] = {"n": r.n, "repeatability": r.repeatability, "noise_ratio": r.noise_ratio,
                                "form": r.form, "predictor": r.comparison["edgenas predictor"],
                                "linear in FLOPs": r.comparison["linear in FLOPs"]}
    if rounds:
        row["drift"] = row_drift
    return row


def drift_effect(db: Path) -> dict[str, Any]:
    """From an interleaved store's rounds: per phase, the re-measurement spread and the median
    interval with each cell's rounds raw and drift-normalised (both passes' rounds are kept,
    and the reference ran in every round of both)."""
    import sqlite3

    from profiler.rounds import Cell, Drift

    with sqlite3.connect(db) as c:
        c.row_factory = sqlite3.Row
        rows = [dict(r) for r in c.execute("SELECT * FROM rounds ORDER BY id")]
    drift = Drift()
    cells: dict[tuple[int, int], Cell] = {}
    for r in rows:
        tag = (r["round_batch"], r["round_no"])
        if r["job_id"] is None:
            drift.rounds[(r["phase"], *tag)] = r["median_ms"]
            drift.anchors.setdefault(r["phase"], r["median_ms"])
            continue
        cells.setdefault((r["job_id"], r["pass_no"]), Cell(r["job_id"], r["phase"], r["phase"])).add(
            r["median_ms"], tag, [])
    out: dict[str, Any] = {}
    for phase in sorted({c.phase for c in cells.values()}):
        mine = {k: c for k, c in cells.items() if c.phase == phase}
        for name, stat in (("raw", lambda c: c.medians), ("normalised", drift.normalised)):
            out.setdefault(phase, {})[name] = _spread_at(mine, stat, None)
            # the same cells had they stopped after k rounds (a cell that converged sooner: its own)
            out[phase][name]["by_rounds"] = {k: _spread_at(mine, stat, k) for k in range(2, 9)}
    return out


def _spread_at(cells: dict[tuple[int, int], Any], stat: Any, k: int | None) -> dict[str, Any]:
    import statistics

    from profiler.repeatability import repeatability
    from profiler.rounds import level

    levels = {key: level(stat(c)[:k]) for key, c in cells.items()}
    pairs = [(levels[(j, 0)][0], levels[(j, 1)][0]) for j, p in levels if p == 1 and (j, 0) in levels]
    rep = repeatability(pairs)
    return {"median_rel_ci": statistics.median(v[1] for key, v in levels.items() if key[1] == 0),
            "repeatability": rep.to_dict() if rep else None}


def table(results: dict[str, list[dict[str, Any]]]) -> str:
    head = ("| condition | runtime | protocol | phase | cells | re-measured: spread / within ±5% | predictor ±5% / ±10% / MAPE "
            "| error spread / noise floor | linear in FLOPs ±5% | sub-networks/h |")
    lines = [head, "|" + "---|" * 10]
    for cond, rows in results.items():
        for row in rows:
            for phase, p in row["phases"].items():
                rep, pr, fl = p["repeatability"], p["predictor"], p["linear in FLOPs"]
                rep_s = "-" if not rep else f"{rep['sd_log_ratio']:.1%} / {rep['within_5pct']:.0%} (n={rep['n']})"
                ratio = "-" if p["noise_ratio"] is None else f"{pr['sd_log']:.1%} / {p['noise_ratio']:.2f}x"
                lines.append(f"| {cond} | {row['backend']} | {row['protocol']} | {phase} | {p['n']} | {rep_s} | {pr['within_5pct']:.0%} / "
                             f"{pr['within_10pct']:.0%} / {pr['mape']:.1%} | {ratio} | {fl['within_5pct']:.0%} | "
                             f"{row['subnets_per_hour']:.0f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--precisions", default="fp32,int4,q8_0,q4_0")
    ap.add_argument("--samples", type=int, default=12, help="sampled sub-networks beside the full model")
    ap.add_argument("--conditions", default="quiet,loaded")
    ap.add_argument("--share", type=float, default=0.4, help="the load generator's share of one core")
    ap.add_argument("--burst", type=float, default=2.0, help="the load generator's busy spell (s)")
    ap.add_argument("--repeat-share", type=float, default=0.3, help="share of the cells measured twice")
    ap.add_argument("--protocols", default="today", help="today, rounds, rounds-norm (comma-separated)")
    ap.add_argument("--rounds", type=int, default=6, help="the rounds protocol's minimum rounds")
    ap.add_argument("--max-rounds", type=int, default=8, help="the rounds protocol's maximum rounds")
    ap.add_argument("--quantile", type=float, default=0.25, help="the rounds protocol's level: this quantile")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    main_job = PipelineRequest(model=args.model, n=args.samples)
    ws = Workspace.open(main_job.model, neuron_step=main_job.neuron_step)
    configs = [ws.space.full(), *ws.space.sample(args.samples, 0, strategy="stratified",
                                                   layer_ranking=ws.importance.layer_ranking())]
    precisions = args.precisions.split(",")
    unknown = [p for p in precisions if p not in ("fp32", "int8", "int4", *LLAMA_CPP_PRECISIONS)]
    if unknown:
        ap.error(f"unknown precision(s) {unknown}: use fp32, int8, int4, q8_0 or q4_0")
    results: dict[str, list[dict[str, Any]]] = {}
    for cond in args.conditions.split(","):
        load = LoadSpec(share=args.share, burst_s=args.burst) if cond == "loaded" else None
        results[cond] = []
        for precision in precisions:
            for proto in args.protocols.split(","):
                rounds = 0 if proto == "today" else args.rounds
                with BackgroundLoad(load):
                    results[cond].append(measure(main_job, ws, configs, precision, args.out / f"{cond}-{proto}.db",
                                                 args.out / "predictors" / cond / proto, args.repeat_share, rounds,
                                                 proto == "rounds-norm", args.max_rounds, args.quantile))
            (args.out / "load_robustness.json").write_text(json.dumps(
                {"load": LoadSpec(share=args.share, burst_s=args.burst).to_dict(), "results": results}, indent=1))
    print(table(results))
    for cond, rows in results.items():
        for row in rows:
            for phase, d in (row.get("drift") or {}).items():
                print(cond, row["backend"], phase, {k: (round(v["median_rel_ci"], 4), v["repeatability"] and
                                                         round(v["repeatability"]["sd_log_ratio"], 4))
                                                     for k, v in d.items()})


if __name__ == "__main__":
    main()
