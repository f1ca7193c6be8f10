"""Checkpoints of a training run: the weights as an ordinary HF folder (safetensors), the
optimizer and LR-schedule states, and the step reached. Written to a temporary folder and
swapped in, so a run killed at any moment leaves the previous checkpoint whole.

Layout of a run folder ``OUT``::

    OUT/run.json                 what was asked (settings), the base model, the kind of run
    OUT/checkpoint/model/        weights + tokenizer (loads with from_pretrained)
    OUT/checkpoint/optimizer.safetensors + optimizer.json   AdamW state (no pickle anywhere)
    OUT/checkpoint/scheduler.json  LR schedule state
    OUT/checkpoint/state.json    step reached, settings digest
    OUT/log.jsonl                one line per step (losses, lr, tokens/s)
    OUT/loss.png                 loss curves
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

CHECKPOINT = "checkpoint"
RUN_FILE = "run.json"
LOG_FILE = "log.jsonl"


@dataclass(frozen=True)
class CheckpointState:
    step: int  # steps completed
    settings_digest: str

    def to_dict(self) -> dict[str, Any]:
        return {"step": self.step, "settings_digest": self.settings_digest}


def checkpoint_dir(out: Path) -> Path:
    return Path(out) / CHECKPOINT


def read_state(out: Path) -> CheckpointState | None:
    for folder in (checkpoint_dir(out), Path(out) / f"{CHECKPOINT}.old"):
        f = folder / "state.json"
        if f.is_file():
            d = json.loads(f.read_text())
            if folder.name.endswith(".old"):  # killed between the two renames of a save
                os.replace(folder, checkpoint_dir(out))
            return CheckpointState(int(d["step"]), str(d["settings_digest"]))
    return None


def save_checkpoint(out: Path, model: Any, tokenizer: Any, optimizer: Any, scheduler: Any,
                    state: CheckpointState) -> Path:
    out = Path(out)
    tmp = out / f"{CHECKPOINT}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    model.save_pretrained(tmp / "model")
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp / "model")
    if optimizer is not None:
        _save_optimizer(optimizer.state_dict(), tmp)
    if scheduler is not None:
        (tmp / "scheduler.json").write_text(json.dumps(scheduler.state_dict()))
    (tmp / "state.json").write_text(json.dumps(state.to_dict()))
    final, old = checkpoint_dir(out), out / f"{CHECKPOINT}.old"
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)
    return final


def _save_optimizer(sd: dict[str, Any], folder: Path) -> None:
    from safetensors.torch import save_file

    tensors, scalars = {}, {}
    for i, st in sd["state"].items():
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"{i}.{k}"] = v.detach().cpu().contiguous()
            else:
                scalars[f"{i}.{k}"] = v
    save_file(tensors, str(folder / "optimizer.safetensors"))
    (folder / "optimizer.json").write_text(json.dumps({"param_groups": sd["param_groups"], "scalars": scalars}))


def load_optimizer_state(out: Path, optimizer: Any, scheduler: Any) -> None:
    from safetensors.torch import load_file

    ck = checkpoint_dir(out)
    if (ck / "optimizer.json").is_file():
        meta = json.loads((ck / "optimizer.json").read_text())
        state: dict[int, dict[str, Any]] = {}
        for key, v in [*load_file(str(ck / "optimizer.safetensors")).items(), *meta["scalars"].items()]:
            i, name = key.split(".", 1)
            state.setdefault(int(i), {})[name] = v
        optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    if scheduler is not None and (ck / "scheduler.json").is_file():
        scheduler.load_state_dict(json.loads((ck / "scheduler.json").read_text()))


def read_log(out: Path, up_to_step: int | None = None) -> list[dict[str, Any]]:
    f = Path(out) / LOG_FILE
    if not f.is_file():
        return []
    rows = []
    for line in f.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue  # a torn last line after a kill
        if up_to_step is None or row["step"] < up_to_step:
            rows.append(row)
    return rows


def truncate_log(out: Path, step: int) -> list[dict[str, Any]]:
    """Keep the log lines of the steps a checkpoint holds; the rest will be recomputed."""
    rows = read_log(out, step)
    (Path(out) / LOG_FILE).write_text("".join(json.dumps(r) + "\n" for r in rows))
    return rows
