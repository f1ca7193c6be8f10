"""One training step's loss over several sub-networks, as one module so that distributed
data parallelism sees one forward and one backward per micro-batch (one gradient sync per
step, whatever the number of sub-networks)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from subnets.config import SubnetConfig
from training.loss import LossWeights, member_loss
from training.supernet import SuperNetwork

KD_MODES = ("inplace", "teacher", "none")


class RecoveryObjective(nn.Module):
    """Sum of the members' losses. With ``kd='inplace'`` the first member (the sandwich's
    largest) is trained on the labels and its detached logits teach the others; with
    ``kd='teacher'`` every member learns from ``teacher_logits`` (a frozen original model);
    with ``kd='none'`` every member is trained on the labels."""

    def __init__(self, supernet: SuperNetwork, kd: str, weights: LossWeights) -> None:
        super().__init__()
        if kd not in KD_MODES:
            raise ValueError(f"unknown distillation mode {kd!r}")
        self.supernet, self.kd, self.weights = supernet, kd, weights

    def forward(self, input_ids: torch.Tensor, configs: Sequence[SubnetConfig | None],
                teacher_logits: torch.Tensor | None = None) -> tuple[torch.Tensor, list[dict[str, float]]]:
        total = torch.zeros((), device=input_ids.device)
        stats: list[dict[str, float]] = []
        teacher = teacher_logits if self.kd == "teacher" else None
        for i, config in enumerate(configs):
            logits = self.supernet(input_ids, config)
            loss, parts = member_loss(logits, input_ids, teacher, self.weights)
            if self.kd == "inplace" and i == 0 and len(configs) > 1:
                teacher = logits.detach()
            total = total + loss
            stats.append({"loss": float(loss.detach()), **parts})
            del logits
        return total, stats
