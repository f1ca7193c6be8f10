"""The main job, end to end on one base model: sample sub-networks, profile them on a device
(this machine's CPU by default), evaluate their quality, train the device's latency
predictors, search for the Pareto front under a latency budget, and verify the chosen points
on the device."""

from __future__ import annotations

import argparse
import json
from typing import Any

from rich.console import Console
from rich.table import Table

from profiler.hosts import resolve_host
from profiler.store import Store
from profiler.sweep import Profiler, SweepSpec
from profiler.targets import make_target
from subnets.cost import cost
from subnets.workspace import Workspace


def _fmt_ppl(p: float) -> str:
    return f"{p:.1f}" if p < 1e5 else f"{p:.2e}"


def train_stage(args: argparse.Namespace, ws: Workspace, objective: Any, console: Console) -> Workspace:
    """Recovery training before the search: the sandwich rule over sub-networks from 15
    points below the budget up to the full model, by the device's predicted latency."""
    from training.cli import StepProgress
    from training.recovery import open_supernet, train_supernet
    from training.settings import TrainSettings

    lo = max(0.05, args.budget_share - 0.15)
    settings = TrainSettings(steps=args.train_steps, warmup_steps=max(1, args.train_steps // 20),
                             latency_range=(lo, 1.0), checkpoint_every=max(1, min(50, args.train_steps)),
                             seed=args.seed).validate()
    folder = args.out / "supernet"
    with StepProgress(settings.steps, "train-supernet (sandwich)") as bar:
        res = train_supernet(args.model, ["stdlib"], settings, folder, objective=objective,
                             neuron_step=args.neuron_step, on_step=bar)
    console.print(f"super-network: {res.steps_done} steps in {res.seconds:.0f} s ({res.tokens_per_s:.0f} tokens/s), "
                  f"sub-networks within {lo:.0%}-100% of the full model's latency; weights in {folder}")
    return open_supernet(folder, args.neuron_step, args.text, ws.eval_budget, base_id=ws.base.base_id)


def run_pipeline(args: argparse.Namespace, console: Console) -> dict[str, Any]:
    from rich.progress import Progress

    ws = Workspace.open(args.model, neuron_step=args.neuron_step, eval_text=args.text, eval_budget=args.quality_tokens,
                        reconstruct=args.reconstruct)
    granularity = getattr(args, "granularity", "tapered")
    configs = [ws.space.full(), *ws.space.sample(args.n, args.seed, granularity=granularity, strategy="stratified",
                                                   layer_ranking=ws.importance.layer_ranking())]
    args.out.mkdir(parents=True, exist_ok=True)
    db = args.out / "measurements.db"

    # 1. profile: prefill at the workload's prompt length and decode steps at the past lengths
    #    the search's latency objective samples, 1 thread by default
    from predictor.workload import Workload

    wl = Workload.parse(args.workload)
    past = tuple(int(p) for p in wl.decode_points()) or (wl.prompt_len,)
    precision = getattr(args, "precision", "fp32")
    if precision != "fp32":  # quality as the deployed graph computes it
        import dataclasses

        ws = dataclasses.replace(ws, precision=precision)
    spec = SweepSpec(phases=("prefill", "decode"), seq_lens=(wl.prompt_len,), past_lens=past, threads=args.threads,
                     precision=None if precision == "fp32" else precision,
                     reference_every=10, timing={"min_time_s": args.min_time, "max_time_s": max(20.0, 4 * args.min_time)},
                     decode_min_time_s=3 * args.min_time, decode_sessions=3)
    host = resolve_host(args.host)
    store = Store(db)
    with Progress(console=Console(stderr=True), transient=True) as prog:
        task = prog.add_task(f"profiling on {args.host}", total=None)
        summary = Profiler(ws, make_target(host), store, spec,
                           lambda d, t, text: prog.update(task, completed=d, total=t,
                                                          description=f"profile {text[:50]}")).run(configs)
        latency = {(r["subnet_hash"], r["phase"], r["seq_len"], r["past_len"]): r
                   for r in store.measurement_rows(device=summary.fingerprint)}
        store.close()
        # 2. quality
        task = prog.add_task("perplexity", total=len(configs))
        ppl = {}
        for c in configs:
            ppl[c.config_hash()] = ws.perplexity(c)
            prog.advance(task)

    t = Table(title=f"{ws.base.base_id} on {args.host} ({args.threads} thread{'s' if args.threads > 1 else ''}), "
                    f"perplexity on {ws.eval_tokens().num_tokens} held-out tokens")
    for col in ("sub-network", "params (M)", f"GFLOPs S={wl.prompt_len}", "perplexity", f"prefill ms S={wl.prompt_len}",
                f"decode ms P={past[0]}", "flags"):
        t.add_column(col, justify="left" if col in ("sub-network", "flags") else "right")
    rows = []
    for c in configs:
        h = c.config_hash()
        pre, dec = latency.get((h, "prefill", wl.prompt_len, 0)), latency.get((h, "decode", 1, past[0]))
        flags = sorted({f for r in (pre, dec) if r for f, on in (("unstable", r["unstable"]), ("throttled", r["throttled"])) if on})
        row = {"config_hash": h, "summary": c.summary(), "params": cost(c, ws.space.dims, "prefill").params,
               "prefill_gflops": cost(c, ws.space.dims, "prefill", wl.prompt_len).flops / 1e9, "perplexity": ppl[h],
               "prefill_ms": pre["median_ms"] if pre else None, "decode_ms": dec["median_ms"] if dec else None,
               "flags": flags, "config": c.to_dict()}
        rows.append(row)
    rows.sort(key=lambda r: r["prefill_ms"] or 0)
    for r in rows:
        t.add_row(r["summary"], f"{r['params'] / 1e6:.1f}", f"{r['prefill_gflops']:.2f}", _fmt_ppl(r["perplexity"]),
                  "-" if r["prefill_ms"] is None else f"{r['prefill_ms']:.1f}",
                  "-" if r["decode_ms"] is None else f"{r['decode_ms']:.2f}", ",".join(r["flags"]))
    console.print(t)
    sec = summary.seconds
    console.print(f"profiled {summary.measured} cells now ({summary.already_done} already in {db}), "
                  f"{len(summary.failed)} failed; {sec['total']:.0f} s, {summary.subnets_per_hour:.0f} sub-networks/hour")
    (args.out / "subnets.json").write_text(json.dumps(rows, indent=1))
    console.print(f"results: {args.out / 'subnets.json'}, measurements: {db}")

    # 3. per-phase latency predictors for this device, cross-validated against the baselines
    from predictor.cli import train

    pred_dir = args.out / "predictors" / args.host
    metrics = train(db, args.host, ["prefill", "decode"], pred_dir, args.model, console=console)

    # 4. search under a budget (a share of the full model's predicted workload latency),
    #    then verify the chosen points on the device
    from predictor.features import ConfigBatch
    from predictor.workload import LatencyObjective, Workload
    from search.cli import search

    objective = LatencyObjective.load(pred_dir, Workload.parse(args.workload), args.host, ws.base.base_id)
    full_ms = float(objective.predict(ConfigBatch.from_configs([ws.space.full()], ws.space.dims.num_layers))[0])
    budget = round(args.budget_share * full_ms, 1)
    if getattr(args, "train_steps", 0) > 0:
        ws = train_stage(args, ws, objective, console)
    console.print(f"search: full model predicted {full_ms:.0f} ms for workload {args.workload}; budget "
                  f"{args.budget_share:.0%} of it = {budget} ms")
    search_args = argparse.Namespace(
        device=args.host, predictor=pred_dir, latency_budget_ms=budget, workload=args.workload, algorithm="nsga2",
        evals=args.evals, granularity=granularity, max_params=None, verify=args.verify, host=args.host, db=db,
        out=args.out / "search", model=args.model, neuron_step=args.neuron_step, seed=args.seed,
        quality_tokens=ws.eval_budget, text=args.text, no_baselines=False, override=False,
        max_perplexity=getattr(args, "max_perplexity", None), precision=precision, block_size=32)
    found = search(search_args, console, ws=ws)
    from edgenas.report import write_report

    console.print(f"report: {write_report(args.out)}")
    return {"rows": rows, "summary": summary.to_dict(), "predictor": str(pred_dir), "predictor_metrics": metrics,
            "search": {k: found[k] for k in ("hypervolume", "front") if k in found}}
