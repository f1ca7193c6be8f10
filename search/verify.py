"""Measure chosen sub-networks on the device and set the measured workload latency beside
the predicted one; the measurements go into the store, so the next predictor learns there."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from predictor.workload import LatencyObjective
from profiler.hosts import resolve_host
from profiler.store import Store
from profiler.sweep import Profiler, SweepSpec
from profiler.targets import make_target
from subnets.config import SubnetConfig


def pick_spread(front: list[dict[str, Any]], k: int) -> list[dict[str, Any]]:
    """k front points spread evenly over latency."""
    if k >= len(front):
        return list(front)
    idx = sorted({round(i * (len(front) - 1) / max(1, k - 1)) for i in range(k)})
    return [front[i] for i in idx]


def verify(ws: Any, objective: LatencyObjective, points: list[dict[str, Any]], host: str, db: Path,
           budget_ms: float, threads: int = 1) -> list[dict[str, Any]]:
    wl = objective.workload
    past = tuple(int(p) for p in wl.decode_points())
    spec = SweepSpec(phases=("prefill", "decode") if past else ("prefill",), seq_lens=(wl.prompt_len,),
                     past_lens=past or (1,), threads=threads, reference_every=0, decode_min_time_s=3.0,
                     decode_sessions=3)
    configs = [SubnetConfig.from_dict(p["config"]) for p in points]
    store = Store(db)
    try:
        summary = Profiler(ws, make_target(resolve_host(host)), store, spec).run(configs)
        rows = {(r["subnet_hash"], r["phase"], r["seq_len"], r["past_len"]): r["median_ms"]
                for r in store.measurement_rows(device=summary.fingerprint)}
    finally:
        store.close()
    out = []
    for p, c in zip(points, configs):
        h = c.config_hash()
        pre = rows.get((h, "prefill", wl.prompt_len, 0))
        dec = [rows.get((h, "decode", 1, q)) for q in past]
        if pre is None or any(v is None for v in dec):
            out.append(dict(p, measured_ms=None, error="measurement failed"))
            continue
        import numpy as np

        measured = float(wl.total(np.array([pre]), [np.array([v]) for v in dec])[0]) if past else pre
        out.append(dict(p, measured_ms=measured, error_pct=p["latency_ms"] / measured - 1,
                        meets_budget=measured <= budget_ms))
    return out
