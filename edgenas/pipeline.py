"""The main job, end to end on one base model: sample sub-networks, profile them on a device
(this machine's CPU by default), evaluate their quality, train the device's latency
predictors, optionally train the model as a super-network, search for the Pareto front under
a latency budget, and verify the chosen points on the device.

``PipelineRequest`` is what it is asked (validated before anything runs); each stage is the
same typed request and library function its own command runs: ``SweepRequest`` ->
``profiler.request.profile``, ``PredictorRequest`` -> ``predictor.fitting.train_predictors``,
``SupernetRequest`` -> ``training.request.run_supernet``, ``SearchRequest`` ->
``search.run.search``."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from predictor.fitting import PhaseReport, PredictorRequest
from predictor.workload import Workload
from profiler.request import SweepRequest
from profiler.sweep import SweepSummary
from search.request import SearchRequest, parse_ceiling
from search.run import SearchOutcome
from subnets.config import SubnetConfig
from subnets.cost import cost
from subnets.errors import ConfigError
from subnets.space import DEFAULT_GRANULARITY
from subnets.workspace import Workspace

PRECISIONS = ("fp32", "fp16", "int8", "int4")


@dataclass(frozen=True)
class PipelineRequest:
    """The main job's settings; field names are ``edgenas pipeline``'s flags."""

    model: str = "smollm2"
    neuron_step: int = 64
    reconstruct: bool = False
    n: int = 24
    seed: int = 0
    granularity: str = DEFAULT_GRANULARITY
    out: Path = Path("runs/pipeline")
    host: str = "local"
    threads: int = 1
    workload: str = "128,64"
    budget_share: float = 0.85
    evals: int = 40
    verify: int = 3
    precision: str = "fp32"
    max_perplexity: str | None = "3x"
    quality_tokens: int = 1024
    min_time: float = 1.0
    text: str | None = None
    train_steps: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "out", Path(self.out))
        Workload.parse(self.workload)
        parse_ceiling(self.max_perplexity, 1.0)
        if not 0 < self.budget_share <= 1:
            raise ConfigError(f"--budget-share {self.budget_share} is not a share of the full model's latency",
                              "pass a number in (0, 1], e.g. --budget-share 0.85")
        if self.n < 12:
            raise ConfigError(f"--samples {self.n} is too few: the predictors are cross-validated by sub-network and "
                              "need 13 or more (the full model and the samples)", "pass --samples 12 or more (default 24)")
        for flag, value, least in (("--evals", self.evals, 1), ("--verify", self.verify, 0),
                                   ("--threads", self.threads, 1), ("--quality-tokens", self.quality_tokens, 1),
                                   ("--train-steps", self.train_steps, 0)):
            if value < least:
                raise ConfigError(f"{flag} {value} is below {least}", f"pass {flag} {least} or more")
        if not self.min_time > 0:
            raise ConfigError(f"--min-time {self.min_time} is not positive", "pass --min-time 1 (seconds per cell)")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"--precision {self.precision!r} is not an onnxruntime precision",
                              f"use one of {', '.join(PRECISIONS)}")

    @property
    def db(self) -> Path:
        return self.out / "measurements.db"

    @property
    def predictors(self) -> Path:
        return self.out / "predictors" / self.host

    def past_lens(self) -> tuple[int, ...]:
        wl = Workload.parse(self.workload)
        return tuple(int(p) for p in wl.decode_points()) or (wl.prompt_len,)

    def sweep(self) -> SweepRequest:
        """Prefill at the workload's prompt length, decode steps at the past lengths the
        search's latency objective samples; the reference every 10 jobs."""
        return SweepRequest(host=self.host, model=self.model, neuron_step=self.neuron_step,
                            seq_len=(Workload.parse(self.workload).prompt_len,), past_len=self.past_lens(),
                            threads=self.threads, precision=None if self.precision == "fp32" else self.precision,
                            reference_every=10, min_time=self.min_time, max_time=max(20.0, 4 * self.min_time),
                            decode_min_time=3 * self.min_time, decode_sessions=3, db=self.db)

    def predictor_training(self) -> PredictorRequest:
        return PredictorRequest(device=self.host, db=self.db, out=self.predictors, model=self.model)

    def search(self, budget_ms: float) -> SearchRequest:
        return SearchRequest(device=self.host, predictor=(self.predictors,), latency_budget_ms=budget_ms,
                             workload=self.workload, evals=self.evals, granularity=self.granularity,
                             reconstruct=self.reconstruct, max_perplexity=self.max_perplexity, verify=self.verify,
                             host=self.host, db=self.db, out=self.out / "search", model=self.model,
                             neuron_step=self.neuron_step, seed=self.seed, quality_tokens=self.quality_tokens,
                             text=self.text, precision=self.precision)


@dataclass
class PipelineResult:
    rows: list[dict[str, Any]]
    sweep: SweepSummary
    predictors: dict[str, PhaseReport]
    search: SearchOutcome
    budget_ms: float
    report: Path | None = None


def _fmt_ppl(p: float) -> str:
    return f"{p:.1f}" if p < 1e5 else f"{p:.2e}"


def open_workspace(request: PipelineRequest) -> Workspace:
    """The base model, judged at the request's precision (a view: one loaded model)."""
    from export.quantize import at_precision

    ws = Workspace.open(request.model, neuron_step=request.neuron_step, eval_text=request.text,
                        eval_budget=request.quality_tokens, reconstruct=request.reconstruct)
    return at_precision(ws, request.precision)


def profile_and_judge(request: PipelineRequest, ws: Workspace, configs: list[SubnetConfig],
                      console: Console) -> tuple[SweepSummary, dict[tuple[Any, ...], Any], dict[str, float]]:
    """Stages 1 and 2: every config measured on the device, and its perplexity."""
    from edgenas.clikit import progress_bar
    from edgenas.commands.profile import sweep
    from profiler.store import Store

    fleet = sweep(request.sweep(), ws, configs)
    summary = fleet.boards[0]
    store = Store(request.db)
    try:
        latency = {(r["subnet_hash"], r["phase"], r["seq_len"], r["past_len"]): r
                   for r in store.measurement_rows(device=summary.fingerprint)}
    finally:
        store.close()
    with progress_bar() as prog:
        task = prog.add_task("perplexity", total=len(configs))
        ppl = {}
        for c in configs:
            ppl[c.config_hash()] = ws.perplexity(c)
            prog.advance(task)
    return summary, latency, ppl


def subnet_rows(request: PipelineRequest, ws: Workspace, configs: list[SubnetConfig],
                latency: dict[tuple[Any, ...], Any], ppl: dict[str, float]) -> list[dict[str, Any]]:
    """One row per profiled sub-network (subnets.json), fastest first."""
    wl, past = Workload.parse(request.workload), request.past_lens()
    rows = []
    for c in configs:
        h = c.config_hash()
        pre, dec = latency.get((h, "prefill", wl.prompt_len, 0)), latency.get((h, "decode", 1, past[0]))
        flags = sorted({f for r in (pre, dec) if r
                        for f, on in (("unstable", r["unstable"]), ("throttled", r["throttled"])) if on})
        rows.append({"config_hash": h, "summary": c.summary(), "params": cost(c, ws.space.dims, "prefill").params,
                     "prefill_gflops": cost(c, ws.space.dims, "prefill", wl.prompt_len).flops / 1e9,
                     "perplexity": ppl[h], "prefill_ms": pre["median_ms"] if pre else None,
                     "decode_ms": dec["median_ms"] if dec else None, "flags": flags, "config": c.to_dict()})
    rows.sort(key=lambda r: r["prefill_ms"] or 0)
    return rows


def subnet_table(request: PipelineRequest, ws: Workspace, rows: list[dict[str, Any]]) -> Table:
    wl, past = Workload.parse(request.workload), request.past_lens()
    t = Table(title=f"{ws.base.base_id} on {request.host} ({request.threads} thread"
                    f"{'s' if request.threads > 1 else ''}), perplexity on {ws.eval_tokens().num_tokens} held-out tokens")
    for col in ("sub-network", "params (M)", f"GFLOPs S={wl.prompt_len}", "perplexity", f"prefill ms S={wl.prompt_len}",
                f"decode ms P={past[0]}", "flags"):
        t.add_column(col, justify="left" if col in ("sub-network", "flags") else "right")
    for r in rows:
        t.add_row(r["summary"], f"{r['params'] / 1e6:.1f}", f"{r['prefill_gflops']:.2f}", _fmt_ppl(r["perplexity"]),
                  "-" if r["prefill_ms"] is None else f"{r['prefill_ms']:.1f}",
                  "-" if r["decode_ms"] is None else f"{r['decode_ms']:.2f}", ",".join(r["flags"]))
    return t


def train_stage(request: PipelineRequest, ws: Workspace, objective: Any, console: Console) -> Workspace:
    """Recovery training before the search: the sandwich rule over sub-networks from 15
    points below the budget up to the full model, by the device's predicted latency. Returns
    the trained weights' workspace, judged as ``ws`` judges (precision, reconstruction, text)."""
    from edgenas.commands.training import StepProgress
    from training.recovery import open_supernet
    from training.request import SupernetRequest, run_supernet
    from training.settings import TrainSettings

    steps = request.train_steps
    lo = max(0.05, request.budget_share - 0.15)
    settings = TrainSettings(steps=steps, warmup_steps=max(1, steps // 20), latency_range=(lo, 1.0),
                             checkpoint_every=max(1, min(50, steps)), seed=request.seed).validate()
    train = SupernetRequest(settings, request.out / "supernet", model=request.model, workload=request.workload,
                            neuron_step=request.neuron_step)
    with StepProgress(settings.steps, "train-supernet (sandwich)") as bar:
        res = run_supernet(train, on_step=bar, objective=objective)
    console.print(f"super-network: {res.steps_done} steps in {res.seconds:.0f} s ({res.tokens_per_s:.0f} tokens/s), "
                  f"sub-networks within {lo:.0%}-100% of the full model's latency; weights in {train.out}")
    trained = open_supernet(train.out, request.neuron_step, ws.eval_text, ws.eval_budget, base_id=ws.base.base_id)
    return trained.reconstructing(ws.reconstruct).at_precision(ws.arithmetic)


def search_stage(request: PipelineRequest, ws: Workspace, console: Console) -> tuple[SearchOutcome, float]:
    """Stage 4: the budget (a share of the full model's predicted workload latency), the
    optional recovery training, the search, and verification on the device."""
    from edgenas.commands.search import run_with_progress
    from predictor.features import ConfigBatch
    from predictor.workload import LatencyObjective

    objective = LatencyObjective.load(request.predictors, Workload.parse(request.workload), request.host,
                                      ws.base.base_id)
    full_ms = float(objective.predict(ConfigBatch.from_configs([ws.space.full()], ws.space.dims.num_layers))[0])
    budget = round(request.budget_share * full_ms, 1)
    if request.train_steps > 0:
        ws = train_stage(request, ws, objective, console)
    console.print(f"search: full model predicted {full_ms:.0f} ms for workload {request.workload}; budget "
                  f"{request.budget_share:.0%} of it = {budget} ms")
    return run_with_progress(request.search(budget), ws, console), budget


def run_pipeline(request: PipelineRequest, console: Console) -> PipelineResult:
    from edgenas.commands.predictor import render_training
    from edgenas.report import write_report
    from predictor.fitting import train_predictors

    ws = open_workspace(request)
    configs = [ws.space.full(), *ws.space.sample(request.n, request.seed, granularity=request.granularity,
                                                   strategy="stratified", layer_ranking=ws.importance.layer_ranking())]
    request.out.mkdir(parents=True, exist_ok=True)
    summary, latency, ppl = profile_and_judge(request, ws, configs, console)
    rows = subnet_rows(request, ws, configs, latency, ppl)
    console.print(subnet_table(request, ws, rows))
    console.print(f"profiled {summary.measured} cells now ({summary.already_done} already in {request.db}), "
                  f"{len(summary.failed)} failed; {summary.seconds['total']:.0f} s, "
                  f"{summary.subnets_per_hour:.0f} sub-networks/hour")
    (request.out / "subnets.json").write_text(json.dumps(rows, indent=1))
    console.print(f"results: {request.out / 'subnets.json'}, measurements: {request.db}")
    predictors = train_predictors(request.predictor_training())
    render_training(predictors, console)
    outcome, budget = search_stage(request, ws, console)
    result = PipelineResult(rows, summary, predictors, outcome, budget, write_report(request.out))
    console.print(f"report: {result.report}")
    return result
