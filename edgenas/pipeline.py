"""The main job, end to end on one base model: sample sub-networks, profile them on a device
(this machine's CPU by default), evaluate their quality, and show the table. Later stages
(predictor, search) extend it."""

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


def run_pipeline(args: argparse.Namespace, console: Console) -> dict[str, Any]:
    from rich.progress import Progress

    ws = Workspace.open(args.model, neuron_step=args.neuron_step, eval_text=args.text)
    configs = [ws.space.full(), *ws.space.sample(args.n, args.seed, strategy="stratified",
                                                   layer_ranking=ws.importance.layer_ranking())]
    args.out.mkdir(parents=True, exist_ok=True)
    db = args.out / "measurements.db"

    # 1. profile: prefill S=128 and one decode step at past 128, 1 thread by default
    spec = SweepSpec(phases=("prefill", "decode"), seq_lens=(128,), past_lens=(128,), threads=args.threads,
                     reference_every=10)
    host = resolve_host(args.host)
    store = Store(db)
    with Progress(console=Console(stderr=True), transient=True) as prog:
        task = prog.add_task(f"profiling on {args.host}", total=None)
        summary = Profiler(ws, make_target(host), store, spec,
                           lambda d, t, text: prog.update(task, completed=d, total=t,
                                                          description=f"profile {text[:50]}")).run(configs)
        latency = {(r["subnet_hash"], r["phase"]): r for r in store.measurement_rows(device=summary.fingerprint)}
        store.close()
        # 2. quality
        task = prog.add_task("perplexity", total=len(configs))
        ppl = {}
        for c in configs:
            ppl[c.config_hash()] = ws.perplexity(c)
            prog.advance(task)

    t = Table(title=f"{ws.base.base_id} on {args.host} ({args.threads} thread{'s' if args.threads > 1 else ''}), "
                    f"perplexity on {ws.eval_tokens().num_tokens} held-out tokens")
    for col in ("sub-network", "params (M)", "GFLOPs S=128", "perplexity", "prefill ms S=128", "decode ms P=128", "flags"):
        t.add_column(col, justify="left" if col in ("sub-network", "flags") else "right")
    rows = []
    for c in configs:
        h = c.config_hash()
        pre, dec = latency.get((h, "prefill")), latency.get((h, "decode"))
        flags = sorted({f for r in (pre, dec) if r for f, on in (("unstable", r["unstable"]), ("throttled", r["throttled"])) if on})
        row = {"config_hash": h, "summary": c.summary(), "params": cost(c, ws.space.dims, "prefill").params,
               "prefill_gflops": cost(c, ws.space.dims, "prefill", 128).flops / 1e9, "perplexity": ppl[h],
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
    return {"rows": rows, "summary": summary.to_dict()}
