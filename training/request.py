"""What a recovery-training run is asked: ``SupernetRequest`` (the base model as a
weight-sharing super-network) and ``FinetuneRequest`` (one sub-network with distillation),
each frozen and validated before the model loads, and the functions that run them for the
command line, the main job and the Python API alike (one process, or each process of a
``torchrun`` / ``accelerate launch``)."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from subnets.config import SubnetConfig
from subnets.errors import ConfigError
from training.settings import TrainSettings
from training.trainer import StepCallback, TrainResult


@dataclass(frozen=True)
class SupernetRequest:
    settings: TrainSettings
    out: Path
    model: str = "smollm2"
    data: tuple[str, ...] = ("stdlib",)
    text_field: str = "text"
    # sample sub-networks by a device's predicted workload latency (default: analytic MACs)
    predictor: Path | None = None
    device: str | None = None
    workload: str = "128,64"
    neuron_step: int = 64
    cpu: bool = False

    def __post_init__(self) -> None:
        from predictor.workload import Workload

        object.__setattr__(self, "data", tuple(self.data))
        object.__setattr__(self, "out", Path(self.out))
        self.settings.validate()
        Workload.parse(self.workload)
        if self.predictor is None and self.device:
            raise ConfigError("--device names the predictor's device, but no --predictor is given",
                              "add --predictor DIR, or drop --device")


@dataclass(frozen=True)
class FinetuneRequest:
    settings: TrainSettings
    out: Path
    config: Path
    index: int = 0
    model: str = "smollm2"
    data: tuple[str, ...] = ("stdlib",)
    text_field: str = "text"
    supernet: Path | None = None
    reconstruct: bool = False
    onnx: bool = False
    neuron_step: int = 64
    cpu: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "data", tuple(self.data))
        object.__setattr__(self, "out", Path(self.out))
        self.settings.validate()
        self.subnet()  # a missing file or an index out of range, before any work

    def subnet(self) -> SubnetConfig:
        from subnets.configio import read_config

        return read_config(self.config, self.index)


def latency_objective(request: SupernetRequest, base_id: str) -> Any:
    """The predictor's workload latency the sampler bins by, tagged with what it was trained
    on (a resumed run must sample by the same one); None without a predictor."""
    if request.predictor is None:
        return None
    from predictor.workload import LatencyObjective, Workload

    objective = LatencyObjective.load(request.predictor, Workload.parse(request.workload), request.device, base_id)
    digest = hashlib.sha256(b"".join((request.predictor / ph / "meta.json").read_bytes()
                                     for ph in ("prefill", "decode"))).hexdigest()[:16]
    objective.identity = f"predictor:{objective.device_name}:{digest}"
    return objective


def run_supernet(request: SupernetRequest, on_step: StepCallback | None = None, accelerator: Any = None,
                 objective: Any = None) -> TrainResult:
    """Train the request's super-network (resuming its run folder); ``objective``: a latency
    objective already loaded (the main job's), else the request's predictor's."""
    from predictor.workload import Workload
    from subnets.basemodel import load_base_info
    from training.recovery import train_supernet

    wl = Workload.parse(request.workload)
    if objective is None:
        objective = latency_objective(request, load_base_info(request.model)[0])
    return train_supernet(request.model, list(request.data), request.settings, request.out, objective=objective,
                          workload=(wl.prompt_len, wl.gen_tokens), neuron_step=request.neuron_step,
                          text_field=request.text_field, on_step=on_step, accelerator=accelerator)


def run_finetune(request: FinetuneRequest, on_step: StepCallback | None = None,
                 accelerator: Any = None) -> tuple[TrainResult, Path | None]:
    """Fine-tune the request's sub-network; returns the result and, with ``onnx``, the folder
    of its ONNX export with the trained weights (written by the main process only)."""
    from training.recovery import finetune

    config = request.subnet()
    res, model = finetune(request.model, config, list(request.data), request.settings, request.out,
                          supernet=request.supernet, neuron_step=request.neuron_step, text_field=request.text_field,
                          on_step=on_step, accelerator=accelerator, reconstruct=request.reconstruct)
    if not request.onnx or (accelerator is not None and not accelerator.is_main_process):
        return res, None
    from export.onnx_graphs import ExportOptions, export_subnet
    from subnets.extract import weights_of_model

    w = weights_of_model(model.eval(), config, weights_id=f"finetune:{request.settings.digest()}")
    return res, export_subnet(w, request.out / "onnx", ExportOptions()).folder
