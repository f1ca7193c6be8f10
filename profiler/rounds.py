"""Interleaved rounds: a sweep's cells timed in short bursts, round after round, each round in
a shuffled order with the reference among them, each cell's rounds pooled until its interval
meets the target or it reaches its last round.

Timing a cell to completion before the next one starts lets a few seconds of someone else's
work land whole on a few cells. Interleaving (the alternating design of A/B benchmarking,
applied to every cell of a batch) spreads a load spike thinly over many cells, and the
cell's level is the median of its round medians, which one spiked round cannot move. A
decode round opens a fresh session: where a session's weights land sets a decode step's
level, so rounds in fresh sessions sample that spread as today's several-session cells do.

The reference, timed in every round, gives each round a drift factor (its round median
over its first round in the store); the normalised statistic divides it out.
Both are computed and stored; the plan says which one is the cell's number."""

from __future__ import annotations

import math
import random
import statistics
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

from profiler.errors import MeasureError
from profiler.protocol import normalized_timing
from subnets.errors import ConfigError


@dataclass(frozen=True)
class RoundsPlan:
    min_rounds: int = 3
    max_rounds: int = 8
    target_rel_ci: float = 0.02  # half-width of the level's 95% interval, relative
    batch_cells: int = 12  # cells claimed and interleaved together
    normalize: bool = False  # the cell's number: drift-normalised (True) or raw round medians
    # which quantile of its round medians is the cell's level: 0.5, the median; lower, where
    # other work only ever adds time and a round it touched should not set the level
    quantile: float = 0.5
    # a cell whose rounds end wider than this is flagged unstable (as a several-session
    # cell is: its level is uncertain by nature, so only a wide one is untrustworthy)
    unstable_rel_ci: float = 0.10
    fresh_decode_sessions: bool = True

    def __post_init__(self) -> None:
        if self.min_rounds < 2 or self.max_rounds < self.min_rounds:
            raise ConfigError(f"--rounds {self.min_rounds} / --max-rounds {self.max_rounds} is not a range of rounds",
                              "pass --rounds 2 or more and --max-rounds at least as many (or --rounds 0: "
                              "each cell timed to completion)")
        if self.batch_cells < 2:
            raise ConfigError(f"--round-cells {self.batch_cells} interleaves nothing", "pass --round-cells 2 or more")
        if not 0 < self.quantile < 1:
            raise ConfigError(f"--round-quantile {self.quantile} is not a quantile", "pass --round-quantile 0.5 "
                              "(the median of a cell's rounds) or 0.25")
        if not 0 < self.target_rel_ci < 1:
            raise ConfigError(f"a target of {self.target_rel_ci} is not a relative interval", "pass --target-ci 0.02")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def burst_timing(self, timing: dict[str, Any]) -> dict[str, Any]:
        """One round's timing settings, from the cell's: its minimum timed seconds spread over
        the most rounds it may take (a cell that never converges is timed as long as one
        timed to completion), no convergence test inside the burst (the rounds converge).
        Under load, the number of rounds set a cell's repeatability, a burst's length hardly."""
        t = normalized_timing(timing)
        burst = t["min_time_s"] / self.max_rounds
        return {**t, "min_time_s": burst, "max_time_s": burst, "min_runs": 2, "target_rel_ci": 0.0, "sessions": 1,
                "warmup_runs": 1, "warmup_s": min(t["warmup_s"], burst / 4)}


def paired_refused() -> ConfigError:
    return ConfigError("interleaved rounds and paired timing are two answers to one problem (a board whose speed "
                       "moves)", "drop --paired, or pass --rounds 0")


def level(medians: list[float], quantile: float = 0.5) -> tuple[float, float]:
    """(the ``quantile`` of the round medians, the relative half-width of its 95% interval):
    Student's t over the rounds' log spread, times that quantile's standard error in units
    of sd / sqrt(k) (1.25 for the median, 1.36 for the lower quartile, normal theory)."""
    import numpy as np
    from scipy.stats import norm
    from scipy.stats import t as student_t

    k = len(medians)
    mid = float(np.quantile(medians, quantile)) if k else math.nan
    if k < 2 or mid <= 0:
        return mid, math.inf
    sd = statistics.stdev(math.log(m) for m in medians)
    se = math.sqrt(quantile * (1 - quantile)) / float(norm.pdf(norm.ppf(quantile)))
    return mid, math.expm1(float(student_t.ppf(0.975, k - 1)) * se * sd / math.sqrt(k))


@dataclass
class Cell:
    """One cell's rounds so far: ``key`` names it to the caller (a job id, or the reference's
    phase), ``group`` the reference that normalises it."""
    key: Any
    phase: str
    group: str
    medians: list[float] = field(default_factory=list)  # raw, one per round
    tags: list[tuple[str, int]] = field(default_factory=list)  # (batch, round) of each
    raw_ms: list[float] = field(default_factory=list)
    results: list[dict[str, Any]] = field(default_factory=list)  # this sweep's round results
    faults: int = 0
    stop: str | None = None  # "converged", "max_rounds", "failed"

    def add(self, median_ms: float, tag: tuple[str, int], raw_ms: Iterable[float]) -> None:
        self.medians.append(median_ms)
        self.tags.append(tag)
        self.raw_ms.extend(raw_ms)


@dataclass
class Drift:
    """Each round's reference median, by (group, batch, round), and each group's anchor level."""
    rounds: dict[tuple[str, str, int], float] = field(default_factory=dict)
    anchors: dict[str, float] = field(default_factory=dict)

    def factor(self, group: str, tag: tuple[str, int]) -> float:
        ref, anchor = self.rounds.get((group, *tag)), self.anchors.get(group)
        return ref / anchor if ref and anchor else 1.0

    def normalised(self, cell: Cell) -> list[float]:
        return [m / self.factor(cell.group, t) for m, t in zip(cell.medians, cell.tags)]


def pooled(cell: Cell, drift: Drift, plan: RoundsPlan) -> dict[str, Any]:
    """The cell's measurement from its rounds: the chosen statistic's level and interval,
    both statistics beside it, and the pooled runs' spread."""
    raw, raw_ci = level(cell.medians, plan.quantile)
    norm, norm_ci = level(drift.normalised(cell), plan.quantile)
    out = spread(cell.raw_ms)
    out.update({"median_ms": norm if plan.normalize else raw, "median_rel_ci": norm_ci if plan.normalize else raw_ci,
                "raw_median_ms": raw, "raw_rel_ci": raw_ci, "normalized_median_ms": norm, "normalized_rel_ci": norm_ci,
                "pooled_median_ms": out.get("median_ms"), "rounds": len(cell.medians),
                "round_medians_ms": [round(m, 4) for m in cell.medians],
                "drift_factors": [round(drift.factor(cell.group, t), 5) for t in cell.tags],
                "stop_reason": cell.stop, "raw_ms": cell.raw_ms,
                "unstable": cell.stop != "converged" and (norm_ci if plan.normalize else raw_ci) > plan.unstable_rel_ci})
    return out


def spread(raw_ms: list[float]) -> dict[str, Any]:
    """The pooled runs' statistics (ms): how widely the bursts' runs spread, beside the level."""
    import numpy as np

    if not raw_ms:
        return {}
    x = np.asarray(raw_ms, dtype=float)
    mean, std = float(x.mean()), float(x.std(ddof=1)) if len(x) > 1 else 0.0
    p90, p99 = (float(v) for v in np.percentile(x, [90, 99]))
    return {"n": len(x), "mean_ms": mean, "p90_ms": p90, "p99_ms": p99, "min_ms": float(x.min()),
            "max_ms": float(x.max()), "std_ms": std, "cov": std / mean if mean > 0 else 0.0}


def finished(cell: Cell, drift: Drift, plan: RoundsPlan) -> str | None:
    """Why the cell's rounds end now ("converged", "max_rounds"), or None for another round."""
    k = len(cell.medians)
    stat = drift.normalised(cell) if plan.normalize else cell.medians
    if k >= plan.min_rounds and level(stat, plan.quantile)[1] <= plan.target_rel_ci:
        return "converged"
    return "max_rounds" if k >= plan.max_rounds else None


@dataclass
class RoundsRun:
    """One batch's rounds. ``measure(cell, round_no)`` times a burst and returns the agent's
    result (``median_ms``, ``raw_ms``); ``on_round`` stores it; ``on_done`` stores a
    finished cell (not one that failed); ``on_fault`` says whether a failed cell may try
    again next round."""
    plan: RoundsPlan
    batch: str
    measure: Callable[[Cell, int], dict[str, Any]]
    on_round: Callable[[Cell, int, dict[str, Any]], None]
    on_done: Callable[[Cell], None]
    on_fault: Callable[[Cell, MeasureError], bool]
    drift: Drift = field(default_factory=Drift)
    seed: int = 0
    progress: Callable[[int, int], None] = lambda done, total: None

    def run(self, cells: list[Cell], references: dict[str, Cell]) -> None:
        """Rounds until every cell has stopped; the references (by group) run in each round
        while a cell of their group is still going."""
        rng = random.Random(f"{self.batch}:{self.seed}")
        for cell in cells:  # rounds a killed sweep left may be enough already
            cell.stop = cell.stop or finished(cell, self.drift, self.plan)
            if cell.stop:
                self.on_done(cell)
        round_no = 0
        while any(c.stop is None for c in cells):
            active = [c for c in cells if c.stop is None]
            order = active + [r for g, r in references.items() if any(c.group == g for c in active)]
            rng.shuffle(order)
            for cell in order:
                self._burst(cell, round_no)
            self._anchor(references)
            for cell in active:
                if cell.stop is None:
                    cell.stop = finished(cell, self.drift, self.plan)
                    if cell.stop:
                        self.on_done(cell)
            round_no += 1
            self.progress(sum(c.stop is not None for c in cells), len(cells))

    def _burst(self, cell: Cell, round_no: int) -> None:
        if cell.stop is not None:
            return
        try:
            r = self.measure(cell, round_no)
        except MeasureError as e:
            cell.faults += 1
            if not self.on_fault(cell, e):
                cell.stop = "failed"
            return
        cell.add(float(r["median_ms"]), (self.batch, round_no), r.get("raw_ms") or [])
        cell.results.append(r)
        self.on_round(cell, round_no, r)

    def _anchor(self, references: dict[str, Cell]) -> None:
        """Each reference's last round into the drift table; its first round in the store is
        the anchor (a constant scale: its own noise moves every normalised cell alike)."""
        for group, ref in references.items():
            if ref.tags and ref.tags[-1][0] == self.batch:
                self.drift.rounds[(group, *ref.tags[-1])] = ref.medians[-1]
                if group not in self.drift.anchors:
                    self.drift.anchors[group] = ref.medians[0]
