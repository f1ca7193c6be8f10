"""The search space of a Llama-family decoder and seeded sampling of sub-networks in it."""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from subnets.config import LayerChoice, SubnetConfig
from subnets.dims import BaseDims
from subnets.errors import ConfigError

# One vocabulary for every command: "tapered" (the default) is one KV-group/head/width triple
# for the kept layers plus a width taper along their influence rank; "uniform" the triple
# alone; "per-layer" an independent triple per layer.
Granularity = Literal["tapered", "uniform", "per-layer"]
GRANULARITIES = ("tapered", "uniform", "per-layer")
DEFAULT_GRANULARITY = "tapered"
Strategy = Literal["uniform", "stratified"]

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")


@dataclass(frozen=True)
class SearchSpace:
    """Per layer: keep or drop the layer; keep 1..G KV groups and 1..H/G query heads in each
    kept group (so the layer stays a valid GQA layer); keep MLP neurons in multiples of
    ``neuron_step`` (the hardware-friendly structured-sparsity step)."""

    base_id: str
    dims: BaseDims
    neuron_step: int = 64
    min_layers: int = 1

    def __post_init__(self) -> None:
        if self.neuron_step < 1:
            raise ConfigError(
                f"neuron step {self.neuron_step} is not positive", "use a step such as 16 or 64"
            )
        if self.dims.num_heads % self.dims.num_kv_heads:
            raise ConfigError(
                f"base model has {self.dims.num_heads} query heads, not a multiple of its "
                f"{self.dims.num_kv_heads} KV heads",
                "use a standard GQA/MHA Llama-family model",
            )

    # --- choices -------------------------------------------------------------------------
    def neuron_choices(self) -> list[int]:
        full = self.dims.intermediate_size
        step = min(self.neuron_step, full)
        choices = list(range(step, full + 1, step))
        if choices[-1] != full:
            choices.append(full)
        return choices

    def kv_group_choices(self) -> list[int]:
        return list(range(1, self.dims.num_kv_heads + 1))

    def heads_per_group_choices(self) -> list[int]:
        return list(range(1, self.dims.heads_per_group + 1))

    @property
    def max_taper(self) -> int:
        """How many neuron steps a tapered config's widths move away from its middle width."""
        return max(1, len(self.neuron_choices()) // 4)

    def tapered(self, layer_ranking: Sequence[int], k: int, kv_groups: int, heads_per_group: int, width: int,
                taper: int) -> SubnetConfig:
        """The top-``k`` layers of ``layer_ranking`` with one KV-group and head count, and MLP
        widths ``taper`` steps above the ``width``-th neuron choice for the most influential
        kept layer to ``taper`` steps below it for the least, linearly in rank: 5 numbers that
        spend width where the layers matter."""
        neurons = self.neuron_choices()
        top = list(layer_ranking[:k])
        rank = {layer: i for i, layer in enumerate(top)}
        out = []
        for layer in sorted(top):
            n = width
            if len(top) > 1:
                z = 1.0 - 2.0 * rank[layer] / (len(top) - 1)  # +1 the most influential kept layer, -1 the least
                n = int(min(len(neurons) - 1, max(0, width + round(taper * z))))
            out.append(LayerChoice(layer, kv_groups, heads_per_group, neurons[n]))
        return SubnetConfig(self.base_id, tuple(out))

    def log10_size(self, granularity: Granularity = "per-layer") -> float:
        """Decimal logarithm of the number of distinct sub-networks in the space."""
        per_layer = (
            len(self.kv_group_choices())
            * len(self.heads_per_group_choices())
            * len(self.neuron_choices())
        )
        n = self.dims.num_layers
        if granularity == "uniform":
            return math.log10(per_layer * sum(math.comb(n, k) for k in range(self.min_layers, n + 1)))
        # sum over kept-layer subsets of per_layer ** k
        total = sum(math.comb(n, k) * per_layer**k for k in range(self.min_layers, n + 1))
        return math.log10(total)

    # --- configs -------------------------------------------------------------------------
    def full(self) -> SubnetConfig:
        d = self.dims
        return SubnetConfig.uniform(
            self.base_id, range(d.num_layers), d.num_kv_heads, d.heads_per_group, d.intermediate_size
        )

    def validate(self, config: SubnetConfig) -> SubnetConfig:
        """Raise a ConfigError listing every way ``config`` does not fit this space."""
        d = self.dims
        problems: list[str] = []
        if config.base_id != self.base_id:
            problems.append(
                f"config is for base model {config.base_id!r}, not {self.base_id!r}"
            )
        if not config.layers:
            problems.append("config keeps no layers (empty layer list)")
        elif len(config.layers) < self.min_layers:
            problems.append(f"config keeps {len(config.layers)} layers, fewer than {self.min_layers}")
        seen: set[int] = set()
        prev = -1
        neuron_choices = set(self.neuron_choices())
        for pos, lc in enumerate(config.layers):
            where = f"layers[{pos}] (base layer {lc.layer})"
            if not 0 <= lc.layer < d.num_layers:
                problems.append(
                    f"layers[{pos}]: layer index {lc.layer} is out of range 0..{d.num_layers - 1}"
                )
            if lc.layer in seen:
                problems.append(f"{where}: layer listed twice")
            elif lc.layer < prev:
                problems.append(f"{where}: layers must be in increasing order")
            seen.add(lc.layer)
            prev = max(prev, lc.layer)
            if not 1 <= lc.kv_groups <= d.num_kv_heads:
                problems.append(
                    f"{where}: kv_groups={lc.kv_groups} breaks GQA: must be 1..{d.num_kv_heads}"
                )
            if not 1 <= lc.heads_per_group <= d.heads_per_group:
                problems.append(
                    f"{where}: heads_per_group={lc.heads_per_group} breaks GQA: must be "
                    f"1..{d.heads_per_group} (query heads per KV group in the base model)"
                )
            if lc.neurons > d.intermediate_size:
                problems.append(
                    f"{where}: neurons={lc.neurons} is above the base size {d.intermediate_size}"
                )
            elif lc.neurons not in neuron_choices:
                problems.append(
                    f"{where}: neurons={lc.neurons} is off the step: must be a multiple of "
                    f"{self.neuron_step} (or the full {d.intermediate_size})"
                )
        if problems:
            raise ConfigError(
                "invalid sub-network config:\n  - " + "\n  - ".join(problems),
                "fix the listed fields; `edgenas space` prints the allowed values",
            )
        return config

    # --- sampling ------------------------------------------------------------------------
    def sample_one(
        self,
        rng: random.Random,
        granularity: Granularity = "per-layer",
        layer_ranking: Sequence[int] | None = None,
    ) -> SubnetConfig:
        """One random sub-network. With ``layer_ranking`` (most important first) the kept
        layers are the top-k of that ranking, as extraction would keep them; else a random
        subset."""
        n = self.dims.num_layers
        k = rng.randint(self.min_layers, n)
        if granularity == "tapered":
            ranking = list(layer_ranking) if layer_ranking is not None else list(range(n))
            return self.tapered(ranking, k, rng.choice(self.kv_group_choices()), rng.choice(self.heads_per_group_choices()),
                                rng.randrange(len(self.neuron_choices())), rng.randint(-self.max_taper, self.max_taper))
        if layer_ranking is not None:
            layers = sorted(layer_ranking[:k])
        else:
            layers = sorted(rng.sample(range(n), k))
        kv, hpg, neu = self.kv_group_choices(), self.heads_per_group_choices(), self.neuron_choices()
        if granularity == "uniform":
            return SubnetConfig.uniform(
                self.base_id, layers, rng.choice(kv), rng.choice(hpg), rng.choice(neu)
            )
        if granularity != "per-layer":
            raise ConfigError(f"unknown granularity {granularity!r}", f"use one of {', '.join(GRANULARITIES)}")
        return SubnetConfig(
            self.base_id,
            tuple(LayerChoice(i, rng.choice(kv), rng.choice(hpg), rng.choice(neu)) for i in layers),
        )

    def sample(
        self,
        n: int,
        seed: int = 0,
        granularity: Granularity = "per-layer",
        strategy: Strategy = "uniform",
        bins: int = 10,
        layer_ranking: Sequence[int] | None = None,
    ) -> list[SubnetConfig]:
        """``n`` distinct sub-networks, reproducible from ``seed``.

        ``stratified`` is the calibrated sampling over parameter bins: candidates are drawn
        uniformly, binned by parameter count into ``bins`` equal-width bins, and taken from
        the bins in turn, so small and large sub-networks are equally represented (uniform
        sampling over per-layer choices concentrates near the mean size)."""
        if n < 1:
            raise ConfigError(f"asked for {n} samples", "ask for at least 1")
        from subnets.cost import count_params  # local: cost imports space's BaseDims

        rng = random.Random(seed)
        if strategy == "uniform":
            out: dict[str, SubnetConfig] = {}
            for _ in range(n * 50):
                c = self.sample_one(rng, granularity, layer_ranking)
                out.setdefault(c.config_hash(), c)
                if len(out) == n:
                    break
            return list(out.values())
        if strategy != "stratified":
            raise ConfigError(f"unknown sampling strategy {strategy!r}", "use 'uniform' or 'stratified'")
        pool: dict[str, SubnetConfig] = {}
        for _ in range(max(20 * n, 200)):
            c = self.sample_one(rng, granularity, layer_ranking)
            pool.setdefault(c.config_hash(), c)
        sized = sorted(pool.values(), key=lambda c: (count_params(c, self.dims), c.config_hash()))
        lo, hi = count_params(sized[0], self.dims), count_params(sized[-1], self.dims)
        width = max(1, (hi - lo) / bins)
        buckets: list[list[SubnetConfig]] = [[] for _ in range(bins)]
        for c in sized:
            buckets[min(bins - 1, int((count_params(c, self.dims) - lo) / width))].append(c)
        for b in buckets:
            rng.shuffle(b)
        picked: list[SubnetConfig] = []
        while len(picked) < n and any(buckets):
            for b in buckets:
                if b and len(picked) < n:
                    picked.append(b.pop())
        return picked

    def describe(self) -> dict[str, Any]:
        return {
            "base_id": self.base_id,
            "dims": self.dims.to_dict(),
            "layers": f"any ordered subset of 0..{self.dims.num_layers - 1}, at least {self.min_layers}",
            "kv_groups": self.kv_group_choices(),
            "heads_per_group": self.heads_per_group_choices(),
            "neurons": self.neuron_choices(),
            "neuron_step": self.neuron_step,
            "log10_size_uniform": round(self.log10_size("uniform"), 2),
            "log10_size_per_layer": round(self.log10_size("per-layer"), 2),
        }
