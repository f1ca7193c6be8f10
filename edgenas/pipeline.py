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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from export.quantize import GGUF_PRESETS, LLAMA_CPP_PRECISIONS
from predictor.fitting import PhaseReport, PredictorRequest
from predictor.workload import Workload
from profiler.request import SweepRequest
from profiler.rounds import RoundsPlan
from profiler.sweep import SweepSummary
from search.recommendation import Recommendation
from search.request import SearchRequest, check_precisions, parse_ceiling
from search.run import SearchOutcome
from subnets.config import SubnetConfig
from subnets.cost import cost
from subnets.errors import ConfigError
from subnets.space import DEFAULT_GRANULARITY
from subnets.workspace import Workspace

ONNX_DEPLOYMENTS = ("fp32", "int8", "int4")
LLAMA_CPP_DEPLOYMENTS = ("q8_0", "q4_0")


@dataclass(frozen=True)
class PipelineRequest:
    """The main job's settings; field names are ``edgenas pipeline``'s flags."""

    model: str = "smollm2"
    neuron_step: int = 64
    reconstruct: bool = True
    n: int = 12
    transfer_samples: int = 5
    seed: int = 0
    granularity: str = DEFAULT_GRANULARITY
    out: Path = Path("runs/pipeline")
    host: str = "local"
    threads: int = 1
    workload: str = "128,64"
    budget_share: float | None = None
    evals: int = 40
    verify: int = 3
    precision: str = "auto"
    max_perplexity: str | None = "3x"
    quality_tokens: int = 1024
    min_time: float = 1.0
    # profiling cells interleaved in this many rounds or more (0: each timed to completion):
    # on a busy machine a cell's level from many short rounds repeats (benchmarks/load_robustness.py)
    rounds: int = 6
    text: str | None = None
    train_steps: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "out", Path(self.out))
        Workload.parse(self.workload)
        parse_ceiling(self.max_perplexity, 1.0)
        if self.budget_share is not None and not 0 < self.budget_share <= 1:
            raise ConfigError(f"--budget-share {self.budget_share} is not a share of the full model's latency",
                              "pass a number in (0, 1], e.g. --budget-share 0.5")
        if self.n < 12:
            raise ConfigError(f"--samples {self.n} is too few: the predictors are cross-validated by sub-network and "
                              "need 13 or more (the full model and the samples)", "pass --samples 12 or more (default 12)")
        for flag, value, least in (("--evals", self.evals, 1), ("--verify", self.verify, 0),
                                   ("--threads", self.threads, 1), ("--quality-tokens", self.quality_tokens, 1),
                                   ("--train-steps", self.train_steps, 0), ("--transfer-samples", self.transfer_samples, 3)):
            if value < least:
                raise ConfigError(f"{flag} {value} is below {least}", f"pass {flag} {least} or more")
        if not self.min_time > 0:
            raise ConfigError(f"--min-time {self.min_time} is not positive", "pass --min-time 1 (seconds per cell)")
        if self.precision != "auto":
            check_precisions(self.precision)
        if self.rounds:  # a bad range fails here, before the model loads
            RoundsPlan(min_rounds=self.rounds, max_rounds=max(8, self.rounds))

    @property
    def db(self) -> Path:
        return self.out / "measurements.db"

    def precisions(self) -> tuple[str, ...]:
        """The deployments searched: ``auto`` is onnxruntime fp32, int8 and int4, and llama.cpp
        Q8_0 and Q4_0 where this machine (``--host local``) has llama.cpp's tools."""
        if self.precision != "auto":
            return check_precisions(self.precision)
        from export.llama_cpp_tools import local_llama_cpp

        gguf = LLAMA_CPP_DEPLOYMENTS if self.host == "local" and local_llama_cpp() else ()
        return (*ONNX_DEPLOYMENTS, *gguf)

    def predictors(self, precision: str = "fp32") -> Path:
        """The predictor folder of one deployment precision (fp32: the architecture sweep's)."""
        root = self.out / "predictors"
        return root / self.host if precision == "fp32" else root / f"{self.host}-{precision}"

    def past_lens(self) -> tuple[int, ...]:
        wl = Workload.parse(self.workload)
        return tuple(int(p) for p in wl.decode_points()) or (wl.prompt_len,)

    def sweep(self, precision: str = "fp32") -> SweepRequest:
        """fp32: prefill at the workload's prompt length, decode steps at the past lengths the
        search's latency objective samples. Another precision: its predictor is the fp32
        one's terms rescaled, so one decode length (the middle one) is enough."""
        past = self.past_lens()
        return SweepRequest(host=self.host, model=self.model, neuron_step=self.neuron_step,
                            seq_len=(Workload.parse(self.workload).prompt_len,),
                            past_len=past if precision == "fp32" else (past[len(past) // 2],),
                            threads=self.threads, backend="llama.cpp" if precision in LLAMA_CPP_PRECISIONS else None,
                            weights="real" if precision in GGUF_PRESETS else "none",
                            precision=None if precision == "fp32" else precision,
                            reference_every=10, min_time=self.min_time, max_time=max(20.0, 4 * self.min_time),
                            decode_min_time=3 * self.min_time, decode_sessions=3, db=self.db,
                            repeat_min=3 if precision == "fp32" else 2, rounds=self.rounds,
                            max_rounds=max(8, self.rounds), round_quantile=0.25 if self.rounds else 0.5)

    def predictor_training(self, precision: str = "fp32") -> PredictorRequest:
        """fp32: trained on the architecture sweep; another precision: transferred from it."""
        from profiler.hosts import resolve_host

        tag = self.sweep(precision).spec(resolve_host(self.host)).backend_tag
        if precision == "fp32":
            return PredictorRequest(device=self.host, db=self.db, out=self.predictors(), model=self.model, backend=tag)
        return PredictorRequest(device=self.host, db=self.db, out=self.predictors(precision), model=self.model,
                                backend=tag, transfer_from=self.predictors(), include_unstable=True)

    def search(self, budget_ms: float) -> SearchRequest:
        precisions = self.precisions()
        return SearchRequest(device=self.host, predictor=tuple(self.predictors(p) for p in precisions),
                             latency_budget_ms=budget_ms, workload=self.workload, evals=self.evals,
                             granularity=self.granularity, reconstruct=self.reconstruct,
                             max_perplexity=self.max_perplexity, verify=0, host=self.host, db=self.db,
                             out=self.out / "search", model=self.model, neuron_step=self.neuron_step, seed=self.seed,
                             quality_tokens=self.quality_tokens, text=self.text, precision=",".join(precisions))


@dataclass
class PipelineResult:
    rows: list[dict[str, Any]]
    sweep: SweepSummary
    predictors: dict[str, PhaseReport]
    search: SearchOutcome
    budget_ms: float
    recommendation: Recommendation
    report: Path | None = None
    # each other precision's transferred predictors
    transferred: dict[str, dict[str, PhaseReport]] = field(default_factory=dict)


def _fmt_ppl(p: float) -> str:
    return f"{p:.1f}" if p < 1e5 else f"{p:.2e}"


def open_workspace(request: PipelineRequest) -> Workspace:
    """The base model (refitted unless --no-reconstruct); the search views it at each precision."""
    return Workspace.open(request.model, neuron_step=request.neuron_step, eval_text=request.text,
                          eval_budget=request.quality_tokens, reconstruct=request.reconstruct)


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


def architecture_predictors(request: PipelineRequest, console: Console) -> dict[str, PhaseReport]:
    """The fp32 predictors on the stable cells; on a machine so busy that too few are stable,
    on every cell (an unstable cell's interval missed the target, its median still counts)."""
    from dataclasses import replace

    from predictor.errors import DataError
    from predictor.fitting import train_predictors

    try:
        return train_predictors(request.predictor_training())
    except DataError as e:
        console.print(f"[yellow]{e.problem}[/]: training on the unstable cells too (a quieter machine measures better)")
        return train_predictors(replace(request.predictor_training(), include_unstable=True))


def transfer_configs(ws: Workspace, configs: list[SubnetConfig], k: int) -> list[SubnetConfig]:
    """What another precision is measured on to rescale the fp32 predictor's terms: the full
    model, the shapes recommendations are most often made of (uniform width at three and two
    quarters of the neurons, a quarter of the layers dropped), then samples spread over size."""
    from search.baselines import baseline_configs
    from subnets.cost import count_params

    shapes = baseline_configs(ws, width_points=4, depth_points=4)
    chosen = [configs[0], *shapes["uniform width"][1:3], shapes["layer dropping"][1]][:k]
    rest = sorted((c for c in configs[1:] if c not in chosen), key=lambda c: count_params(c, ws.space.dims))
    more = k - len(chosen)
    if more > 0 and rest:
        idx = sorted({round((i + 0.5) * len(rest) / more - 0.5) for i in range(more)})
        chosen += [rest[min(i, len(rest) - 1)] for i in idx]
    return chosen


def precision_stage(request: PipelineRequest, ws: Workspace, configs: list[SubnetConfig],
                    console: Console) -> dict[str, dict[str, PhaseReport]]:
    """Each other deployment precision measured on a few sub-networks, and its predictors
    transferred from the fp32 ones (their terms rescaled to these measurements)."""
    from edgenas.commands.profile import sweep
    from predictor.fitting import train_predictors

    chosen = transfer_configs(ws, configs, request.transfer_samples)
    out = {}
    for precision in request.precisions():
        if precision == "fp32":
            continue
        summary = sweep(request.sweep(precision), ws, chosen).boards[0]
        out[precision] = train_predictors(request.predictor_training(precision))
        within = ", ".join(f"{ph} {r.comparison['edgenas predictor']['within_5pct']:.0%}" for ph, r in out[precision].items())
        console.print(f"{precision}: {len(chosen)} sub-networks profiled ({summary.seconds['total']:.0f} s); predictors "
                      f"transferred from fp32, held-out within ±5%: {within}")
    return out


def budget_stage(request: PipelineRequest, ws: Workspace, console: Console) -> float:
    """The latency budget: ``--budget-share`` of the full fp32 model's predicted workload
    latency; by default halfway between the bounds of the two fastest full-model deployments,
    where the faster precision alone fits and the slower one needs a cut or a precision mix."""
    from predictor.features import ConfigBatch
    from predictor.workload import LatencyObjective

    wl, full = Workload.parse(request.workload), ConfigBatch.from_configs([ws.space.full()], ws.space.dims.num_layers)
    predicted, bound = {}, {}
    for p in dict.fromkeys(("fp32", *request.precisions())):
        objective = LatencyObjective.load(request.predictors(p), wl, request.host, ws.base.base_id)
        (predicted[p],), (bound[p],) = (v.astype(float) for v in objective.predict_both(full))
    fastest = sorted(request.precisions(), key=bound.__getitem__)
    if request.budget_share is not None:
        budget, rule = request.budget_share * predicted["fp32"], f"{request.budget_share:.0%} of the full fp32 model's"
    elif len(fastest) > 1:
        budget, rule = (bound[fastest[0]] + bound[fastest[1]]) / 2, f"halfway between full {fastest[0]} and {fastest[1]}"
    else:
        budget, rule = 0.85 * bound[fastest[0]], f"85% of the full {fastest[0]} model's bound"
    console.print(f"full model, predicted (bound) for workload {request.workload}: "
                  + ", ".join(f"{p} {predicted[p]:.0f} ({bound[p]:.0f}) ms" for p in bound)
                  + f"; budget {rule} = {budget:.1f} ms")
    return round(float(budget), 1)


def search_stage(request: PipelineRequest, ws: Workspace, budget: float,
                 console: Console) -> tuple[SearchOutcome, Workspace]:
    """Stage 4: the optional recovery training, then the search over architecture x
    precision under the budget; returns the outcome and the weights it judged."""
    from edgenas.commands.search import run_with_progress
    from predictor.workload import LatencyObjective

    if request.train_steps > 0:
        objective = LatencyObjective.load(request.predictors(), Workload.parse(request.workload), request.host,
                                          ws.base.base_id)
        ws = train_stage(request, ws, objective, console)
    return run_with_progress(request.search(budget), ws, console), ws


def recommend_stage(request: PipelineRequest, ws: Workspace, outcome: SearchOutcome,
                    console: Console | None = None) -> Recommendation:
    """Stage 5: the deployment to ship among the searched, the obvious and the full model's
    precision mixes, and the obvious alternatives, measured on the device."""
    from search.deployments import setup
    from search.mix_deployments import mix_choices
    from search.preset_deployments import preset_choices
    from search.recommendation import candidates, recommend
    from search.verify import measure_on_device

    _, deps, _ = setup(outcome.request, ws)
    by_precision = {d.precision: d for d in deps}
    budget = outcome.request.latency_budget_ms
    pool = candidates(outcome.front, outcome.baselines, ws.space.dims, deps[0].precision)
    status = (console or Console(quiet=True)).status
    if request.verify:  # the presets are measured, not predicted: only where the device is used
        with status(f"llama.cpp's presets: writing, judging and measuring them on {request.host}"):
            pool += preset_choices(by_precision, request.host, request.db, budget)
    with status("per-layer precision mixes: sensitivities (cached) and each mix's perplexity"):
        pool += mix_choices(deps[0].ws, by_precision, budget, known=pool)
    measure = measure_on_device(by_precision, request.host, request.db, budget) if request.verify else None
    with status(f"the recommendation and its alternatives, measured on {request.host}"):
        return recommend(pool, budget, outcome.ceiling, outcome.full_perplexity, measure,
                         tries=max(1, request.verify))


def run_pipeline(request: PipelineRequest, console: Console) -> PipelineResult:
    from edgenas.commands.predictor import render_training
    from edgenas.recommendation_view import render_recommendation, write_recommendation
    from edgenas.report import write_report

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
    for phase, r in summary.repeatability.items():
        console.print(f"repeatability, {phase}: {r['n']} cells re-measured, spread {r['sd_log_ratio']:.1%}, "
                      f"{r['within_5pct']:.0%} within ±5%")
    (request.out / "subnets.json").write_text(json.dumps(rows, indent=1))
    console.print(f"results: {request.out / 'subnets.json'}, measurements: {request.db}")
    predictors = architecture_predictors(request, console)
    render_training(predictors, console)
    transferred = precision_stage(request, ws, configs, console)
    budget = budget_stage(request, ws, console)
    outcome, judged = search_stage(request, ws, budget, console)
    rec = recommend_stage(request, judged, outcome, console)
    write_recommendation(request, judged, rec)
    render_recommendation(rec, request, console)
    result = PipelineResult(rows, summary, predictors, outcome, budget, rec, write_report(request.out),
                            transferred=transferred)
    console.print(f"report: {result.report}")
    return result
