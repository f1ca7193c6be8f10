"""Per-layer precision mixes as deployments: for an architecture on a runtime, the mix of a
high and a low type (GGUF types on llama.cpp, per-MatMul types on onnxruntime; each tensor
group at one of them) of least measured sensitivity whose predicted latency bound fits the
budget, chosen by the mixed-integer program of ``search.mix_allocation`` and judged for
quality as the runtime computes it.

A mix's latency is predicted between its two uniform types' predictions for that
architecture, by the share of the weights at the high type: a decode step reads every weight
once and a prefill multiplies by every weight, so each weight costs its type's time whatever
its layer (the precision-mix benchmark measured this additivity on this CPU; the device
checks each recommended mix)."""

from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass
from typing import Any

from export.mix import PrecisionMix
from predictor.features import ConfigBatch
from search.mix_allocation import TypeCosts, allocate, group_kinds, group_params, mix_bytes
from search.recommendation import MIX, runtime_of
from search.sensitivity import measure_sensitivity
from subnets.config import SubnetConfig
from subnets.errors import ConfigError

log = logging.getLogger(__name__)

SENSITIVITY_TOKENS = 512  # per single-group perplexity: a ranking, not a score
# the shares of the budget a mix is planned within: the device may measure a mix a few percent
# slower than its two types' predictions interpolate
MARGINS = (1.0, 0.96, 0.92)


@dataclass(frozen=True)
class MixedDeployment:
    """A mix of ``config`` and its latency, predicted and bounded between the uniform types'."""

    config: SubnetConfig
    mix: PrecisionMix
    high_share: float  # of the weights, at the high type
    predicted_ms: float
    upper_ms: float
    size_mb: float


def _high_weights(mix: PrecisionMix, params: dict[str, int], high: str) -> float:
    return float(sum(params[g] for g, k in group_kinds(mix).items() if k == high))


def plan_mix(ws: Any, config: SubnetConfig, high: Any, low: Any, budget_ms: float,
             progress: Any = None) -> MixedDeployment | None:
    """The mix of ``config`` between the deployments ``high`` and ``low`` (``search.study.
    Deployment``s of two types of one runtime) whose interpolated bound fits ``budget_ms``;
    None when the uniform high type fits already or even the uniform low type does not."""
    batch = ConfigBatch.from_configs([config], ws.space.dims.num_layers)
    (lat_hi,), (up_hi,) = high.objective.predict_both(batch)
    (lat_lo,), (up_lo,) = low.objective.predict_both(batch)
    if up_hi <= budget_ms or up_lo > budget_ms or up_hi <= up_lo:
        return None
    runtime, L = runtime_of(high.precision), len(config.layers)
    params = group_params(ws.weights(config))
    # the weights each uniform type holds at the high type (onnxruntime's uniform types: all;
    # a group the runtime cannot run at the low type stays high in both)
    w_hi = _high_weights(PrecisionMix.uniform(runtime, high.precision, L), params, high.precision)
    w_lo = _high_weights(PrecisionMix.uniform(runtime, low.precision, L), params, high.precision)
    per_weight = (up_hi - up_lo) / (w_hi - w_lo)
    sens = measure_sensitivity(ws.evaluated_on(ws.eval_text, SENSITIVITY_TOKENS), config, runtime,
                               high.precision, (low.precision,), progress=progress)
    try:
        mix = allocate(sens, params, budget_ms, costs=TypeCosts(float(up_lo - per_weight * w_lo),
                                                              {high.precision: per_weight, low.precision: 0.0}))
    except ConfigError as e:  # rounding at the edge of the budget
        log.info("no %s/%s mix of %s fits %.1f ms: %s", high.precision, low.precision, config.summary(), budget_ms,
                 e.problem)
        return None
    share = (_high_weights(mix, params, high.precision) - w_lo) / (w_hi - w_lo)
    return MixedDeployment(config, mix, share, float(lat_lo + share * (lat_hi - lat_lo)),
                           float(up_lo + share * (up_hi - up_lo)), mix_bytes(mix, params) / 1e6)


def mix_pairs(ws: Any, deps: dict[str, Any], config: SubnetConfig) -> list[tuple[Any, Any, float]]:
    """(high, low, the high type's perplexity) for each runtime's types adjacent on the front of
    ``config``'s uniform deployments (bound x perplexity): a type both slower and worse than
    another of its runtime (onnxruntime int8 beside int4 here) is no end of a mix."""
    from export.arithmetic import at_precision

    batch = ConfigBatch.from_configs([config], ws.space.dims.num_layers)
    out = []
    for runtime in sorted({runtime_of(p) for p in deps}):
        scored = sorted(((float(d.objective.predict_both(batch)[1][0]),
                          at_precision(ws, p).perplexity(config), d)
                         for p, d in deps.items() if runtime_of(p) == runtime), key=lambda t: t[0])
        front = [t for i, t in enumerate(scored) if all(t[1] < u[1] for u in scored[:i])]
        out += [(hi[2], lo[2], hi[1]) for lo, hi in itertools.pairwise(front)]
    return out


def mix_choices(ws: Any, deps: dict[str, Any], budget_ms: float, progress: Any = None,
                margins: tuple[float, ...] = MARGINS, known: list[Any] = ()) -> list[Any]:
    """The full model's mixes between each runtime's two types adjacent on its front (``mix_
    pairs``), where one fits the budget: a ``Choice`` each, its perplexity judged as the runtime
    computes the mix. One mix per margin (its bound planned within that share of the budget),
    so that when the device measures the best one over the budget the next, a little faster, is
    measured instead of falling back to a uniform type. A pair is skipped when a ``known``
    candidate within the budget is already as good as its high type (no mix of it can be better)."""
    from export.quantize import MixArithmetic
    from search.recommendation import Choice

    full = ws.space.full()
    best_known = min((c.perplexity for c in known if c.upper_ms <= budget_ms), default=float("inf"))
    out, seen = [], set()
    for high, low, high_ppl in mix_pairs(ws, deps, full):
        if best_known <= high_ppl * 1.01:
            continue
        for margin in margins:
            planned = plan_mix(ws, full, high, low, budget_ms * margin, progress)
            if planned is None or planned.mix in seen:
                continue
            seen.add(planned.mix)
            ppl = ws.at_precision(MixArithmetic(planned.mix)).perplexity(full)
            out.append(Choice(MIX, full.summary(), f"{high.precision}+{low.precision}", full.to_dict(), ppl,
                              planned.predicted_ms, planned.upper_ms, planned.size_mb, mix=planned.mix.to_dict()))
    return out
