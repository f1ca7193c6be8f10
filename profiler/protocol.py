"""The measurement protocol: every setting besides the cell itself that changes a number.

A cell (device, sub-network, phase, shape, back-end, threads) measured under two protocols
gives two different numbers: a 0.05 s trial run is noisier than a 3 s one, a paired latency
is a ratio to a companion, shipped weights and board-materialized ones can land differently
in memory. The protocol's digest is part of the job key, so a rerun with other settings
measures anew instead of resuming, and the predictor trains on one protocol at a time."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from typing import Any

# Measurements written before the protocol was recorded (store schema 2 and older).
UNRECORDED = "unrecorded"
# The agent's timing defaults (device_agents/agent_timing.Policy): a record that leaves one out
# is timed exactly as one that sends the default, so both must be one protocol.
TIMING_DEFAULTS: dict[str, Any] = {"warmup_runs": 3, "warmup_s": 0.2, "min_runs": 10, "min_time_s": 1.0,
                                   "max_time_s": 20.0, "max_runs": 100000, "target_rel_ci": 0.02,
                                   "unstable_cov": 0.10, "sessions": 1}


def normalized_timing(timing: dict[str, Any]) -> dict[str, Any]:
    out = {**TIMING_DEFAULTS, **timing}
    return {k: type(TIMING_DEFAULTS[k])(v) if k in TIMING_DEFAULTS else v for k, v in out.items()}


@dataclass(frozen=True)
class Protocol:
    timing: dict[str, Any] = field(default_factory=dict)  # as sent to the agent, per phase
    weights: str = "none"
    paired: bool = False
    companion: str | None = None  # the paired companion's config hash
    opset: int | None = 17  # None: not an ONNX graph (llama.cpp's GGUF)
    ir_version: int | None = 8
    graph_opt: str = "all"
    precision: str | None = None  # TensorRT's engine precision, or the weights' (int8, int4-b32, q4_0, ...)
    # None: each cell timed to completion before the next; else interleaved rounds
    # (profiler.rounds.RoundsPlan.to_dict: rounds, target, batch, the statistic stored)
    schedule: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "timing", normalized_timing(self.timing))

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        if d["schedule"] is None:  # protocols recorded before rounds existed keep their digests
            del d["schedule"]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Protocol:
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})

    @property
    def digest(self) -> str:
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:12]

    def describe(self) -> str:
        t = self.timing
        parts = [f"min {t.get('min_time_s', 'default')} s"]
        if t.get("sessions", 1) > 1:
            parts.append(f"{t['sessions']} sessions")
        if self.schedule:
            s = self.schedule
            q = s.get("quantile", 0.5)
            parts.append(f"rounds {s['min_rounds']}-{s['max_rounds']}, level "
                         + ("the median" if q == 0.5 else f"quantile {q:g}") + " of the rounds"
                         + (", drift-normalised" if s.get("normalize") else ""))
        parts += ["paired" if self.paired else "unpaired", f"weights {self.weights}", f"opset {self.opset}"]
        return ", ".join(parts)
