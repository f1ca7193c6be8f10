"""The recovery loss of one sub-network: a·CE(labels) + b·T²·KL(teacher ‖ student).

Forward KL on the logits is what Minitron found best for pruned-model recovery; the T² factor
keeps the gradient's scale independent of the temperature (Hinton et al.)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class LossWeights:
    ce: float = 0.0  # a
    kd: float = 1.0  # b
    temperature: float = 1.0  # T


def next_token_ce(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy of logits [B, S, V] against the same ids shifted."""
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), input_ids[:, 1:].reshape(-1))


def kl_teacher_student(student: torch.Tensor, teacher: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Mean over tokens of KL(softmax(teacher/T) ‖ softmax(student/T)) x T². The teacher is
    detached: no gradient ever reaches it."""
    t = temperature
    s_log = F.log_softmax(student.float() / t, dim=-1).flatten(0, -2)
    t_log = F.log_softmax(teacher.detach().float() / t, dim=-1).flatten(0, -2)
    return F.kl_div(s_log, t_log, log_target=True, reduction="batchmean") * (t * t)


def member_loss(student: torch.Tensor, input_ids: torch.Tensor, teacher: torch.Tensor | None,
                weights: LossWeights) -> tuple[torch.Tensor, dict[str, float]]:
    """The loss of one sub-network and its parts (for logging). Without a teacher it is the
    cross-entropy alone (the in-place teacher itself, or plain training)."""
    ce = next_token_ce(student, input_ids)
    if teacher is None:
        return ce, {"ce": float(ce.detach())}
    kl = kl_teacher_student(student, teacher, weights.temperature)
    loss = weights.ce * ce + weights.kd * kl if weights.ce else weights.kd * kl
    return loss, {"ce": float(ce.detach()), "kl": float(kl.detach())}
