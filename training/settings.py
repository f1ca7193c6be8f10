"""What a training run was asked to do, as one JSON-serialisable record. Its digest names the
run: a resumed run must have been asked the same (else it would continue a different
optimisation and its losses would mean nothing)."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from subnets.errors import ConfigError

PRECISIONS = ("fp32", "bf16", "fp16")
# Settings that change how a run is watched, not what it computes.
_NOT_IDENTITY = {"checkpoint_every", "log_every"}


@dataclass(frozen=True)
class TrainSettings:
    steps: int = 100
    batch_size: int = 4
    seq_len: int = 256
    grad_accum: int = 1
    lr: float = 2e-4
    min_lr_ratio: float = 0.1
    warmup_steps: int = 10
    weight_decay: float = 0.0
    clip: float = 1.0
    strategy: str = "sandwich"
    k: int = 2
    kd: str = "inplace"
    ce_weight: float = 0.0
    kd_weight: float = 1.0
    temperature: float = 1.0
    latency_range: tuple[float, float] = (0.5, 1.0)
    bins: int = 8
    freeze_embeddings: bool = True
    precision: str = "fp32"
    seed: int = 0
    checkpoint_every: int = 50
    log_every: int = 1
    extra: dict[str, Any] = field(default_factory=dict)  # data digest, base id, predictor digest, ...

    def validate(self) -> TrainSettings:
        problems = []
        for name in ("steps", "batch_size", "seq_len", "grad_accum", "checkpoint_every", "bins"):
            if getattr(self, name) < 1:
                problems.append((f"--{name.replace('_', '-')} {getattr(self, name)} is not positive",
                                 f"give --{name.replace('_', '-')} >= 1"))
        if self.k < 0:
            problems.append((f"--k {self.k} is negative", "give the number of random sub-networks per step, >= 0"))
        if not self.lr > 0:
            problems.append((f"--lr {self.lr} is not positive", "e.g. --lr 2e-4"))
        if self.precision not in PRECISIONS:
            problems.append((f"--precision {self.precision!r} is unknown", f"use one of {', '.join(PRECISIONS)}"))
        if not self.temperature > 0:
            problems.append((f"--temperature {self.temperature} is not positive", "e.g. --temperature 1"))
        lo, hi = self.latency_range
        if not 0 < lo < hi <= 1:
            problems.append((f"latency range {lo},{hi} is outside (0, 1]", "give 0 < LO < HI <= 1, e.g. 0.5,1.0"))
        if problems:
            raise ConfigError(problems[0][0], problems[0][1])
        return self

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["latency_range"] = list(self.latency_range)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainSettings:
        known = {f.name for f in fields(cls)}
        d = {k: v for k, v in d.items() if k in known}
        if "latency_range" in d:
            d["latency_range"] = tuple(d["latency_range"])
        return cls(**d)

    def identity(self) -> dict[str, Any]:
        return {k: v for k, v in self.to_dict().items() if k not in _NOT_IDENTITY}

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(self.identity(), sort_keys=True).encode()).hexdigest()[:16]

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.seq_len * self.grad_accum
