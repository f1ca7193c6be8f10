"""Measure chosen sub-networks on the device and set the measured workload latency beside
the predicted one; the measurements go into the store, so the next predictor learns there.

Verification measures the way the predictor's training data was measured (threads,
back-end, timing, pairing, weights, opset), read from the predictor's own record: a
prediction checked against a number taken under other settings checks nothing."""

from __future__ import annotations

from typing import Any

import numpy as np

from predictor.workload import LatencyObjective
from profiler.database import Location
from profiler.hosts import resolve_host
from profiler.rounds import RoundsPlan
from profiler.store import Store
from profiler.sweep import Profiler, SweepSpec
from profiler.targets import make_target
from subnets.config import SubnetConfig
from subnets.errors import EdgenasError


class VerifyError(EdgenasError):
    """Verification cannot reproduce how the predictor's data was measured."""


def pick_spread(front: list[dict[str, Any]], k: int) -> list[dict[str, Any]]:
    """k front points spread evenly over latency."""
    if k >= len(front):
        return list(front)
    idx = sorted({round(i * (len(front) - 1) / max(1, k - 1)) for i in range(k)})
    return [front[i] for i in idx]


def pick_useful(front: list[dict[str, Any]], k: int, max_perplexity: float) -> list[dict[str, Any]]:
    """k front points worth measuring: only those at or under ``max_perplexity``; the best
    one under the budget first (the point a user would ship), then the rest spread evenly
    over latency."""
    useful = sorted((p for p in front if p["perplexity"] <= max_perplexity), key=lambda p: p["latency_ms"])
    if not useful or k < 1:
        return []
    best = min(useful, key=lambda p: p["perplexity"])
    rest = [p for p in useful if p is not best]
    return [best, *pick_spread(rest, k - 1)] if k > 1 else [best]


def verification_spec(objective: LatencyObjective, full_hash: str) -> SweepSpec:
    """The sweep settings that reproduce the predictors' recorded measurement settings."""
    wl = objective.workload
    past = tuple(int(p) for p in wl.decode_points())
    phases = ("prefill", "decode") if past else ("prefill",)
    recs = [objective.measured_as.get(ph) or {} for ph in phases]
    missing = [ph for ph, r in zip(phases, recs) if not r.get("protocol_record") or r.get("threads") is None]
    if missing:
        raise VerifyError(f"the {' and '.join(missing)} predictor does not record how its data was measured "
                          "(threads, back-end, protocol)",
                          "retrain it with this edgenas (train-predictor), then search again with --verify")
    keyset = {(r["threads"], r["backend"]) for r in recs}
    if len(keyset) > 1:
        raise VerifyError(f"the prefill and decode predictors were trained on different settings ({sorted(keyset)})",
                          "train both phases from one sweep's measurements (train-predictor --threads/--backend)")
    threads, tag = keyset.pop()
    backend, _, variant = str(tag).partition(":")
    pro = [r["protocol_record"] for r in recs]
    base = pro[0]
    for key in ("weights", "paired", "companion", "graph_opt", "opset", "schedule"):
        if len({str(p.get(key)) for p in pro}) > 1:
            raise VerifyError(f"the prefill and decode predictors were measured with different {key}",
                              "train both phases from one sweep's measurements")
    if base.get("paired") and base.get("companion") != full_hash:
        raise VerifyError("the predictor's measurements were paired with a companion other than the full model",
                          "verify with profile-device --paired and the same companion, then compare by hand")
    precision, block = _precision(backend, variant, base.get("precision"))
    ngl = [int(v[3:]) for v in variant.split(":") if v.startswith("ngl")]
    return SweepSpec(gpu_layers=ngl[0] if ngl else 0, graph="fused" if "fused" in variant.split(":") else "plain",
                     phases=phases, seq_lens=(wl.prompt_len,), past_lens=past or (1,), threads=int(threads),
                     backend=backend, reference_every=0, weights=base.get("weights", "none"),
                     paired=bool(base.get("paired")), graph_opt=base.get("graph_opt", "all"),
                     precision=precision, block_size=block, opset=int(base.get("opset") or 17),
                     phase_timing={ph: dict(p.get("timing") or {}) for ph, p in zip(phases, pro)},
                     rounds=RoundsPlan(**base["schedule"]) if base.get("schedule") else None)


def _precision(backend: str, variant: str, recorded: str | None) -> tuple[str | None, int]:
    """(SweepSpec precision, int4 block size) from a protocol's recorded precision."""
    if backend in ("trt", "trtexec"):
        return recorded or variant or "fp16", 32
    if recorded and recorded.startswith("int4-b"):
        return "int4", int(recorded[len("int4-b"):].split("-")[0])
    return (recorded.split("-")[0] if recorded else recorded), 32


def verify(ws: Any, objective: LatencyObjective, points: list[dict[str, Any]], host: str, db: Location,
           budget_ms: float) -> list[dict[str, Any]]:
    wl = objective.workload
    spec = verification_spec(objective, ws.space.full().config_hash())
    past = tuple(int(p) for p in wl.decode_points())
    configs = [SubnetConfig.from_dict(p["config"]) for p in points]
    store = Store(db)
    try:
        summary = Profiler(ws, make_target(resolve_host(host)), store, spec).run(configs)
        rows = {(r["subnet_hash"], r["phase"], r["seq_len"], r["past_len"], r["protocol"]): r["median_ms"]
                for r in store.measurement_rows(device=summary.fingerprint)}
    finally:
        store.close()
    proto = {ph: (objective.measured_as.get(ph) or {}).get("protocol") for ph in spec.phases}
    out = []
    for p, c in zip(points, configs):
        h = c.config_hash()
        pre = rows.get((h, "prefill", wl.prompt_len, 0, proto["prefill"]))
        dec = [rows.get((h, "decode", 1, q, proto.get("decode"))) for q in past]
        if pre is None or any(v is None for v in dec):
            out.append(dict(p, measured_ms=None, error="not measured under the predictor's protocol "
                            "(failed, or the board's runtime now exports another opset)"))
            continue
        measured = float(wl.total(np.array([pre]), [np.array([v]) for v in dec])[0]) if past else pre
        out.append(dict(p, measured_ms=measured, error_pct=p["latency_ms"] / measured - 1,
                        meets_budget=measured <= budget_ms))
    return out


def measure_variant(ws: Any, objective: LatencyObjective, config: SubnetConfig, host: str, db: Location,
                    **changes: Any) -> float | None:
    """``config`` measured as ``objective``'s data was (its protocol) but with the sweep
    settings ``changes`` (a precision ``mix``, or another ``precision`` and its ``weights``):
    the workload latency, or None when a cell failed. Stored under that variant's back-end tag
    (``llama.cpp:mix-<digest>``, ``llama.cpp:q4_k_m``, ...)."""
    from dataclasses import replace

    wl = objective.workload
    spec = replace(verification_spec(objective, ws.space.full().config_hash()), **changes)
    store = Store(db)
    try:
        summary = Profiler(ws, make_target(resolve_host(host)), store, spec).run([config])
        latest = {(r["phase"], r["seq_len"], r["past_len"]): r["median_ms"]
                  for r in store.measurement_rows(device=summary.fingerprint)
                  if r["subnet_hash"] == config.config_hash() and r["backend"] == spec.backend_tag}
    finally:
        store.close()
    past = tuple(int(p) for p in wl.decode_points())
    pre = latest.get(("prefill", wl.prompt_len, 0))
    dec = [latest.get(("decode", 1, q)) for q in past]
    if pre is None or any(v is None for v in dec):
        return None
    return float(wl.total(np.array([pre]), [np.array([v]) for v in dec])[0]) if past else float(pre)


def measure_on_device(deps: dict[str, Any], host: str, db: Location, budget_ms: float) -> Any:
    """``search.recommendation.Measure`` on ``host``: a candidate's workload latency measured as
    its precision's predictor data was (a precision mix: as its high type's), and whether it
    meets ``budget_ms``."""
    from export.mix import PrecisionMix

    def measure(c: Any) -> tuple[float | None, bool | None]:
        config = SubnetConfig.from_dict(c.config)
        if c.mix is not None:
            d = deps[c.precision.split("+")[0]]
            ms = measure_variant(d.ws, d.objective, config, host, db, mix=PrecisionMix.from_dict(c.mix))
        else:
            d = deps[c.precision]
            point = {"config": c.config, "summary": c.summary, "latency_ms": c.predicted_ms}
            ms = verify(d.ws, d.objective, [point], host, db, budget_ms)[0].get("measured_ms")
        return ms, None if ms is None else ms <= budget_ms

    return measure
