"""Sub-networks as search parameters, and back.

The genome: how many layers to keep (the top-k by block influence, in order) and, per base
layer, its KV groups, query heads per group and MLP width (ignored for dropped layers). The
``uniform`` granularity has one width triple for all layers. ``tapered`` has one triple plus a
taper: the MLP width of each kept layer moves ``taper`` steps up (the most influential kept
layer) to ``taper`` steps down (the least), linearly in its block-influence rank, so the
genome stays 5 genes yet spends width where the layers matter; per-layer sub-networks that
a few dozen evaluations can search, where 91 independent genes are mostly noise."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from predictor.features import ConfigBatch
from subnets.config import LayerChoice, SubnetConfig
from subnets.space import SearchSpace


@dataclass
class Encoding:
    space: SearchSpace
    layer_ranking: list[int]
    granularity: str = "per-layer"

    def __post_init__(self) -> None:
        self.neurons = self.space.neuron_choices()

    @property
    def n_layers(self) -> int:
        return self.space.dims.num_layers

    @property
    def shared(self) -> bool:
        """One width triple for every layer (uniform, tapered)."""
        return self.granularity in ("uniform", "tapered")

    @property
    def max_taper(self) -> int:
        return self.space.max_taper

    def _width_keys(self) -> list[int]:
        return [0] if self.shared else list(range(self.n_layers))

    def suggest(self, trial: Any) -> dict[str, int]:
        d = self.space.dims
        params = {"layers": trial.suggest_int("layers", self.space.min_layers, d.num_layers)}
        for i in self._width_keys():
            params[f"g{i}"] = trial.suggest_int(f"g{i}", 1, d.num_kv_heads)
            params[f"h{i}"] = trial.suggest_int(f"h{i}", 1, d.heads_per_group)
            params[f"n{i}"] = trial.suggest_int(f"n{i}", 0, len(self.neurons) - 1)
        if self.granularity == "tapered":
            params["taper"] = trial.suggest_int("taper", -self.max_taper, self.max_taper)
        return params

    def decode(self, params: dict[str, int]) -> SubnetConfig:
        if self.granularity == "tapered":
            return self.space.tapered(self.layer_ranking, int(params["layers"]), int(params["g0"]), int(params["h0"]),
                                      int(params["n0"]), int(params["taper"]))
        top = self.layer_ranking[: int(params["layers"])]
        out = []
        for layer in sorted(top):
            key = 0 if self.shared else layer
            n = int(params[f"n{key}"])
            out.append(LayerChoice(layer, int(params[f"g{key}"]), int(params[f"h{key}"]), self.neurons[n]))
        return SubnetConfig(self.space.base_id, tuple(out))

    def encode(self, config: SubnetConfig) -> dict[str, int]:
        """Parameters for a config whose kept layers are a top-k of the ranking (uniform
        widths for the shared genomes: the taper is 0)."""
        params = {"layers": len(config.layers)}
        by_layer = {lc.layer: lc for lc in config.layers}
        first = config.layers[0]
        for i in self._width_keys():
            lc = by_layer.get(i, first) if not self.shared else first
            params[f"g{i}"], params[f"h{i}"] = lc.kv_groups, lc.heads_per_group
            params[f"n{i}"] = int(np.argmin([abs(n - lc.neurons) for n in self.neurons]))
        if self.granularity == "tapered":
            params["taper"] = 0
        return params

    def mutate(self, params: dict[str, int], rng: np.random.Generator, rate: float = 0.1) -> dict[str, int]:
        """A neighbour: each gene moves one step with probability ``rate`` (at least one moves)."""
        d = self.space.dims
        bounds = {"layers": (self.space.min_layers, d.num_layers)}
        for i in self._width_keys():
            bounds[f"g{i}"] = (1, d.num_kv_heads)
            bounds[f"h{i}"] = (1, d.heads_per_group)
            bounds[f"n{i}"] = (0, len(self.neurons) - 1)
        if self.granularity == "tapered":
            bounds["taper"] = (-self.max_taper, self.max_taper)
        out = dict(params)
        keys = list(bounds)
        moved = [k for k in keys if rng.random() < rate] or [keys[int(rng.integers(len(keys)))]]
        for k in moved:
            lo, hi = bounds[k]
            out[k] = int(min(hi, max(lo, out[k] + (1 if rng.random() < 0.5 else -1) * (1 + int(rng.random() < 0.3)))))
        return out

    def batch(self, configs: list[SubnetConfig]) -> ConfigBatch:
        return ConfigBatch.from_configs(configs, self.n_layers)
