"""Per-layer precision sensitivity: how much perplexity each tensor group costs at a lower
weight type, measured once per (sub-network, runtime, types, held-out tokens) and cached.

The groups are the embedding / LM head and, per kept layer, its attention projections and
its MLP. The reference is every group at the ``high`` type; each measurement moves one group
alone to a lower type. Single-group effects are small and do not add up exactly (a probe on
SmolLM2 found their sum under-predicts a mix), so they rank and seed the allocation
(``search.mix_allocation``); the mixes it proposes are evaluated as wholes."""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from export.mix import PrecisionMix
from export.quantize import MixArithmetic
from subnets.config import SubnetConfig
from subnets.paths import cache_dir

log = logging.getLogger(__name__)

HEAD = "head"


def groups_of(num_layers: int) -> list[str]:
    """The tensor groups of a sub-network with ``num_layers`` kept layers."""
    return [HEAD, *(f"{part}.{i}" for i in range(num_layers) for part in ("attn", "mlp"))]


def allowed(runtime: str, group: str, kind: str) -> bool:
    """Whether the runtime runs ``group`` at ``kind`` (onnxruntime keeps the head fp32)."""
    from export.mix import HEAD_MENUS, MENUS

    return kind in (HEAD_MENUS if group == HEAD else MENUS)[runtime]


def mix_of(assignment: dict[str, str], runtime: str, high: str, num_layers: int, block_size: int = 32) -> PrecisionMix:
    """The mix that puts each named group at its type and every other group at ``high``."""
    kinds = {g: assignment.get(g, high) for g in groups_of(num_layers)}
    return PrecisionMix(runtime, kinds[HEAD], tuple(kinds[f"attn.{i}"] for i in range(num_layers)),
                        tuple(kinds[f"mlp.{i}"] for i in range(num_layers)), block_size)


@dataclass
class Sensitivity:
    runtime: str
    high: str
    lows: tuple[str, ...]
    config: dict[str, Any]
    quality_id: str
    base_perplexity: float
    # group -> lower type -> perplexity with that group alone at that type
    perplexity: dict[str, dict[str, float]] = field(default_factory=dict)

    @property
    def num_layers(self) -> int:
        return len(self.config["layers"])

    def cost(self, group: str, kind: str) -> float:
        """Log-perplexity added by ``group`` at ``kind`` (0 at the high type; never below 0:
        a group that measured better when quantized is noise, not a gain)."""
        import math

        if kind == self.high:
            return 0.0
        if kind not in self.perplexity.get(group, {}):
            return math.inf  # not measured: the runtime does not run this group at this type
        return max(0.0, math.log(self.perplexity[group][kind] / self.base_perplexity))

    def ranked(self, kind: str) -> list[str]:
        """The groups that can take ``kind``, most sensitive to it first."""
        return sorted((g for g in self.perplexity if kind in self.perplexity[g]), key=lambda g: -self.cost(g, kind))

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["lows"] = list(self.lows)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Sensitivity:
        return cls(d["runtime"], d["high"], tuple(d["lows"]), d["config"], d["quality_id"],
                   float(d["base_perplexity"]), {g: {k: float(v) for k, v in t.items()} for g, t in d["perplexity"].items()})


def _cache_file(ws: Any, config: SubnetConfig, runtime: str, high: str, lows: tuple[str, ...],
                block_size: int) -> Path:
    key = json.dumps({"quality": ws.quality_id(), "config": config.config_hash(), "runtime": runtime, "high": high,
                      "lows": list(lows), "block": block_size}, sort_keys=True)
    return cache_dir() / "sensitivity" / f"{hashlib.sha256(key.encode()).hexdigest()[:20]}.json"


def measure_sensitivity(ws: Any, config: SubnetConfig, runtime: str, high: str, lows: tuple[str, ...],
                        block_size: int = 32, progress: Callable[[int, int], None] | None = None,
                        cache: bool = True) -> Sensitivity:
    """Each group of ``config`` alone at each of ``lows`` (the rest at ``high``), judged on the
    workspace's held-out tokens as the runtime computes. Partial results are kept in the cache
    file as they come, so an interrupted measurement resumes."""
    L = len(config.layers)
    path = _cache_file(ws, config, runtime, high, lows, block_size)
    done = Sensitivity.from_dict(json.loads(path.read_text())) if cache and path.is_file() else None

    def ppl(assignment: dict[str, str]) -> float:
        mix = mix_of(assignment, runtime, high, L, block_size)
        return ws.at_precision(MixArithmetic(mix)).perplexity(config)

    if done is None:
        done = Sensitivity(runtime, high, tuple(lows), config.to_dict(), ws.quality_id(), ppl({}))
    pairs = [(g, k) for g in groups_of(L) for k in lows if allowed(runtime, g, k)]
    todo = [(g, k) for g, k in pairs if k not in done.perplexity.get(g, {})]
    total = len(pairs)
    for n, (group, kind) in enumerate(todo, total - len(todo) + 1):
        done.perplexity.setdefault(group, {})[kind] = ppl({group: kind})
        if cache:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(done.to_dict(), indent=1))
        if progress:
            progress(n, total)
    return done
