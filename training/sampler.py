"""Which sub-networks one training step runs: the strategy (standard, random, sandwich) over
a pool restricted to a range of latency, drawn evenly over latency bins.

Training goes where the search will look: the pool is sampled from the search space (the
top-k layers by block influence, as the search keeps them; widths uniform or per layer),
scored by the device's predicted workload latency (or, without a predictor, by analytic
workload MACs), kept when its share of the full model's lies in ``latency_range``, and
binned; a random member is drawn from a random non-empty bin, so small and large
sub-networks are trained equally often. "Smallest" is the pool's fastest member, not a
1-layer model. Draws depend only on (seed, step): a resumed run samples what the
uninterrupted run would have."""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from subnets.config import SubnetConfig
from subnets.cost import cost
from subnets.errors import ConfigError
from subnets.space import SearchSpace

STRATEGIES = ("sandwich", "random", "standard")
LatencyFn = Callable[[Sequence[SubnetConfig]], np.ndarray]


def analytic_latency(space: SearchSpace, prompt_len: int = 128, gen_tokens: int = 64) -> LatencyFn:
    """Workload MACs (prefill of S tokens plus N decode steps at the middle past length): a
    device-free stand-in for latency when no predictor is given."""
    dims = space.dims
    mid = prompt_len + gen_tokens // 2

    def fn(configs: Sequence[SubnetConfig]) -> np.ndarray:
        return np.array([cost(c, dims, "prefill", prompt_len).macs + gen_tokens * cost(c, dims, "decode", 1, mid).macs
                         for c in configs], dtype=np.float64)

    return fn


def predictor_latency(objective: object, num_layers: int) -> LatencyFn:
    """Predicted workload latency through a device's predictors (``LatencyObjective``)."""
    from predictor.features import ConfigBatch

    def fn(configs: Sequence[SubnetConfig]) -> np.ndarray:
        return np.asarray(objective.predict(ConfigBatch.from_configs(list(configs), num_layers)), dtype=np.float64)

    return fn


def parse_range(text: str) -> tuple[float, float]:
    try:
        lo, hi = (float(x) for x in text.split(","))
    except ValueError:
        raise ConfigError(f"--latency-range {text!r} is not 'LO,HI'",
                          "give two shares of the full model's latency, e.g. --latency-range 0.5,1.0") from None
    if not (0 < lo < hi <= 1):
        raise ConfigError(f"--latency-range {text!r} is outside (0, 1] or not increasing",
                          "give 0 < LO < HI <= 1, e.g. --latency-range 0.5,1.0")
    return lo, hi


@dataclass
class SubnetSampler:
    space: SearchSpace
    layer_ranking: list[int]
    latency: LatencyFn
    strategy: str = "sandwich"
    k: int = 2
    latency_range: tuple[float, float] = (0.5, 1.0)
    bins: int = 8
    pool_size: int = 3000
    seed: int = 0
    pool: list[SubnetConfig] = field(default_factory=list, init=False)
    shares: np.ndarray = field(default_factory=lambda: np.zeros(0), init=False)
    bin_members: list[np.ndarray] = field(default_factory=list, init=False)

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise ConfigError(f"unknown strategy {self.strategy!r}", f"use one of {', '.join(STRATEGIES)}")
        if self.strategy != "standard":
            self._build_pool()

    def _build_pool(self) -> None:
        rng = random.Random(self.seed)
        cands: dict[str, SubnetConfig] = {}
        for i in range(self.pool_size):
            gran = "uniform" if i % 2 == 0 else "per-layer"
            c = self.space.sample_one(rng, gran, self.layer_ranking)
            cands.setdefault(c.config_hash(), c)
        configs = sorted(cands.values(), key=lambda c: c.config_hash())
        full = float(self.latency([self.space.full()])[0])
        shares = self.latency(configs) / full
        lo, hi = self.latency_range
        keep = (shares >= lo) & (shares <= hi)
        if not keep.any():
            raise ConfigError(
                f"no sub-network of {len(configs)} sampled lies within {lo:.0%}-{hi:.0%} of the full model's latency",
                "widen --latency-range (the smallest sub-networks reach about "
                f"{shares.min():.0%} of the full model)")
        self.pool = [c for c, k in zip(configs, keep) if k]
        self.shares = shares[keep]
        edges = np.linspace(lo, hi, self.bins + 1)
        which = np.clip(np.searchsorted(edges, self.shares, side="right") - 1, 0, self.bins - 1)
        self.bin_members = [np.flatnonzero(which == b) for b in range(self.bins)]
        self.bin_members = [m for m in self.bin_members if len(m)]

    @property
    def largest(self) -> SubnetConfig:
        if self.latency_range[1] >= 1.0 or not self.pool:
            return self.space.full()
        return self.pool[int(np.argmax(self.shares))]

    @property
    def smallest(self) -> SubnetConfig:
        return self.pool[int(np.argmin(self.shares))]

    def draw(self, rng: np.random.Generator) -> SubnetConfig:
        members = self.bin_members[int(rng.integers(len(self.bin_members)))]
        return self.pool[int(members[int(rng.integers(len(members)))])]

    def configs(self, step: int) -> list[SubnetConfig]:
        """The step's sub-networks, the largest first (the in-place teacher)."""
        if self.strategy == "standard":
            return [self.space.full()]
        rng = np.random.default_rng([self.seed, step])
        drawn = [self.draw(rng) for _ in range(self.k)]
        if self.strategy == "random":
            return drawn
        return [self.largest, self.smallest, *drawn]


def latency_fn_for(space: SearchSpace, objective: object | None, workload: tuple[int, int]) -> LatencyFn:
    if objective is None:
        return analytic_latency(space, *workload)
    return predictor_latency(objective, space.dims.num_layers)
