"""Repeatability: how far a board's second measurement of a cell lands from its first.

A sweep re-measures a share of its done cells later on (``SweepSpec.repeat_share``); the
spread of log(second / first) over those cells is what the board allows any latency model:
a perfect predictor, wrong only by the measurement's own noise, would have an error spread
of this spread / sqrt(2) (one measurement's noise, not the difference of two). Reported by
every sweep, by ``edgenas measurements`` and beside every predictor's own error spread."""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class Repeatability:
    n: int  # cells measured twice
    sd_log_ratio: float  # sd of log(second / first): the re-measurement spread
    within_5pct: float  # share of cells whose second measurement is within ±5% of the first
    median_ratio: float  # the typical drift between the two (1.0: none)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def describe(self) -> str:
        return (f"{self.n} cells re-measured: spread {self.sd_log_ratio:.1%} (sd of the log ratio), "
                f"{self.within_5pct:.0%} within ±5%")


def repeatability(pairs: Iterable[tuple[float, float]]) -> Repeatability | None:
    """From (first, second) medians of the same cells; None without any."""
    logs = [math.log(b / a) for a, b in pairs if a > 0 and b > 0]
    if not logs:
        return None
    n = len(logs)
    sd = math.sqrt(sum(x * x for x in logs) / n)  # about 0, not the mean: a common drift is part of the spread
    within = sum(abs(math.exp(x) - 1) <= 0.05 for x in logs) / n
    ordered = sorted(logs)
    median = ordered[n // 2] if n % 2 else (ordered[n // 2 - 1] + ordered[n // 2]) / 2
    return Repeatability(n, sd, within, math.exp(median))


def by_phase(rows: Iterable[dict[str, Any]]) -> dict[str, Repeatability]:
    """``Store.repeat_pairs`` rows grouped by phase."""
    phases: dict[str, list[tuple[float, float]]] = {}
    for r in rows:
        phases.setdefault(r["phase"], []).append((float(r["first_ms"]), float(r["again_ms"])))
    out = {ph: repeatability(p) for ph, p in sorted(phases.items())}
    return {ph: r for ph, r in out.items() if r is not None}
