"""``search-subnets``: the latency-constrained multi-objective search."""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from profiler.database import describe, store_location
from subnets.clikit import add_granularity, add_reconstruct, make_parser, progress_bar, run
from subnets.quantize import GGUF_TYPES
from subnets.quantize import PRECISIONS as ONNX_PRECISIONS

out_console = Console(width=None if sys.stdout.isatty() else 150)


def add_search_args(p: argparse.ArgumentParser) -> None:
    from search.study import ALGORITHMS

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


PRECISIONS = (*ONNX_PRECISIONS, *GGUF_TYPES)


def _precisions(text: str) -> str:
    bad = [p for p in text.split(",") if p not in PRECISIONS]
    if bad or len(set(text.split(","))) != len(text.split(",")):
        raise argparse.ArgumentTypeError(f"{text!r}: give distinct precisions from {', '.join(PRECISIONS)}, "
                                         "comma-separated")
    return text


def predictor_precision(objective: Any) -> str:
    """The weight precision a predictor's measurements were of, from their back-end tag."""
    tags = {str(rec.get("backend") or "") for rec in objective.measured_as.values()}
    from profiler.sweep import tag_precision

    return (tag_precision(sorted(tags)[0] if tags else "") or "fp32").split("-")[0]


def deployments(args: argparse.Namespace, ws: Any, wl: Any, base_id: str) -> list[Any]:
    """One Deployment per --precision: the workspace judging quality at it, the predictor of it."""
    import dataclasses

    from predictor.workload import LatencyObjective
    from search.study import Deployment, SearchError

    precisions = str(getattr(args, "precision", "fp32")).split(",")
    folders = args.predictor if isinstance(args.predictor, list) else [args.predictor]
    objectives = [LatencyObjective.load(f, wl, args.device, base_id, args.override) for f in folders]
    if len(precisions) == 1 and len(objectives) == 1:
        by_precision = {precisions[0]: objectives[0]}
    else:
        by_precision = {predictor_precision(o): o for o in objectives}
        missing = [p for p in precisions if p not in by_precision]
        if missing:
            raise SearchError(f"no predictor for {', '.join(missing)} among --predictor "
                              f"{' '.join(str(f) for f in folders)} (they are for {', '.join(sorted(by_precision))})",
                              "pass one predictor folder per --precision, each trained on measurements of it")
    out = []
    for p in precisions:
        check_precision(by_precision[p], p, getattr(args, "block_size", 32))
        wsp = ws if p == "fp32" else dataclasses.replace(ws, precision=p, block_size=getattr(args, "block_size", 32))
        out.append(Deployment(p, wsp, by_precision[p]))
    return out


def check_precision(objective: Any, precision: str, block_size: int) -> None:
    """The predictors must be of the precision the search deploys at (onnxruntime back-ends:
    the precision is the back-end tag's last part)."""
    from profiler.sweep import SweepSpec, tag_precision
    from search.study import SearchError

    gguf = precision in GGUF_TYPES
    want = precision if gguf else SweepSpec(precision=precision, block_size=block_size).weights_precision
    for phase, rec in objective.measured_as.items():
        tag = str(rec.get("backend") or "")
        if not tag or tag.startswith(("trt", "trtexec")):
            continue
        have = tag_precision(tag)
        if tag.startswith("llama.cpp") or gguf:
            if have != want:
                raise SearchError(f"the {phase} predictor was trained on {tag} measurements, the search asks for "
                                  f"{precision} weights", f"search with --precision {have or 'fp32'}, or profile with "
                                  f"--backend llama.cpp --precision {precision} and train on those")
            continue
        if have != want:
            raise SearchError(f"the {phase} predictor was trained on {tag} measurements, the search asks for "
                              f"{precision} weights", f"profile with --precision {precision} and train on those "
                              f"(train-predictor --backend {tag.split(':')[0]}{':' + want if want else ''}), "
                              f"or search with --precision {have.split('-')[0] if have else 'fp32'}")


def parse_ceiling(text: str | None, full_ppl: float) -> float:
    """``--max-perplexity``: a perplexity, or ``Rx`` for R times the full model's."""
    from search.study import SearchError

    if text is None:
        return math.inf
    t = str(text).strip().lower()
    try:
        value = float(t[:-1]) * full_ppl if t.endswith("x") else float(t)
    except ValueError:
        raise SearchError(f"--max-perplexity {text!r} is neither a perplexity nor a multiple like 3x",
                          "e.g. --max-perplexity 60, or --max-perplexity 3x (three times the full model's)") from None
    if not value > 0:
        raise SearchError(f"--max-perplexity {text!r} is not positive", "e.g. --max-perplexity 3x")
    return value


def useful_ceiling(ceiling: float, full_ppl: float) -> float:
    """The perplexity up to which front points are worth showing and measuring: the user's
    ceiling, else ten times the full model's (beyond it a sub-network is broken, not small)."""
    return ceiling if math.isfinite(ceiling) else 10.0 * full_ppl


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


def setup(args: argparse.Namespace, ws: Any = None) -> tuple[Any, list[Any], str]:
    """The workspace, the deployments (precision, quality, predictors) and the base model id
    a search of ``args`` runs on (shared by every worker of a study)."""
    from dataclasses import replace

    from predictor.workload import Workload
    from subnets.basemodel import load_base_info
    from subnets.workspace import Workspace

    wl = Workload.parse(args.workload)
    base_id, _ = load_base_info(args.model)
    if ws is None and getattr(args, "supernet", None) is not None:
        from training.recovery import open_supernet

        ws = replace(open_supernet(args.supernet, args.neuron_step, args.text, args.quality_tokens, base_id=base_id),
                     reconstruct=args.reconstruct)
    ws = ws or Workspace.open(args.model, neuron_step=args.neuron_step, eval_text=args.text, eval_budget=args.quality_tokens,
                              reconstruct=args.reconstruct)
    deps = deployments(args, ws, wl, base_id)
    return deps[0].ws, deps, base_id


def check_args(args: argparse.Namespace) -> Any:
    """Refuse bad settings before the model loads; returns the study storage."""
    from predictor.workload import Workload
    from search.storage import parse_storage
    from search.study import SearchError

    Workload.parse(args.workload)
    if args.evals < 1:
        raise SearchError(f"--evals {args.evals} is not positive", "ask for at least 1 evaluation")
    if not args.latency_budget_ms > 0:
        raise SearchError(f"--latency-budget-ms {args.latency_budget_ms} is not positive", "give a budget in milliseconds")
    workers = getattr(args, "workers", 1)
    if workers < 1:
        raise SearchError(f"--workers {workers} is not positive", "pass --workers 1 or more")
    return parse_storage(getattr(args, "storage", None), args.out / "study.db")


def search(args: argparse.Namespace, console: Console = out_console, ws: Any = None) -> dict[str, Any]:
    """The search of ``args``: the front, baselines, verification and files in ``--out``;
    with ``--workers N``, N-1 more processes search the same study alongside."""
    from predictor.workload import Workload
    from search.workers import WorkerPool, threads_per_worker

    storage = check_args(args)
    wl = Workload.parse(args.workload)
    workers = getattr(args, "workers", 1)
    if workers > 1:
        import torch

        torch.set_num_threads(threads_per_worker(workers))
    # the other workers load the model while this process does
    pool = WorkerPool(args, storage.url, getattr(args, "study_name", None), workers - 1)
    try:
        return _search(args, console, ws, storage, pool, wl, workers)
    finally:
        pool.join()


def _search(args: argparse.Namespace, console: Console, ws: Any, storage: Any, pool: Any, wl: Any,
            workers: int) -> dict[str, Any]:
    from search.baselines import compare_at_matched_quality, evaluate_baselines
    from search.pareto import plot_front
    from search.study import collect, run_search, shared_quality
    from search.verify import pick_useful, verify

    ws, deps, base_id = setup(args, ws)
    objective = deps[0].objective
    bound = objective.bound()
    console.print(f"latency bound: holds for a new sub-network's workload with probability >= {bound['guaranteed']:.0%} "
                  f"(nominal {bound['nominal']:.0%}; CV+ by sub-network, each phase at half the miss rate)")
    if bound["widened"]:
        console.print("[yellow]warning:[/] the predictors hold too few sub-networks for the nominal level: the bound is "
                      "their widest value and guarantees only the level above; profile more sub-networks "
                      "(profile-device --samples 20) and retrain")
    if args.verify > 0:  # before the search, not after it: refuse now if verification cannot be honest
        from search.verify import verification_spec

        for d in deps:
            verification_spec(d.objective, ws.space.full().config_hash())
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    max_params = args.max_params if args.max_params else math.inf
    with progress_bar() as prog:
        task = prog.add_task(f"{args.algorithm} search", total=args.evals)

        def progress(done: int, total: int, best: dict[str, Any] | None) -> None:
            desc = f"{args.algorithm}: best feasible " + (
                f"ppl {best['perplexity']:.1f} at {best['latency_ms']:.1f} ms" if best else "none yet")
            prog.update(task, completed=done, description=desc)

        from search.baselines import baseline_configs

        warm = [] if args.algorithm == "random" else [c for cs in baseline_configs(ws).values() for c in cs]
        quality = shared_quality(storage, ws)
        full_ppl = quality(ws.space.full())
        ceiling = parse_ceiling(getattr(args, "max_perplexity", None), full_ppl)
        study_name = getattr(args, "study_name", None)
        if workers > 1:
            prog.update(task, description=f"waiting for {workers - 1} other worker(s) to load")
            pool.wait_ready()
        res = run_search(ws, objective, args.algorithm, args.evals, args.latency_budget_ms, storage,
                         max_params=max_params, seed=args.seed, granularity=args.granularity, progress=progress,
                         warm_start=warm, max_perplexity=ceiling, deployments=deps, study_name=study_name)
        if workers > 1:  # the study as all workers left it
            prog.update(task, description=f"waiting for {workers - 1} other worker(s) to finish")
            others = pool.join()
            import optuna

            done = collect(optuna.load_study(study_name=res.study_name, storage=storage.optuna()), ws.precision,
                           len(deps) > 1, 1e5, args.latency_budget_ms)
            res.points, res.front, res.hypervolume = done.points, done.front, done.hypervolume
            res.ppl_evaluations += sum(o["evaluations"] for o in others)
        res.ppl_evaluations += quality.evaluations
        baselines: dict[str, list[dict[str, Any]]] = {}
        if not args.no_baselines:
            prog.update(task, description="baselines")
            for d in deps:  # each hand-made baseline at each precision
                q = quality if d.ws is ws else shared_quality(storage, d.ws)
                for name, pts in evaluate_baselines(d.ws, d.objective, q).items():
                    baselines[name if len(deps) == 1 else f"{name} @ {d.precision}"] = pts
    console.print(res.resumed)

    (out / "front.json").write_text(json.dumps(res.front, indent=1))
    with (out / "front.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["config_hash", "summary", "perplexity", "latency_ms", "upper_ms", "params"])
        for p in res.front:
            w.writerow([p["config_hash"], p["summary"], p["perplexity"], p["latency_ms"], p["upper_ms"], p["params"]])
    with (out / "front.jsonl").open("w") as f:
        for p in res.front:
            f.write(json.dumps(p["config"], sort_keys=True, separators=(",", ":")) + "\n")
    shown = useful_ceiling(ceiling, full_ppl)
    png = plot_front(res.points, res.front, baselines, args.latency_budget_ms, out / "front.png",
                     f"{base_id} on {objective.device_name}, workload S={wl.prompt_len} N={wl.gen_tokens}, {args.algorithm}",
                     ppl_cap=shown, full_ppl=full_ppl)
    console.print(front_table(res, full_ppl, shown, args.latency_budget_ms, objective.device_name, wl))
    sec = res.seconds
    console.print(f"hypervolume {res.hypervolume:.1f} (log-perplexity x ms, reference ppl 1e5 and the budget); "
                  f"{res.ppl_evaluations} perplexity evaluations now; predictor {sec['predictor']:.2f} s = "
                  f"{sec['predictor'] / max(sec['total'], 1e-9):.2%} of {sec['total']:.0f} s search time")
    result: dict[str, Any] = {"front": res.front, "hypervolume": res.hypervolume, "seconds": sec, "plot": str(png),
                              "full_perplexity": full_ppl, "max_perplexity": None if math.isinf(ceiling) else ceiling,
                              "study": res.study_name, "storage": storage.described, "workers": workers,
                              "ppl_evaluations": res.ppl_evaluations, "bound": bound}
    if baselines:
        cmp_rows = compare_at_matched_quality(res.front, baselines, args.latency_budget_ms)
        bt = Table(title="baselines under the budget: the fastest searched sub-network at least as good")
        for c in ("baseline", "sub-network", "perplexity", "predicted ms", "searched ms", "searched ppl", "latency cut"):
            bt.add_column(c)
        for r in cmp_rows:
            bt.add_row(r["baseline"], r["summary"], f"{r['baseline_ppl']:.1f}", f"{r['baseline_ms']:.1f}",
                       "-" if r["searched_ms"] is None else f"{r['searched_ms']:.1f}",
                       "-" if r["searched_ms"] is None else f"{r['searched_ppl']:.1f}",
                       "-" if r["reduction"] is None else f"{r['reduction']:.0%}")
        console.print(bt)
        result["baselines"] = baselines
        result["matched"] = cmp_rows
    if args.verify > 0 and res.front:
        chosen = pick_useful(res.front, args.verify, shown)
        rows = []
        for d in deps:  # each precision measured as its predictor's data was
            mine = [p for p in chosen if p.get("precision", d.precision) == d.precision]
            if mine:
                rows += verify(d.ws, d.objective, mine, args.host or args.device, args.db, args.latency_budget_ms)
        vt = Table(title=f"verified on {args.host or args.device} (measured workload = prefill + Simpson sum of decode steps)")
        for c in ("sub-network", "perplexity", "predicted ms", "measured ms", "error", "meets budget"):
            vt.add_column(c)
        for r in rows:
            vt.add_row(r["summary"], f"{r['perplexity']:.1f}", f"{r['latency_ms']:.1f}",
                       "-" if r.get("measured_ms") is None else f"{r['measured_ms']:.1f}",
                       "-" if r.get("measured_ms") is None else f"{r['error_pct']:+.1%}",
                       "-" if r.get("measured_ms") is None else ("yes" if r["meets_budget"] else "NO"))
        console.print(vt)
        ok = [r for r in rows if r.get("measured_ms") is not None]
        console.print(f"{sum(r['meets_budget'] for r in ok)}/{len(ok)} verified points meet the budget on the device; "
                      f"measurements added to {describe(args.db)}")
        result["verified"] = rows
    (out / "search.json").write_text(json.dumps(result, indent=1, default=str))
    console.print(f"front: {out / 'front.json'}, {out / 'front.csv'}, configs {out / 'front.jsonl'}, plot {png}")
    return result


def main(argv: Sequence[str] | None = None) -> int:
    p = make_parser("search-subnets", "Search sub-networks for quality and predicted latency under a budget.")
    add_search_args(p)
    return run(p, argv, lambda a: (search(a), 0)[1])


if __name__ == "__main__":
    raise SystemExit(main())
