"""Recovery training as the rest of edgenas sees it: train a super-network from a base model,
fine-tune one chosen sub-network, and open a trained super-network as a ``Workspace`` so
that search, export and profiling use its weights.

A super-network folder holds the importance-sorted base model after training (an ordinary
HF folder) and ``run.json``. Opened as a workspace, its base id is the original base
model's (configs, predictors and measurements stay valid: weights do not change latency),
its importance is the identity (every sub-network is a prefix slice), and its layer ranking
is the original block influence."""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from subnets.basemodel import BaseModel, load_base_model
from subnets.config import SubnetConfig
from subnets.errors import ConfigError, EdgenasError, ModelLoadError
from subnets.importance import Importance, importance_for
from subnets.workspace import Workspace
from training.checkpoint import RUN_FILE, checkpoint_dir, read_log, read_state
from training.data import TokenWindows, pack, read_documents
from training.sampler import SubnetSampler, latency_fn_for
from training.settings import TrainSettings
from training.sorting import prefix_importance, sort_by_importance
from training.trainer import StepCallback, Trainer, TrainResult

log = logging.getLogger(__name__)

RUN_FORMAT = 1


class TrainingError(EdgenasError):
    """A training run that cannot start or resume as asked."""


@dataclass
class RunInfo:
    """``run.json``: what a training folder is and what it was asked."""

    kind: str  # "supernet" | "finetune"
    base_id: str
    base_model: str
    settings: TrainSettings
    block_influence: list[float]
    importance_method: str
    config: dict[str, Any] | None = None  # the fine-tuned sub-network
    supernet: str | None = None  # the super-network a fine-tune started from

    def to_dict(self) -> dict[str, Any]:
        return {"format": RUN_FORMAT, "kind": self.kind, "base_id": self.base_id, "base_model": self.base_model,
                "settings": self.settings.to_dict(), "settings_digest": self.settings.digest(),
                "block_influence": self.block_influence, "importance_method": self.importance_method,
                "config": self.config, "supernet": self.supernet}

    @classmethod
    def read(cls, folder: Path) -> RunInfo:
        f = Path(folder) / RUN_FILE
        if not f.is_file():
            raise TrainingError(f"{folder} is not a training folder (it has no {RUN_FILE})",
                                "pass the --out folder of `edgenas train-supernet` or `edgenas finetune`")
        try:
            d = json.loads(f.read_text())
        except json.JSONDecodeError as e:
            raise TrainingError(f"{f} is not valid JSON: {e}", "restore the file, or train again into a new folder") from None
        if d.get("format") != RUN_FORMAT:
            raise TrainingError(f"{f} has format {d.get('format')!r}; this edgenas reads {RUN_FORMAT}",
                                "train again with this version of edgenas")
        return cls(d["kind"], d["base_id"], d["base_model"], TrainSettings.from_dict(d["settings"]),
                   list(d["block_influence"]), d["importance_method"], d.get("config"), d.get("supernet"))

    def write(self, folder: Path) -> None:
        """Atomically: another process of the same run may be reading it."""
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / f".{RUN_FILE}.{os.getpid()}"
        tmp.write_text(json.dumps(self.to_dict(), indent=1))
        os.replace(tmp, folder / RUN_FILE)


def _start(out: Path, info: RunInfo, accelerator: Any) -> Any:
    """Check a resume, record the run (main process only), and return the accelerator."""
    from training.trainer import make_accelerator

    acc = accelerator or make_accelerator(info.settings)
    _check_resume(out, info)
    acc.wait_for_everyone()  # every process has read the old run.json before it is rewritten
    if acc.is_main_process:
        info.write(out)
    acc.wait_for_everyone()
    return acc


def _check_resume(out: Path, info: RunInfo) -> None:
    """A folder with a run in it resumes only the same run."""
    if not (out / RUN_FILE).is_file():
        return
    old = RunInfo.read(out)
    if old.kind != info.kind or old.settings.digest() != info.settings.digest() or old.base_id != info.base_id:
        changed = sorted(k for k, v in info.settings.identity().items() if old.settings.identity().get(k) != v)
        what = ", ".join(changed) if changed else f"base model or kind ({old.base_id} {old.kind})"
        raise TrainingError(f"{out} holds a {old.kind} run with other settings (changed: {what}); it cannot be resumed "
                            "with these", "rerun with the same settings to resume, or pass a new --out folder")


# --- super-networks ------------------------------------------------------------------------
def sorted_base(spec: str) -> tuple[BaseModel, Importance]:
    """The base model with its units sorted by importance (most important first)."""
    base = load_base_model(spec)
    imp = importance_for(base)
    sort_by_importance(base.model, imp, base.dims.num_kv_heads, base.dims.head_dim)
    return base, imp


def train_supernet(model: str, data: list[str], settings: TrainSettings, out: Path, *, objective: Any = None,
                   workload: tuple[int, int] = (128, 64), neuron_step: int = 64, text_field: str = "text",
                   on_step: StepCallback | None = None, stop_after: int | None = None,
                   accelerator: Any = None) -> TrainResult:
    """Train ``model`` as a weight-sharing super-network into ``out`` (resuming a run there)."""
    settings.validate()
    out = Path(out)
    base, imp = sorted_base(model)
    windows = pack(read_documents(data, text_field), base.tokenizer, settings.seq_len)
    space = base.space(neuron_step)
    extra = {**settings.extra, "data": windows.digest, "base_id": base.base_id, "neuron_step": space.neuron_step,
             "latency": getattr(objective, "identity", None) or ("analytic-macs" if objective is None else "predictor"),
             "workload": list(workload)}
    settings = replace(settings, extra=extra)
    info = RunInfo("supernet", base.base_id, str(model), settings, [float(x) for x in imp.block_influence], imp.method)
    acc = _start(out, info, accelerator)
    sampler = SubnetSampler(space, imp.layer_ranking(), latency_fn_for(space, objective, workload), settings.strategy,
                            settings.k, settings.latency_range, settings.bins, seed=settings.seed)
    if settings.strategy != "standard":
        log.info("sampling %s: %d candidates within %.0f-%.0f%% of the full model's latency, smallest %s",
                 settings.strategy, len(sampler.pool), 100 * settings.latency_range[0], 100 * settings.latency_range[1],
                 sampler.smallest.summary())
    base.model.train()
    trainer = Trainer(base.model, base.tokenizer, windows, sampler, settings, out, accelerator=acc)
    result = trainer.run(on_step, stop_after)
    if acc.is_main_process:
        plot_losses(out)
    return result


def open_supernet(folder: Path | str, neuron_step: int = 64, eval_text: str | None = None,
                  eval_budget: int = 4096, base_id: str | None = None) -> Workspace:
    """A trained super-network as a workspace (see the module's docstring). ``base_id``, when
    given, must be the one the folder was trained from."""
    folder = Path(folder)
    info = RunInfo.read(folder)
    if info.kind != "supernet":
        raise TrainingError(f"{folder} holds a {info.kind} run, not a super-network",
                            "pass the --out folder of `edgenas train-supernet`")
    if base_id is not None and base_id != info.base_id:
        raise TrainingError(f"super-network {folder} was trained from base model {info.base_id}, not {base_id}",
                            "pass the --model it was trained from, or train a super-network of this model")
    state = read_state(folder)
    if state is None:
        raise TrainingError(f"{folder} has no checkpoint yet (training stopped before its first one)",
                            "resume the training with the same command, or lower --checkpoint-every")
    try:
        base = load_base_model(checkpoint_dir(folder) / "model")
    except ModelLoadError as e:
        raise TrainingError(f"the super-network weights in {folder} do not load: {e.problem}",
                            "resume the training to rewrite its checkpoint") from None
    base = replace(base, name=info.base_id.split("@")[0], base_id=info.base_id,
                   weights_id=f"supernet:{info.settings.digest()}:{state.step}")
    d = base.dims
    template = Importance(info.base_id, info.importance_method,
                          [np.zeros(d.intermediate_size)] * d.num_layers, [np.zeros(d.num_heads)] * d.num_layers,
                          np.asarray(info.block_influence, dtype=np.float64))
    imp = prefix_importance(template, d.num_kv_heads)
    return Workspace(base, imp, base.space(neuron_step), eval_text=eval_text, eval_budget=eval_budget)


# --- fine-tuning one sub-network -------------------------------------------------------------
def finetune(model: str, config: SubnetConfig, data: list[str], settings: TrainSettings, out: Path, *,
             supernet: Path | None = None, neuron_step: int = 64, text_field: str = "text",
             on_step: StepCallback | None = None, stop_after: int | None = None,
             accelerator: Any = None, reconstruct: bool = False) -> tuple[TrainResult, Any]:
    """Fine-tune one extracted sub-network with distillation from the full original model;
    returns the result and the trained dense model (also saved in ``out/checkpoint/model``).
    ``reconstruct``: start from the sub-network's refitted weights (``subnets.reconstruct``)."""
    from subnets.extract import save_subnet

    settings.validate()
    out = Path(out)
    teacher_base = load_base_model(model)
    ws = (open_supernet(supernet, neuron_step, base_id=teacher_base.base_id) if supernet
          else Workspace(teacher_base, importance_for(teacher_base), teacher_base.space(neuron_step)))
    ws = ws.reconstructing(reconstruct)
    config = ws.space.validate(config)
    windows: TokenWindows = pack(read_documents(data, text_field), teacher_base.tokenizer, settings.seq_len)
    settings = replace(settings, strategy="standard", extra={**settings.extra, "data": windows.digest,
                                                             "config": config.config_hash(),
                                                             "reconstruct": reconstruct,
                                                             "supernet": str(supernet) if supernet else None})
    info = RunInfo("finetune", teacher_base.base_id, str(model), settings,
                   [float(x) for x in ws.importance.block_influence], ws.importance.method, config.to_dict(),
                   str(supernet) if supernet else None)
    acc = _start(out, info, accelerator)
    student = ws.model(config).train()
    teacher = teacher_base.model if settings.kd == "teacher" else None
    trainer = Trainer(student, teacher_base.tokenizer, windows, None, settings, out, teacher=teacher,
                      accelerator=acc)
    result = trainer.run(on_step, stop_after)
    if acc.is_main_process:
        if result.steps_done >= settings.steps:
            save_subnet(student.eval(), out / "hf", config, teacher_base.tokenizer)
        plot_losses(out)
    return result, student


def _running_mean(values: list[float], window: int) -> np.ndarray:
    v = np.asarray(values, dtype=np.float64)
    c = np.cumsum(np.insert(v, 0, 0.0))
    idx = np.arange(1, len(v) + 1)
    lo = np.maximum(0, idx - window)
    return (c[idx] - c[lo]) / (idx - lo)


def plot_losses(out: Path) -> Path | None:
    """Loss curves into ``out/loss.png``: each line raw (thin) and as a running mean (the
    random members' losses swing with which sub-network a step drew)."""
    rows = read_log(out)
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in rows]
    lines = {"total": [r["loss"] for r in rows]}
    if max(len(r["members"]) for r in rows) > 1:
        sandwich = all(len(r["members"]) >= 2 for r in rows) and RunInfo.read(out).settings.strategy == "sandwich"
        if sandwich:
            lines["largest"] = [r["members"][0]["loss"] for r in rows]
            lines["smallest"] = [r["members"][1]["loss"] for r in rows]
        rand = [r["members"][2:] if sandwich else r["members"] for r in rows]
        if all(rand):
            lines["random (mean)"] = [float(np.mean([m["loss"] for m in ms])) for ms in rand]
    fig, ax = plt.subplots(figsize=(7, 4))
    window = max(1, len(rows) // 15)
    for (name, vals), color in zip(lines.items(), ("black", "tab:blue", "tab:orange", "tab:green")):
        ax.plot(steps, vals, lw=0.6, alpha=0.3, color=color)
        ax.plot(steps, _running_mean(vals, window), lw=1.8, color=color, label=f"{name} (mean of {window})")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (CE for the largest, KL for distilled members)")
    ax.set_yscale("log")
    ax.legend(fontsize=7)
    ax.set_title(f"{Path(out).name}: training loss")
    fig.tight_layout()
    path = Path(out) / "loss.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def load_trained_subnet(folder: Path) -> tuple[Any, SubnetConfig]:
    """A fine-tuned sub-network (``finetune``'s ``out/hf``) and its config."""
    from subnets.extract import load_subnet

    folder = Path(folder)
    hf = folder / "hf" if (folder / "hf").is_dir() else folder
    cfg = hf / "edgenas_subnet.json"
    if not cfg.is_file():
        raise ConfigError(f"{folder} holds no fine-tuned sub-network (no edgenas_subnet.json)",
                          "pass the --out folder of `edgenas finetune` once it finished")
    return load_subnet(hf), SubnetConfig.from_json(cfg.read_text())


def open_workspace(model: str, neuron_step: int = 64, eval_text: str | None = None, eval_budget: int = 4096,
                   reconstruct: bool = False, supernet: Path | None = None) -> Workspace:
    """The weights a command judges or exports: the base model's, or a trained
    super-network's (``supernet``, trained from ``model``); refitted with ``reconstruct``."""
    if supernet is None:
        return Workspace.open(model, neuron_step=neuron_step, eval_text=eval_text, eval_budget=eval_budget,
                              reconstruct=reconstruct)
    from subnets.basemodel import load_base_info

    base_id, _ = load_base_info(model)
    ws = open_supernet(supernet, neuron_step, eval_text, eval_budget, base_id=base_id)
    return ws.reconstructing(reconstruct)
