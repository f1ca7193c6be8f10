"""Checkpoints of a training run: the weights as an ordinary HF folder (safetensors), the
optimizer and LR-schedule states, and the step reached. Written to a temporary folder and
swapped in, so a run killed at any moment leaves the previous checkpoint whole.

Layout of a run folder ``OUT``::

    OUT/run.json                 what was asked (settings), the base model, the kind of run
    OUT/checkpoint/model/        weights + tokenizer (loads with from_pretrained)
    OUT/checkpoint/optimizer.pt  AdamW state (tensors only; loaded with weights_only)
    OUT/checkpoint/scheduler.pt  LR schedule state
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
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    if scheduler is not None:
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
    (tmp / "state.json").write_text(json.dumps(state.to_dict()))
    final, old = checkpoint_dir(out), out / f"{CHECKPOINT}.old"
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)
    return final


def load_optimizer_state(out: Path, optimizer: Any, scheduler: Any) -> None:
    ck = checkpoint_dir(out)
    if (ck / "optimizer.pt").is_file():
        optimizer.load_state_dict(torch.load(ck / "optimizer.pt", weights_only=True, map_location="cpu"))
    if scheduler is not None and (ck / "scheduler.pt").is_file():
        scheduler.load_state_dict(torch.load(ck / "scheduler.pt", weights_only=True))


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
