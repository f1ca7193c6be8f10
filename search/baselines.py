"""The hand-made baselines the search must beat, on the same axes: the full model, uniform
width pruning (every layer kept, MLP width cut uniformly), and layer dropping (full width,
the least influential layers removed)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from predictor.features import ConfigBatch
from predictor.workload import LatencyObjective
from subnets.config import SubnetConfig


def baseline_configs(ws: Any, width_points: int = 8, depth_points: int = 8) -> dict[str, list[SubnetConfig]]:
    d, bid = ws.space.dims, ws.space.base_id
    neurons = ws.space.neuron_choices()
    step = max(1, len(neurons) // width_points)
    widths = sorted(set(neurons[::-step][:width_points]), reverse=True)
    L = d.num_layers
    depths = sorted({max(1, round(L * (1 - 0.5 * i / depth_points))) for i in range(1, depth_points + 1)}, reverse=True)
    return {
        "full model": [ws.space.full()],
        "uniform width": [SubnetConfig.uniform(bid, range(L), d.num_kv_heads, d.heads_per_group, n) for n in widths],
        "layer dropping": [SubnetConfig.uniform(bid, ws.importance.kept_layers(k), d.num_kv_heads, d.heads_per_group,
                                                d.intermediate_size) for k in depths],
    }


def evaluate_baselines(ws: Any, objective: LatencyObjective, quality: Callable[[SubnetConfig], float],
                       budget_ms: float | None = None, **kw: Any) -> dict[str, list[dict[str, Any]]]:
    """Each baseline's points, predicted and judged for quality; with ``budget_ms`` only the
    full model is judged over the budget (as in the search, a point the bound puts over the
    budget is not worth a perplexity evaluation: at several precisions they are most of them)."""
    out: dict[str, list[dict[str, Any]]] = {}
    for name, configs in baseline_configs(ws, **kw).items():
        batch = ConfigBatch.from_configs(configs, ws.space.dims.num_layers)
        lat, up = objective.predict_both(batch)
        out[name] = [{"summary": c.summary(), "config_hash": c.config_hash(), "config": c.to_dict(),
                      "perplexity": quality(c), "latency_ms": float(v), "upper_ms": float(u)}
                     for c, v, u in zip(configs, lat, up)
                     if budget_ms is None or name == "full model" or u <= budget_ms]
    return out


def compare_at_matched_quality(front: list[dict[str, Any]], baselines: dict[str, list[dict[str, Any]]],
                               budget_ms: float) -> list[dict[str, Any]]:
    """For each baseline point under the budget (by the same rule as the search: its
    predicted upper bound): the fastest searched point at least as good in perplexity, and how
    much faster it is."""
    rows = []
    for name, pts in baselines.items():
        for b in pts:
            if b.get("upper_ms", b["latency_ms"]) > budget_ms:
                continue
            better = [p for p in front if p["perplexity"] <= b["perplexity"]]
            if not better:
                rows.append({"baseline": name, "summary": b["summary"], "baseline_ppl": b["perplexity"],
                             "baseline_ms": b["latency_ms"], "searched_ms": None, "reduction": None})
                continue
            p = min(better, key=lambda x: x["latency_ms"])
            rows.append({"baseline": name, "summary": b["summary"], "baseline_ppl": b["perplexity"],
                         "baseline_ms": b["latency_ms"], "searched_ms": p["latency_ms"], "searched_ppl": p["perplexity"],
                         "searched": p["summary"], "reduction": 1 - p["latency_ms"] / b["latency_ms"]})
    return rows
