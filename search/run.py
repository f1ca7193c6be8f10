"""``search(request)``: the whole search stage of one request, as every entry point runs it:
the study (with ``workers - 1`` more processes on it), the hand-made baselines at each
precision, verification of front points on the device, and the files in ``request.out``
(front.json/.csv/.jsonl, front.png, search.json). Returns a typed ``SearchOutcome``; the
command line draws its tables from it."""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from predictor.workload import Workload
from search.deployments import setup
from search.request import SearchRequest, parse_ceiling
from search.storage import StudyStorage, parse_storage
from search.study import Deployment, SearchResult, collect, run_search, shared_quality
from search.workers import WorkerPool, threads_per_worker
from subnets.workspace import Workspace

# (done, total, what is happening now)
Progress = Callable[[int, int, str], None]


def useful_ceiling(ceiling: float, full_ppl: float) -> float:
    """The perplexity up to which front points are worth showing and measuring: the user's
    ceiling, else ten times the full model's (beyond it a sub-network is broken, not small)."""
    return ceiling if math.isfinite(ceiling) else 10.0 * full_ppl


@dataclass
class SearchOutcome:
    """What a search found, and everything its report needs."""

    request: SearchRequest
    result: SearchResult
    base_id: str
    device_name: str
    full_perplexity: float
    ceiling: float
    bound: dict[str, Any]
    storage: str
    # the weights and arithmetic quality was judged with (what a trained, refitted or
    # quantized search ran on)
    judged: dict[str, Any] = field(default_factory=dict)
    plot: Path | None = None
    baselines: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    matched: list[dict[str, Any]] = field(default_factory=list)
    verified: list[dict[str, Any]] | None = None

    @property
    def workload(self) -> Workload:
        return Workload.parse(self.request.workload)

    @property
    def shown(self) -> float:
        return useful_ceiling(self.ceiling, self.full_perplexity)

    @property
    def front(self) -> list[dict[str, Any]]:
        return self.result.front

    def to_dict(self) -> dict[str, Any]:
        """search.json: what the report and later tools read."""
        res = self.result
        d: dict[str, Any] = {
            "front": res.front, "hypervolume": res.hypervolume, "seconds": res.seconds, "plot": str(self.plot),
            "full_perplexity": self.full_perplexity,
            "max_perplexity": None if math.isinf(self.ceiling) else self.ceiling, "study": res.study_name,
            "storage": self.storage, "workers": self.request.workers, "ppl_evaluations": res.ppl_evaluations,
            "trials": len(res.points) + res.repeats, "repeats": res.repeats,
            "bound": self.bound, "judged": self.judged}
        if self.baselines:
            d["baselines"], d["matched"] = self.baselines, self.matched
        if self.verified is not None:
            d["verified"] = self.verified
        return d


def search(request: SearchRequest, ws: Workspace | None = None, progress: Progress | None = None) -> SearchOutcome:
    """The search ``request`` asks for; with ``workers > 1``, that many - 1 more processes
    search the same study alongside. ``ws``: a workspace already open (the main job's)."""
    storage = parse_storage(request.storage, request.out / "study.db")
    if request.workers > 1:
        import torch

        torch.set_num_threads(threads_per_worker(request.workers))
    # the other workers load the model while this process does
    pool = WorkerPool(request, storage.url, request.workers - 1)
    try:
        return _search(request, ws, storage, pool, progress or (lambda done, total, text: None))
    finally:
        pool.join()


def _search(request: SearchRequest, ws: Workspace | None, storage: StudyStorage, pool: WorkerPool,
            progress: Progress) -> SearchOutcome:
    from search.baselines import compare_at_matched_quality
    from search.verify import verification_spec

    ws, deps, base_id = setup(request, ws)
    if request.verify > 0:  # before the search, not after it: refuse now if verification cannot be honest
        for d in deps:
            verification_spec(d.objective, ws.space.full().config_hash())
    request.out.mkdir(parents=True, exist_ok=True)
    quality = shared_quality(storage, ws)
    full_ppl = quality(ws.space.full())
    ceiling = parse_ceiling(request.max_perplexity, full_ppl)
    res = _study(request, ws, deps, storage, pool, ceiling, progress)
    res.ppl_evaluations += quality.evaluations
    outcome = SearchOutcome(request, res, base_id, deps[0].objective.device_name, full_ppl, ceiling,
                            deps[0].objective.bound(), storage.described, judged=judged(ws))
    if not request.no_baselines:
        progress(request.evals, request.evals, "baselines")
        outcome.baselines = _baselines(deps, ws, quality, storage, request.latency_budget_ms)
        outcome.matched = compare_at_matched_quality(res.front, outcome.baselines, request.latency_budget_ms)
    if request.verify > 0 and res.front:
        outcome.verified = _verify(request, deps, res.front, outcome.shown)
    write_files(outcome)
    return outcome


def judged(ws: Workspace) -> dict[str, Any]:
    """What a search's perplexities are of: the weights, their precision, the refit."""
    return {"weights": ws.base.weights_id, "precision": ws.precision, "reconstructed": ws.reconstruct,
            "quality_id": ws.quality_id()}


def _study(request: SearchRequest, ws: Workspace, deps: list[Deployment], storage: StudyStorage,
           pool: WorkerPool, ceiling: float, progress: Progress) -> SearchResult:
    """The study itself, this process's share and, with workers, the study as all left it."""
    import optuna

    from search.baselines import baseline_configs

    def on_trial(done: int, total: int, best: dict[str, Any] | None) -> None:
        progress(done, total, f"{request.algorithm}: best feasible " + (
            f"ppl {best['perplexity']:.1f} at {best['latency_ms']:.1f} ms" if best else "none yet"))

    warm = [] if request.algorithm == "random" else [c for cs in baseline_configs(ws).values() for c in cs]
    if request.workers > 1:
        progress(0, request.evals, f"waiting for {request.workers - 1} other worker(s) to load")
        pool.wait_ready()
    res = run_search(ws, deps[0].objective, request.algorithm, request.evals, request.latency_budget_ms, storage,
                     max_params=request.params_limit, seed=request.seed, granularity=request.granularity,
                     progress=on_trial, warm_start=warm, max_perplexity=ceiling, deployments=deps,
                     study_name=request.study_name)
    if request.workers > 1:
        progress(request.evals, request.evals, f"waiting for {request.workers - 1} other worker(s) to finish")
        others = pool.join()
        done = collect(optuna.load_study(study_name=res.study_name, storage=storage.optuna()), ws.precision,
                       len(deps) > 1, 1e5, request.latency_budget_ms)
        res.points, res.front, res.hypervolume, res.repeats = done.points, done.front, done.hypervolume, done.repeats
        res.ppl_evaluations += sum(o["evaluations"] for o in others)
    return res


def _baselines(deps: list[Deployment], ws: Workspace, quality: Any, storage: StudyStorage,
               budget_ms: float) -> dict[str, list[dict[str, Any]]]:
    """Each hand-made baseline at each precision, judged like the searched points (over the
    budget, only the full model)."""
    from search.baselines import evaluate_baselines

    out: dict[str, list[dict[str, Any]]] = {}
    for d in deps:
        q = quality if d.ws is ws else shared_quality(storage, d.ws)
        for name, pts in evaluate_baselines(d.ws, d.objective, q, budget_ms).items():
            out[name if len(deps) == 1 else f"{name} @ {d.precision}"] = [p | {"precision": d.precision} for p in pts]
    return out


def _verify(request: SearchRequest, deps: list[Deployment], front: list[dict[str, Any]],
            shown: float) -> list[dict[str, Any]]:
    """Up to ``request.verify`` useful front points measured on the device, each precision
    measured as its predictor's data was."""
    from search.verify import pick_useful, verify

    chosen = pick_useful(front, request.verify, shown)
    rows: list[dict[str, Any]] = []
    for d in deps:
        mine = [p for p in chosen if p.get("precision", d.precision) == d.precision]
        if mine:
            rows += verify(d.ws, d.objective, mine, request.verify_host, request.db, request.latency_budget_ms)
    return rows


def write_files(outcome: SearchOutcome) -> None:
    """front.json/.csv/.jsonl, the plot and search.json in the request's ``out``."""
    from search.pareto import plot_front

    out, res, wl = outcome.request.out, outcome.result, outcome.workload
    (out / "front.json").write_text(json.dumps(res.front, indent=1))
    with (out / "front.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["config_hash", "summary", "perplexity", "latency_ms", "upper_ms", "params"])
        for p in res.front:
            w.writerow([p["config_hash"], p["summary"], p["perplexity"], p["latency_ms"], p["upper_ms"], p["params"]])
    with (out / "front.jsonl").open("w") as f:
        for p in res.front:
            f.write(json.dumps(p["config"], sort_keys=True, separators=(",", ":")) + "\n")
    outcome.plot = plot_front(res.points, res.front, outcome.baselines, outcome.request.latency_budget_ms,
                              out / "front.png", f"{outcome.base_id} on {outcome.device_name}, workload "
                              f"S={wl.prompt_len} N={wl.gen_tokens}, {outcome.request.algorithm}",
                              ppl_cap=outcome.shown, full_ppl=outcome.full_perplexity)
    (out / "search.json").write_text(json.dumps(outcome.to_dict(), indent=1, default=str))
