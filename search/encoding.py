"""Sub-networks as search parameters, and back.

The genome: how many layers to keep (the top-k by block influence, in order) and, per base
layer, its KV groups, query heads per group and MLP width (ignored for dropped layers). The
``uniform`` granularity has one width triple for all layers."""

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

    def _width_keys(self) -> list[int]:
        return [0] if self.granularity == "uniform" else list(range(self.n_layers))

    def suggest(self, trial: Any) -> dict[str, int]:
        d = self.space.dims
        params = {"layers": trial.suggest_int("layers", self.space.min_layers, d.num_layers)}
        for i in self._width_keys():
            params[f"g{i}"] = trial.suggest_int(f"g{i}", 1, d.num_kv_heads)
            params[f"h{i}"] = trial.suggest_int(f"h{i}", 1, d.heads_per_group)
            params[f"n{i}"] = trial.suggest_int(f"n{i}", 0, len(self.neurons) - 1)
        return params

    def decode(self, params: dict[str, int]) -> SubnetConfig:
        kept = sorted(self.layer_ranking[: int(params["layers"])])
        out = []
        for layer in kept:
            k = 0 if self.granularity == "uniform" else layer
            out.append(LayerChoice(layer, int(params[f"g{k}"]), int(params[f"h{k}"]), self.neurons[int(params[f"n{k}"])]))
        return SubnetConfig(self.space.base_id, tuple(out))

    def encode(self, config: SubnetConfig) -> dict[str, int]:
        """Parameters for a config whose kept layers are a top-k of the ranking."""
        params = {"layers": len(config.layers)}
        by_layer = {lc.layer: lc for lc in config.layers}
        first = config.layers[0]
        for i in self._width_keys():
            lc = by_layer.get(i, first) if self.granularity != "uniform" else first
            params[f"g{i}"], params[f"h{i}"] = lc.kv_groups, lc.heads_per_group
            params[f"n{i}"] = int(np.argmin([abs(n - lc.neurons) for n in self.neurons]))
        return params

    def mutate(self, params: dict[str, int], rng: np.random.Generator, rate: float = 0.1) -> dict[str, int]:
        """A neighbour: each gene moves one step with probability ``rate`` (at least one moves)."""
        d = self.space.dims
        bounds = {"layers": (self.space.min_layers, d.num_layers)}
        for i in self._width_keys():
            bounds[f"g{i}"] = (1, d.num_kv_heads)
            bounds[f"h{i}"] = (1, d.heads_per_group)
            bounds[f"n{i}"] = (0, len(self.neurons) - 1)
        out = dict(params)
        keys = list(bounds)
        moved = [k for k in keys if rng.random() < rate] or [keys[int(rng.integers(len(keys)))]]
        for k in moved:
            lo, hi = bounds[k]
            out[k] = int(min(hi, max(lo, out[k] + (1 if rng.random() < 0.5 else -1) * (1 + int(rng.random() < 0.3)))))
        return out

    def batch(self, configs: list[SubnetConfig]) -> ConfigBatch:
        return ConfigBatch.from_configs(configs, self.n_layers)
