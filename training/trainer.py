"""The training loop, on Hugging Face accelerate: the same code runs in one process (CPU
here), or under ``torchrun`` / ``accelerate launch`` on N processes and nodes (DDP: gloo on
CPU, NCCL on GPU), with gradient accumulation, clipping, AdamW, warm-up + cosine LR, and
bf16/fp16 autocast on a GPU.

Each step runs its sub-networks inside one forward of ``RecoveryObjective``, so DDP syncs
the gradients once per step (``accelerator.accumulate`` skips the sync on the other
micro-batches); parameters a step does not use (dropped layers, and everything outside the
slices) are handled by ``find_unused_parameters``. A checkpoint every K steps holds weights,
optimizer and schedule; data and sub-networks are functions of (seed, step), so a killed run
resumed from its checkpoint reproduces the uninterrupted run's losses."""

from __future__ import annotations

import copy
import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from training.checkpoint import (
    LOG_FILE,
    CheckpointState,
    load_optimizer_state,
    read_state,
    save_checkpoint,
    truncate_log,
)
from training.data import TokenWindows
from training.loss import LossWeights
from training.objective import RecoveryObjective
from training.sampler import SubnetSampler
from training.settings import TrainSettings
from training.supernet import SuperNetwork, trainable_parameters, unwrap

log = logging.getLogger(__name__)

StepCallback = Callable[[dict[str, Any]], None]


def lr_lambda(settings: TrainSettings) -> Callable[[int], float]:
    """Linear warm-up, then cosine decay to ``min_lr_ratio`` of the peak."""
    warm, total, floor = settings.warmup_steps, settings.steps, settings.min_lr_ratio

    def f(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        progress = min(1.0, (step - warm) / max(1, total - warm))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    return f


def make_accelerator(settings: TrainSettings, cpu: bool = False) -> Any:
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs

    precision = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}[settings.precision]
    return Accelerator(mixed_precision=precision, gradient_accumulation_steps=settings.grad_accum, cpu=cpu,
                       kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)])


@dataclass
class TrainResult:
    steps_done: int
    resumed_from: int
    log: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0
    tokens_per_s: float = 0.0


@dataclass
class Trainer:
    """Trains ``model`` (an importance-sorted causal LM, or a dense sub-network) in place."""

    model: torch.nn.Module
    tokenizer: Any
    data: TokenWindows
    sampler: SubnetSampler | None  # None: the dense model itself (fine-tuning)
    settings: TrainSettings
    out: Path
    teacher: torch.nn.Module | None = None  # frozen original for kd='teacher'
    accelerator: Any = None

    def _members(self, step: int) -> list[Any]:
        return [None] if self.sampler is None else list(self.sampler.configs(step))

    def _resume(self, optimizer: Any, scheduler: Any) -> int:
        state = read_state(self.out)
        if state is None:
            return 0
        # a mismatch is refused before the Trainer is built (training.run); here it is a bug
        assert state.settings_digest == self.settings.digest(), "resuming a run with other settings"
        from safetensors.torch import load_file

        weights = {}
        for f in sorted((self.out / "checkpoint" / "model").glob("*.safetensors")):
            weights.update(load_file(f))
        missing, unexpected = self.model.load_state_dict(weights, strict=False)
        missing = [k for k in missing if not k.endswith("lm_head.weight")]
        if missing or unexpected:
            raise RuntimeError(f"checkpoint does not fit the model: missing {missing}, unexpected {unexpected}")
        load_optimizer_state(self.out, optimizer, scheduler)
        truncate_log(self.out, state.step)
        return state.step

    def run(self, on_step: StepCallback | None = None, stop_after: int | None = None) -> TrainResult:
        """Train to ``settings.steps`` (resuming from the folder's checkpoint); ``stop_after``
        ends this call after that many steps (a planned interruption, as a kill would)."""
        s = self.settings
        acc = self.accelerator or make_accelerator(s)
        torch.manual_seed(s.seed)
        params = trainable_parameters(self.model, s.freeze_embeddings)
        optimizer = torch.optim.AdamW(params, lr=s.lr, weight_decay=s.weight_decay, betas=(0.9, 0.95))
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(s))
        teacher = None
        if s.kd == "teacher":  # copied before a resume loads trained weights into the model
            teacher = (self.teacher or copy.deepcopy(self.model)).to(acc.device).eval().requires_grad_(False)
        start = self._resume(optimizer, scheduler)
        dims = self.sampler.space.dims if self.sampler is not None else None
        objective = RecoveryObjective(SuperNetwork(self.model, dims), s.kd,
                                      LossWeights(s.ce_weight, s.kd_weight, s.temperature))
        objective, optimizer = acc.prepare(objective, optimizer)
        result = TrainResult(start, start)
        end = s.steps if stop_after is None else min(s.steps, start + stop_after)
        t0, tokens = time.perf_counter(), 0
        for step in range(start, end):
            rec = self._step(acc, objective, optimizer, scheduler, teacher, params, step)
            tokens += s.tokens_per_step * acc.num_processes
            rec["seconds"] = time.perf_counter() - t0
            rec["tokens_per_s"] = tokens / max(rec["seconds"], 1e-9)
            result.steps_done = step + 1
            if acc.is_main_process:
                with (self.out / LOG_FILE).open("a") as f:
                    f.write(json.dumps(rec) + "\n")
                result.log.append(rec)
                if on_step:
                    on_step(rec)
            if (step + 1) % s.checkpoint_every == 0 or step + 1 == s.steps:
                self._checkpoint(acc, objective, optimizer, scheduler, step + 1)
        result.seconds = time.perf_counter() - t0
        result.tokens_per_s = tokens / max(result.seconds, 1e-9)
        acc.wait_for_everyone()
        return result

    def _step(self, acc: Any, objective: Any, optimizer: Any, scheduler: Any, teacher: Any, params: list[Any],
              step: int) -> dict[str, Any]:
        s = self.settings
        configs = self._members(step)
        members: list[dict[str, float]] = [{} for _ in configs]
        total = 0.0
        grad_norm = None
        for micro in range(s.grad_accum):
            ids = self.data.batch(step, micro, acc.process_index, acc.num_processes, s.batch_size, s.grad_accum,
                                  s.seed).to(acc.device)
            with acc.accumulate(objective), acc.autocast():
                t_logits = None
                if teacher is not None:
                    with torch.no_grad():
                        t_logits = teacher(input_ids=ids, use_cache=False).logits
                loss, stats = objective(ids, configs, t_logits)
                acc.backward(loss)  # accelerate divides by the accumulation steps itself
                if acc.sync_gradients:
                    grad_norm = float(acc.clip_grad_norm_(params, s.clip)) if s.clip > 0 else None
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            total += float(loss.detach()) / s.grad_accum
            for m, st in zip(members, stats):
                for k, v in st.items():
                    m[k] = m.get(k, 0.0) + v / s.grad_accum
        lr = scheduler.get_last_lr()[0]
        scheduler.step()
        mean = acc.reduce(torch.tensor([total], device=acc.device), reduction="mean")
        return {"step": step, "loss": float(mean[0]), "lr": lr, "grad_norm": grad_norm,
                "members": [{"subnet": "dense" if c is None else c.summary(), **m} for c, m in zip(configs, members)]}

    def _checkpoint(self, acc: Any, objective: Any, optimizer: Any, scheduler: Any, step: int) -> None:
        acc.wait_for_everyone()
        if acc.is_main_process:
            model = unwrap(acc.unwrap_model(objective)).supernet.model
            save_checkpoint(self.out, model, self.tokenizer, optimizer, scheduler,
                            CheckpointState(step, self.settings.digest()))
        acc.wait_for_everyone()
