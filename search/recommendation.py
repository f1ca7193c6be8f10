"""What to ship for a budget: the recommended deployment (an architecture at a precision on a
runtime) beside the obvious ones a user would pick without this suite (the full model at each
precision, uniform width and layer dropping at each precision), all judged by one rule: the
predictor's upper bound within the latency budget and the perplexity within the ceiling, then
measured on the device. A recommendation whose measurement misses the budget is set aside
and the next best is measured, so what is recommended was seen to meet the budget.

When nothing is admissible the recommendation is empty and says which candidates came
nearest and what to relax; the caller exits non-zero."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from export.mix import BYTES_PER_WEIGHT, default_head, int4_bytes
from export.quantize import LLAMA_CPP_PRECISIONS
from subnets.config import SubnetConfig
from subnets.cost import count_params
from subnets.dims import BaseDims

SEARCHED = "searched"
FULL = "full model"
MIX = "precision mix"  # a per-layer mix of two types (search.mix_deployments): found, not obvious
# measures a candidate on the device: -> (measured ms or None when it could not be, meets the budget)
Measure = Callable[["Choice"], tuple["float | None", "bool | None"]]


def runtime_of(precision: str) -> str:
    return "llama.cpp" if precision in LLAMA_CPP_PRECISIONS else "onnxruntime"


def size_mb(config: SubnetConfig, dims: BaseDims, precision: str, block_size: int = 32) -> float:
    """Weights on disk at ``precision`` (block scales included), the embedding / LM head too;
    onnxruntime gathers the embedding from fp32, so a quantized LM head is a copy beside it."""
    runtime = runtime_of(precision)
    head_type = default_head(runtime, precision)

    def per_weight(kind: str) -> float:
        return int4_bytes(block_size) if kind == "int4" else BYTES_PER_WEIGHT[kind]

    head = dims.vocab_size * dims.hidden_size
    rest = count_params(config, dims) - head * (1 if dims.tie_word_embeddings else 2)
    onnx = runtime == "onnxruntime"
    embed = head * per_weight("fp32" if onnx else head_type)
    shared = dims.tie_word_embeddings and (head_type == "fp32" or not onnx)  # the LM head is the embedding
    lm_head = 0.0 if shared else head * per_weight(head_type)
    return (embed + lm_head + rest * per_weight(precision)) / 1e6


@dataclass
class Choice:
    """One deployment: which family it comes from (``searched`` or an obvious one), its
    architecture and precision, and how it was judged."""

    family: str
    summary: str
    precision: str
    config: dict[str, Any]
    perplexity: float
    predicted_ms: float
    upper_ms: float
    size_mb: float
    measured_ms: float | None = None
    meets_budget: bool | None = None
    # an alternative against the recommendation: its perplexity gain (1 - chosen / this), and
    # the latency cut of the fastest admissible candidate at least as good as this one
    ppl_gain: float | None = None
    latency_cut: float | None = None
    # a per-layer precision mix (export.mix.PrecisionMix as a dict); ``precision`` names its types
    mix: dict[str, Any] | None = None

    @property
    def admissible(self) -> bool:
        return self.meets_budget is not False

    @property
    def runtime(self) -> str:
        return str(self.mix["runtime"]) if self.mix else runtime_of(self.precision)

    @property
    def label(self) -> str:
        return f"{self.family} @ {self.precision}"


@dataclass
class Recommendation:
    budget_ms: float
    ceiling: float
    full_perplexity: float
    chosen: Choice | None
    alternatives: list[Choice] = field(default_factory=list)
    # verified over the budget on the device, set aside
    rejected: list[Choice] = field(default_factory=list)
    # when nothing is admissible: the candidates nearest to the constraints, and what to relax
    nearest: list[Choice] = field(default_factory=list)
    relax: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"budget_ms": self.budget_ms, "max_perplexity": None if math.isinf(self.ceiling) else self.ceiling,
                "full_perplexity": self.full_perplexity,
                "chosen": None if self.chosen is None else asdict(self.chosen) | {"runtime": self.chosen.runtime},
                "alternatives": [asdict(a) | {"runtime": a.runtime} for a in self.alternatives],
                "rejected": [asdict(r) for r in self.rejected], "nearest": [asdict(n) for n in self.nearest],
                "relax": self.relax}


def candidates(front: list[dict[str, Any]], baselines: dict[str, list[dict[str, Any]]], dims: BaseDims,
               default_precision: str) -> list[Choice]:
    """The searched front and every obvious deployment, one ``Choice`` each (a config at a
    precision appears once: the obvious name wins, it is what a user would call it)."""
    out: dict[tuple[str, str], Choice] = {}
    named = [(name.split(" @ ")[0], p) for name, pts in baselines.items() for p in pts]
    for family, p in [*named, *((SEARCHED, p) for p in front)]:
        prec = p.get("precision") or default_precision
        key = (p["config_hash"], prec)
        if key in out:
            continue
        config = SubnetConfig.from_dict(p["config"])
        out[key] = Choice(family, p["summary"].split(" @ ")[0], prec, p["config"], float(p["perplexity"]),
                          float(p["latency_ms"]), float(p.get("upper_ms", p["latency_ms"])),
                          size_mb(config, dims, prec))
    return list(out.values())


def _violation(c: Choice, budget_ms: float, ceiling: float) -> float:
    """How far a candidate is from admissible (0: admissible), in log terms of either limit."""
    over_t = max(0.0, math.log(c.upper_ms / budget_ms))
    over_q = max(0.0, math.log(c.perplexity / ceiling)) if math.isfinite(ceiling) else 0.0
    return over_t + over_q


def _relax_hint(nearest: Choice, budget_ms: float, ceiling: float) -> str:
    hints = []
    if nearest.upper_ms > budget_ms:
        hints.append(f"a latency budget of {nearest.upper_ms:.1f} ms (now {budget_ms:.1f})")
    if math.isfinite(ceiling) and nearest.perplexity > ceiling:
        hints.append(f"a perplexity ceiling of {nearest.perplexity:.1f} (now {ceiling:.1f})")
    return f"{nearest.label} ({nearest.summary}) needs " + " and ".join(hints)


def _measure_one(c: Choice, measure: Measure) -> Choice:
    c.measured_ms, c.meets_budget = measure(c)
    return c


def recommend(pool: list[Choice], budget_ms: float, ceiling: float, full_ppl: float, measure: Measure | None,
              tries: int = 3) -> Recommendation:
    """The admissible candidate of least perplexity that its measurement keeps within the
    budget (up to ``tries`` measured; after a miss, candidates of that runtime whose
    prediction, scaled by how much slower the device ran it, misses too are passed over),
    and the best admissible candidate of each obvious family, measured too (no ``measure``:
    by prediction alone)."""
    ok = sorted((c for c in pool if _violation(c, budget_ms, ceiling) == 0), key=lambda c: (c.perplexity, c.upper_ms))
    rec = Recommendation(budget_ms, ceiling, full_ppl, None)
    if not ok:
        rec.nearest = sorted(pool, key=lambda c: (_violation(c, budget_ms, ceiling), c.perplexity))[:3]
        rec.relax = _relax_hint(rec.nearest[0], budget_ms, ceiling) if rec.nearest else "nothing was evaluated"
        return rec
    slow: dict[str, float] = {}  # per runtime: measured / predicted of the candidates that missed
    for c in ok:
        if measure is None:
            rec.chosen = c
            break
        if len(rec.rejected) >= max(1, tries):
            break
        if c.predicted_ms * slow.get(c.runtime, 1.0) > budget_ms:
            continue  # the device ran its runtime slower than predicted: this one would miss too
        if c.measured_ms is None:  # a deployment measured already (a preset) is not measured twice
            _measure_one(c, measure)
        if c.meets_budget or c.measured_ms is None:
            rec.chosen = c
            break
        rec.rejected.append(c)
        slow[c.runtime] = max(slow.get(c.runtime, 1.0), c.measured_ms / c.predicted_ms)
    if rec.chosen is None:  # every one measured over the budget: the best by measurement, flagged
        rec.chosen = min(rec.rejected, key=lambda c: c.measured_ms or math.inf)
        rec.rejected.remove(rec.chosen)
    rec.alternatives = _alternatives(pool, ok, rec.chosen, budget_ms, ceiling, measure)
    return rec


def _alternatives(pool: list[Choice], ok: list[Choice], chosen: Choice, budget_ms: float, ceiling: float,
                  measure: Measure | None) -> list[Choice]:
    """The best admissible deployment of each obvious family (measured), and the full model
    at every precision (measured where its bound is within the budget), each compared with
    the chosen one."""
    out = []
    for fam in sorted({c.family for c in pool} - {SEARCHED, FULL, MIX}):
        best = next((c for c in ok if c.family == fam and c.admissible and c is not chosen), None)
        if best is not None:
            out.append(best)
    out += sorted((c for c in pool if c.family == FULL and c is not chosen), key=lambda c: c.predicted_ms)
    for alt in out:
        within = _violation(alt, budget_ms, ceiling) == 0
        if measure is not None and alt.measured_ms is None and within:
            _measure_one(alt, measure)
        if within and alt.admissible:  # both within the limits: what the recommendation gains
            alt.ppl_gain = 1 - chosen.perplexity / alt.perplexity
        as_good = [c for c in ok if c.perplexity <= alt.perplexity and c.admissible]
        if as_good:
            alt.latency_cut = 1 - min(c.predicted_ms for c in as_good) / alt.predicted_ms
    return out
