"""What a search request runs on: the workspace (the base model's weights or a trained
super-network's, refitted or not) and, per requested precision, a view of it judging quality
at that precision beside the predictors of that precision's latency. Every worker of a study
builds them the same way from the same request."""

from __future__ import annotations

from typing import Any

from export.arithmetic import at_precision
from export.quantize import LLAMA_CPP_PRECISIONS
from predictor.workload import LatencyObjective, Workload
from search.request import SearchError, SearchRequest
from search.study import Deployment
from subnets.workspace import Workspace


def predictor_precision(objective: Any) -> str:
    """The weight precision a predictor's measurements were of, from their back-end tag."""
    from profiler.sweep import tag_precision

    tags = {str(rec.get("backend") or "") for rec in objective.measured_as.values()}
    return (tag_precision(sorted(tags)[0] if tags else "") or "fp32").split("-")[0]


def check_precision(objective: Any, precision: str, block_size: int) -> None:
    """The predictors must be of the precision the search deploys at (onnxruntime back-ends:
    the precision is the back-end tag's last part)."""
    from profiler.sweep import SweepSpec, tag_precision

    gguf = precision in LLAMA_CPP_PRECISIONS
    want = precision if gguf else SweepSpec(precision=precision, block_size=block_size).weights_precision
    for phase, rec in objective.measured_as.items():
        tag = str(rec.get("backend") or "")
        if not tag or tag.startswith(("trt", "trtexec")):
            continue
        have = tag_precision(tag)
        if have == want:
            continue
        if tag.startswith("llama.cpp") or gguf:
            fix = (f"search with --precision {have or 'fp32'}, or profile with --backend llama.cpp --precision "
                   f"{precision} and train on those")
        else:
            fix = (f"profile with --precision {precision} and train on those (train-predictor --backend "
                   f"{tag.split(':')[0]}{':' + want if want else ''}), or search with --precision "
                   f"{have.split('-')[0] if have else 'fp32'}")
        raise SearchError(f"the {phase} predictor was trained on {tag} measurements, the search asks for "
                          f"{precision} weights", fix)


def _objectives_by_precision(request: SearchRequest, wl: Workload, base_id: str) -> dict[str, LatencyObjective]:
    objectives = [LatencyObjective.load(f, wl, request.device, base_id, request.override) for f in request.predictor]
    if len(request.precisions) == 1 and len(objectives) == 1:
        return {request.precisions[0]: objectives[0]}
    by_precision = {predictor_precision(o): o for o in objectives}
    missing = [p for p in request.precisions if p not in by_precision]
    if missing:
        raise SearchError(f"no predictor for {', '.join(missing)} among --predictor "
                          f"{' '.join(str(f) for f in request.predictor)} (they are for {', '.join(sorted(by_precision))})",
                          "pass one predictor folder per --precision, each trained on measurements of it")
    return by_precision


def deployments(request: SearchRequest, ws: Workspace, wl: Workload, base_id: str) -> list[Deployment]:
    """One Deployment per requested precision: the workspace judging quality at it, the predictor of it."""
    by_precision = _objectives_by_precision(request, wl, base_id)
    out = []
    for p in request.precisions:
        check_precision(by_precision[p], p, request.block_size)
        out.append(Deployment(p, at_precision(ws, p, request.block_size), by_precision[p]))
    return out


def setup(request: SearchRequest, ws: Workspace | None = None) -> tuple[Workspace, list[Deployment], str]:
    """The workspace (the first deployment's view), the deployments and the base model id a
    search of ``request`` runs on; ``ws``: a workspace already open (kept as it is: its
    weights, reconstruction and held-out text), viewed at each requested precision."""
    from subnets.basemodel import load_base_info
    from training.recovery import open_workspace

    wl = Workload.parse(request.workload)
    base_id, _ = load_base_info(request.model)
    if ws is None:
        ws = open_workspace(request.model, request.neuron_step, request.text, request.quality_tokens,
                            request.reconstruct, request.supernet)
    deps = deployments(request, ws, wl, base_id)
    return deps[0].ws, deps, base_id
