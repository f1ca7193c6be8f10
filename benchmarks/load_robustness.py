"""How the main job's measurements hold up on an ordinary machine: the same sub-networks
profiled with the main job's sweep settings on a quiet machine and under the load generator
(a share of one core in bursts), per runtime: the re-measurement spread (every cell of a
share measured twice), the held-out predictor accuracy beside linear-in-FLOPs, and the
sweep's rate. Each runtime's predictor is trained on its own measurements (not transferred),
so the rows compare like with like.

    python benchmarks/load_robustness.py --out runs/load-robustness \\
        --precisions fp32,int4,q8_0,q4_0 --samples 12 --share 0.4 --burst 2

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
            out: Path, repeat_share: float) -> dict[str, Any]:
    """One runtime under one condition: its sweep, then its own predictors."""
    sweep = replace(main.sweep(precision), db=db, past_len=main.past_lens(), repeat_share=repeat_share, repeat_min=5)
    summary = profile(sweep, ws, configs).boards[0]
    tag = sweep.spec(resolve_host(main.host)).backend_tag
    reports = train_predictors(PredictorRequest(device=main.host, db=db, out=out / precision, model=main.model,
                                                backend=tag, include_unstable=True, no_plot=True))
    row: dict[str, Any] = {"precision": precision, "backend": tag, "seconds": summary.seconds["total"],
                           "subnets_per_hour": summary.subnets_per_hour, "unstable": summary.unstable,
                           "cells": summary.measured, "phases": {}}
    for phase, r in reports.items():
        row["phases"][phase] = {"n": r.n, "repeatability": r.repeatability, "noise_ratio": r.noise_ratio,
                                "form": r.form, "predictor": r.comparison["edgenas predictor"],
                                "linear in FLOPs": r.comparison["linear in FLOPs"]}
    return row


def table(results: dict[str, list[dict[str, Any]]]) -> str:
    head = ("| condition | runtime | phase | cells | re-measured: spread / within ±5% | predictor ±5% / ±10% / MAPE "
            "| error spread / noise floor | linear in FLOPs ±5% | sub-networks/h |")
    lines = [head, "|" + "---|" * 9]
    for cond, rows in results.items():
        for row in rows:
            for phase, p in row["phases"].items():
                rep, pr, fl = p["repeatability"], p["predictor"], p["linear in FLOPs"]
                rep_s = "-" if not rep else f"{rep['sd_log_ratio']:.1%} / {rep['within_5pct']:.0%} (n={rep['n']})"
                ratio = "-" if p["noise_ratio"] is None else f"{pr['sd_log']:.1%} / {p['noise_ratio']:.2f}x"
                lines.append(f"| {cond} | {row['backend']} | {phase} | {p['n']} | {rep_s} | {pr['within_5pct']:.0%} / "
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
            with BackgroundLoad(load):
                results[cond].append(measure(main_job, ws, configs, precision, args.out / f"{cond}.db",
                                             args.out / "predictors" / cond, args.repeat_share))
            (args.out / "load_robustness.json").write_text(json.dumps(
                {"load": LoadSpec(share=args.share, burst_s=args.burst).to_dict(), "results": results}, indent=1))
    print(table(results))


if __name__ == "__main__":
    main()
