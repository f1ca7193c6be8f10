"""The Python API: what a notebook needs, without the command line.

    import edgenas

    ws = edgenas.open_model("smollm2")                       # base model, importance, search space
    configs = edgenas.sample(ws, 20, seed=0)                 # tapered sub-networks, stratified by size
    summary = edgenas.profile(ws, "local", configs, "runs/m.db", seq_lens=(128,), past_lens=(128, 160, 191))
    df = edgenas.measurements("runs/m.db")                   # a pandas DataFrame, one row per cell
    edgenas.train_predictors("runs/m.db", "local", "runs/pred", model="smollm2")
    objective = edgenas.latency_objective("runs/pred", "local", workload=(128, 64))
    result = edgenas.search(ws, objective, budget_ms=900, evals=40, out="runs/search")

Every function is a thin, documented entry to the same code the commands run; ``run(request)``
takes any stage's typed request (``SweepRequest``, ``PredictorRequest``, ``SearchRequest``,
``SupernetRequest``, ``FinetuneRequest``, ``ExportRequest``, ``PipelineRequest``) and runs it
exactly as its command does. The objects it returns (``Workspace``, ``SubnetConfig``, ``SweepSummary``, ``LatencyObjective``,
``SearchResult``) are the library's own dataclasses."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from profiler.database import store_location


def open_model(model: str = "smollm2", neuron_step: int = 64, eval_text: str | None = None,
               eval_tokens: int = 1024) -> Any:
    """A ``Workspace``: the base model (``"smollm2"``, a local HF Llama-family folder or a
    .gguf file), its importance ranking and its search space; perplexity is measured on
    ``eval_tokens`` held-out tokens of ``eval_text`` (default: stdlib docstrings)."""
    from subnets.workspace import Workspace

    return Workspace.open(model, neuron_step=neuron_step, eval_text=eval_text, eval_budget=eval_tokens)


def sample(ws: Any, n: int, seed: int = 0, granularity: str = "tapered", strategy: str = "stratified") -> list[Any]:
    """``n`` distinct ``SubnetConfig`` (kept layers: the most influential), reproducible from ``seed``."""
    return ws.space.sample(n, seed, granularity=granularity, strategy=strategy,
                           layer_ranking=ws.importance.layer_ranking())


def export(ws: Any, config: Any, out: str | Path, weights: str = "real", opset: int = 17) -> Any:
    """Extract ``config`` and write its ONNX prefill and decode graphs under ``out``; returns
    the ``ExportedSubnet`` (paths, sha256s). ``weights="none"`` writes graphs only."""
    from export.onnx_graphs import ExportOptions, export_subnet

    return export_subnet(ws.weights(ws.space.validate(config)), Path(out), ExportOptions(opset=opset, weights=weights))


def profile(ws: Any, host: str, configs: Sequence[Any], db: str | Path, **spec: Any) -> Any:
    """Measure ``configs`` on ``host`` (``"local"``, an ssh alias, an inventory entry, a
    comma-separated list of them or an inventory group) into the store ``db`` (a file, or a
    ``postgresql://`` URL that sweeps on several hosts share); ``spec``
    takes ``profiler.sweep.SweepSpec`` fields (phases, seq_lens, past_lens, threads, backend,
    timing, paired, ...). Resumes: cells already measured under the same protocol are kept.
    Returns the ``FleetSummary`` (``.boards``: each board's ``SweepSummary``)."""
    from profiler.request import SweepRequest
    from profiler.request import profile as sweep
    from profiler.sweep import SweepSpec

    request = SweepRequest(host, model=str(ws.base.path), db=store_location(db), sweep_spec=SweepSpec(**spec))
    return sweep(request, ws, list(configs))


def run(request: Any, console: Any = None) -> Any:
    """Run one stage's typed request as its command does, without the command line:
    ``SweepRequest`` (-> ``FleetSummary``), ``PredictorRequest`` (-> a ``PhaseReport`` per
    phase), ``SearchRequest`` (-> ``SearchOutcome``), ``SupernetRequest`` / ``FinetuneRequest``
    (-> ``TrainResult``), ``ExportRequest`` (-> the summary dict), ``PipelineRequest`` (->
    ``PipelineResult``; it prints its tables to ``console``)."""
    from export.request import ExportRequest, write_export
    from predictor.fitting import PredictorRequest, train_predictors
    from profiler.request import SweepRequest
    from profiler.request import profile as sweep
    from search.request import SearchRequest
    from search.run import search as run_search
    from training.recovery import open_workspace
    from training.request import FinetuneRequest, SupernetRequest, run_finetune, run_supernet

    if isinstance(request, SweepRequest):
        return sweep(request)
    if isinstance(request, PredictorRequest):
        return train_predictors(request)
    if isinstance(request, SearchRequest):
        return run_search(request)
    if isinstance(request, SupernetRequest):
        return run_supernet(request)
    if isinstance(request, FinetuneRequest):
        return run_finetune(request)[0]
    if isinstance(request, ExportRequest):
        return write_export(request, open_workspace(request.model, request.neuron_step, request.text,
                                                    reconstruct=request.reconstruct, supernet=request.supernet))
    from edgenas.pipeline import PipelineRequest, run_pipeline

    if isinstance(request, PipelineRequest):
        from rich.console import Console

        return run_pipeline(request, console or Console())
    raise TypeError(f"{type(request).__name__} is not a stage request of edgenas")


def measurements(db: str | Path, device: str | None = None, phase: str | None = None) -> Any:
    """Every measurement in the store as a pandas DataFrame (the columns of
    ``edgenas measurements --csv``, plus the cell's protocol digest)."""
    import pandas as pd

    from profiler.store import EXPORT_COLUMNS, Store

    store = Store(store_location(db))
    try:
        rows = list(store.measurement_rows(device=device, phase=phase))
    finally:
        store.close()
    return pd.DataFrame([{k: r.get(k) for k in EXPORT_COLUMNS} for r in rows], columns=EXPORT_COLUMNS)


def train_predictors(db: str | Path, device: str, out: str | Path, model: str = "smollm2",
                     phases: Sequence[str] = ("prefill", "decode"), quiet: bool = True) -> dict[str, Any]:
    """Train, cross-validate (beside the baselines) and save the device's per-phase predictors
    under ``out/<phase>``; returns the held-out metrics per phase."""
    from predictor.fitting import PredictorRequest
    from predictor.fitting import train_predictors as fit

    reports = fit(PredictorRequest(device, store_location(db), tuple(phases), Path(out), model, no_plot=quiet))
    if not quiet:
        from edgenas.commands.predictor import render_training

        render_training(reports)
    return {phase: r.comparison for phase, r in reports.items()}


def latency_objective(predictors: str | Path, device: str, workload: tuple[int, int] = (128, 64),
                      base_id: str | None = None) -> Any:
    """The ``LatencyObjective`` of a workload (a prompt of S tokens, then N generated) on a
    device, from the folder ``train_predictors`` wrote: ``predict_both(batch)`` gives the
    predicted workload latency and its upper bound."""
    from predictor.workload import LatencyObjective, Workload

    return LatencyObjective.load(Path(predictors), Workload(*workload), device, base_id)


def predicted_latency(objective: Any, configs: Sequence[Any]) -> tuple[Any, Any]:
    """(predicted, upper bound) workload latency in ms of each config, as numpy arrays."""
    from predictor.features import ConfigBatch

    return objective.predict_both(ConfigBatch.from_configs(list(configs), objective.prefill.dims.num_layers))


def search(ws: Any, objective: Any, budget_ms: float, evals: int = 40, out: str | Path = "runs/search",
           algorithm: str = "nsga2", granularity: str = "tapered", seed: int = 0,
           max_params: float | None = None, storage: str | None = None, study_name: str | None = None) -> Any:
    """The Pareto front of perplexity against predicted workload latency under ``budget_ms``
    (on the predicted upper bound); the study in ``out/study.db`` (or ``storage``, any Optuna
    storage URL or ``journal:PATH``, shared with other workers of ``study_name``) resumes when
    asked the same question again. Returns the ``SearchResult``."""
    import math

    from search.storage import parse_storage
    from search.study import run_search

    return run_search(ws, objective, algorithm, evals, budget_ms, parse_storage(storage, Path(out) / "study.db"),
                      seed=seed, granularity=granularity, max_params=max_params if max_params else math.inf,
                      study_name=study_name)
