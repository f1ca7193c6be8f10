"""Sub-network configs: which layers, KV groups, query heads and MLP neurons to keep.

A config names counts, not unit indices: extraction keeps the most important units of each
kind (see ``subnets.importance``), so the config is what the search varies and what the
latency predictor sees."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from subnets.errors import ConfigError

CONFIG_SCHEMA = 1


@dataclass(frozen=True)
class LayerChoice:
    """What one kept base layer keeps."""

    layer: int
    kv_groups: int
    heads_per_group: int
    neurons: int

    @property
    def num_heads(self) -> int:
        return self.kv_groups * self.heads_per_group

    def to_dict(self) -> dict[str, int]:
        return {
            "layer": self.layer,
            "kv_groups": self.kv_groups,
            "heads_per_group": self.heads_per_group,
            "neurons": self.neurons,
        }


@dataclass(frozen=True)
class SubnetConfig:
    """A sub-network of the base model ``base_id``: its kept layers in order, each with its
    own sizes."""

    base_id: str
    layers: tuple[LayerChoice, ...]

    @classmethod
    def uniform(
        cls, base_id: str, layers: Iterable[int], kv_groups: int, heads_per_group: int, neurons: int
    ) -> SubnetConfig:
        return cls(
            base_id, tuple(LayerChoice(int(i), kv_groups, heads_per_group, neurons) for i in layers)
        )

    @property
    def is_uniform(self) -> bool:
        return len({(c.kv_groups, c.heads_per_group, c.neurons) for c in self.layers}) <= 1

    @property
    def layer_indices(self) -> tuple[int, ...]:
        return tuple(c.layer for c in self.layers)

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema": CONFIG_SCHEMA,
            "base_id": self.base_id,
            "layers": [c.to_dict() for c in self.layers],
        }

    def to_json(self) -> str:
        """Canonical JSON: sorted keys, no whitespace, so equal configs hash equally."""
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))

    def config_hash(self) -> str:
        return hashlib.sha256(self.to_json().encode()).hexdigest()[:16]

    def summary(self) -> str:
        if self.is_uniform and self.layers:
            c = self.layers[0]
            return (
                f"{len(self.layers)}L x {c.kv_groups}g*{c.heads_per_group}h x {c.neurons}n"
            )
        heads = sum(c.num_heads for c in self.layers)
        neurons = sum(c.neurons for c in self.layers)
        return f"{len(self.layers)}L per-layer ({heads} heads, {neurons} neurons)"

    @classmethod
    def from_dict(cls, d: Any) -> SubnetConfig:
        """Parse a config dict; shape errors become a ConfigError naming the field."""
        if not isinstance(d, dict):
            raise ConfigError(
                f"a config must be a JSON object, got {type(d).__name__}",
                "write {\"base_id\": ..., \"layers\": [{\"layer\": 0, ...}, ...]}",
            )
        schema = d.get("schema", CONFIG_SCHEMA)
        if schema != CONFIG_SCHEMA:
            raise ConfigError(
                f"config schema {schema!r} is not supported (this edgenas reads {CONFIG_SCHEMA})",
                "regenerate the config with `edgenas sample`",
            )
        if not isinstance(d.get("base_id"), str):
            raise ConfigError("config has no string field 'base_id'", "add the base model id printed by `edgenas space`")
        layers = d.get("layers")
        if not isinstance(layers, list):
            raise ConfigError("config has no list field 'layers'", "add 'layers': [{...}, ...]")
        out = []
        for i, item in enumerate(layers):
            if not isinstance(item, dict):
                raise ConfigError(f"layers[{i}] is not an object", "each layer is {\"layer\", \"kv_groups\", \"heads_per_group\", \"neurons\"}")
            vals = {}
            for key in ("layer", "kv_groups", "heads_per_group", "neurons"):
                v = item.get(key)
                if not isinstance(v, int) or isinstance(v, bool):
                    raise ConfigError(
                        f"layers[{i}].{key} is {v!r}, not an integer",
                        f"give '{key}' as an integer",
                    )
                vals[key] = v
            extra = set(item) - set(vals)
            if extra:
                raise ConfigError(f"layers[{i}] has unknown fields {sorted(extra)}", "remove them")
            out.append(LayerChoice(**vals))
        return cls(d["base_id"], tuple(out))

    @classmethod
    def from_json(cls, text: str) -> SubnetConfig:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(f"config is not valid JSON: {e}", "check the file's syntax") from None
        return cls.from_dict(data)
