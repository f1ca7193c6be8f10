"""Allocating weight types to tensor groups under a budget: a mixed-integer program over the
measured per-group sensitivities and each group's bytes at each type, as Puzzle (the NAS
behind Nemotron-51B) picks one variant per layer from per-layer quality scores and costs.

Minimize the summed log-perplexity cost of the chosen types (``Sensitivity.cost``) subject to
one type per group and the weights read per decode step staying within ``budget_bytes``
(decode on a CPU is weight-bandwidth bound, so bytes are the first-order latency of a mix;
the predictor and the board judge the chosen mixes' latency). Solved exactly by HiGHS through
scipy's ``milp``. Costs are single-group effects that do not add up exactly, so the mixes
this proposes seed the search and are evaluated as wholes."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from export.mix import HEAD_MENUS, PrecisionMix
from search.sensitivity import HEAD, Sensitivity, allowed, groups_of, mix_of
from subnets.errors import ConfigError


def group_params(w: Any) -> dict[str, int]:
    """Weights in each tensor group of sliced sub-network weights ``w`` (``SubnetWeights``):
    the head is the embedding matrix (tied: it is also the LM head, read whole every step)."""
    out = {HEAD: int(w.embed.numel())}
    for i, lw in enumerate(w.layers):
        out[f"attn.{i}"] = int(sum(getattr(lw, p).numel() for p in ("q", "k", "v", "o")))
        out[f"mlp.{i}"] = int(sum(getattr(lw, p).numel() for p in ("gate", "up", "down")))
    return out


def mix_bytes(mix: PrecisionMix, params: dict[str, int]) -> float:
    """Bytes of the mix's linear weights and head (what a decode step reads, norms aside)."""
    kinds = group_kinds(mix)
    return float(sum(params[g] * mix.bytes_per_weight(kinds[g]) for g in params))


@dataclass(frozen=True)
class TypeCosts:
    """Decode time of a mix on a board as ``intercept + sum over types of weights at that
    type x per_weight[type]``: each type's kernel has its own cost per weight (on this x86 CPU
    Q5_0 cost more per weight than Q8_0), which bytes alone cannot say. Fitted by non-negative
    least squares to deployments measured on the board (``fit_type_costs``). For one
    architecture the intercept and a cost common to every type are one unknown (the weights
    add up to the same total in every mix): the fit predicts mixes of that architecture, and
    differences between types, which is what the allocation needs."""

    intercept: float
    per_weight: dict[str, float]

    def of(self, mix: PrecisionMix, params: dict[str, int]) -> float:
        return self.intercept + sum(params[g] * self.per_weight[k] for g, k in group_kinds(mix).items())


def group_kinds(mix: PrecisionMix) -> dict[str, str]:
    """Each tensor group's type in ``mix`` (the head, ``attn.<i>``, ``mlp.<i>``)."""
    return {HEAD: mix.head, **{f"attn.{i}": k for i, k in enumerate(mix.attention)},
            **{f"mlp.{i}": k for i, k in enumerate(mix.mlp)}}


def fit_type_costs(measured: list[tuple[PrecisionMix, dict[str, int], float]]) -> TypeCosts:
    """``TypeCosts`` from (mix, group weights, measured time) of deployments on one board."""
    from scipy.optimize import nnls

    kinds = sorted({k for mix, _, _ in measured for k in group_kinds(mix).values()})
    rows = []
    for mix, params, _ in measured:
        per = dict.fromkeys(kinds, 0.0)
        for g, k in group_kinds(mix).items():
            per[k] += params[g]
        rows.append([1.0, *(per[k] / 1e6 for k in kinds)])
    coef, _ = nnls(np.array(rows), np.array([t for _, _, t in measured]))
    return TypeCosts(float(coef[0]), {k: float(c) / 1e6 for k, c in zip(kinds, coef[1:])})


def allocate(sens: Sensitivity, params: dict[str, int], budget: float, block_size: int = 32,
             costs: TypeCosts | None = None) -> PrecisionMix:
    """The mix of least summed sensitivity within ``budget``: bytes of weights, or with
    ``costs`` the board's time (``TypeCosts``, in its unit)."""
    from scipy.optimize import Bounds, LinearConstraint, milp

    groups = groups_of(sens.num_layers)
    probe = PrecisionMix.uniform(sens.runtime, sens.high, sens.num_layers, block_size=block_size)
    var = [(g, k) for g in groups for k in (sens.high, *sens.lows) if k == sens.high or allowed(sens.runtime, g, k)]
    cost = np.array([sens.cost(g, k) for g, k in var])
    if costs is not None:  # the intercept is paid whatever the mix: the groups share the rest
        size = np.array([params[g] * costs.per_weight[k] for g, k in var])
        room = budget - costs.intercept
    else:
        size = np.array([params[g] * probe.bytes_per_weight(k) for g, k in var])
        room = budget
    one = np.zeros((len(groups), len(var)))
    for j, (g, _) in enumerate(var):
        one[groups.index(g), j] = 1.0
    lightest = sum(min(size[j] for j, (h, _) in enumerate(var) if h == g) for g in groups)
    unit = (lambda v: f"{v:.2f} (time)") if costs is not None else (lambda v: f"{v / 1e6:.1f} MB")
    if room < lightest:
        floor = lightest + (costs.intercept if costs is not None else 0.0)
        raise ConfigError(f"a budget of {unit(budget)} is below the lightest mix of these types ({unit(floor)})",
                          "raise the budget, or allow lower weight types")
    res = milp(cost, integrality=np.ones(len(var)), bounds=Bounds(0, 1),
               constraints=[LinearConstraint(one, 1, 1), LinearConstraint(size[None, :], -np.inf, room)])
    if res.x is None:
        raise ConfigError(f"no mix fits {unit(budget)} ({res.message})", "raise the budget")
    chosen = {g: k for (g, k), x in zip(var, res.x) if x > 0.5}
    return mix_of(chosen, sens.runtime, sens.high, sens.num_layers, block_size)


def greedy(sens: Sensitivity, kind: str, keep: int, head_high: bool = True, block_size: int = 32) -> PrecisionMix:
    """The hand rule a probe found: every group at ``kind`` except the head (``head_high``)
    and the ``keep`` groups most sensitive to ``kind``, which stay at the high type."""
    ranked = [g for g in sens.ranked(kind) if g != HEAD]
    low = {g: kind for g in ranked[keep:]}
    if not head_high and allowed(sens.runtime, HEAD, kind):
        low[HEAD] = kind
    return mix_of(low, sens.runtime, sens.high, sens.num_layers, block_size)


@dataclass(frozen=True)
class MixRequest:
    """``edgenas mix``: the precision mix of least measured sensitivity within a byte budget
    (field names are its flags)."""

    model: str = "smollm2"
    neuron_step: int = 64
    runtime: str = "llama.cpp"
    high: str = "q8_0"
    lows: str = "q4_0"
    budget_mb: float | None = None
    budget_share: float = 0.75  # of the weights at ``high``, when no budget_mb
    config: Path | None = None  # a sub-network's configs file (default: the full model)
    index: int = 0
    quality_tokens: int = 2048
    text: str | None = None
    block_size: int = 32
    out: Path = Path("runs/mix.json")

    def __post_init__(self) -> None:
        object.__setattr__(self, "out", Path(self.out))
        kinds = (self.high, *self.lows.split(","))
        PrecisionMix(self.runtime, HEAD_MENUS[self.runtime][0] if self.runtime in HEAD_MENUS else self.high,
                     kinds, kinds, self.block_size)  # every type from the runtime's menu
        if self.budget_mb is not None and not self.budget_mb > 0:
            raise ConfigError(f"--budget-mb {self.budget_mb} is not positive", "give the weights' budget in MB")
        if not 0 < self.budget_share <= 1:
            raise ConfigError(f"--budget-share {self.budget_share} is not a share of the weights at {self.high}",
                              "pass a number in (0, 1], e.g. 0.75")


@dataclass
class MixChoice:
    request: MixRequest
    mix: PrecisionMix
    mb: float
    budget_mb: float
    perplexity: float
    # the uniform types of the same menu, for comparison: type -> (MB, perplexity)
    uniform: dict[str, tuple[float, float]] = field(default_factory=dict)
    sensitivity_groups: int = 0


def choose_mix(request: MixRequest, progress: Any = None) -> MixChoice:
    """Measure (or read the cached) sensitivities, allocate, judge the chosen mix and the
    uniform types as the runtime computes them, and write the mix's JSON to ``request.out``."""
    from export.quantize import MixArithmetic
    from search.sensitivity import measure_sensitivity
    from subnets.configio import read_config
    from subnets.workspace import Workspace

    ws = Workspace.open(request.model, neuron_step=request.neuron_step, eval_text=request.text,
                        eval_budget=request.quality_tokens)
    config = ws.space.full() if request.config is None else ws.space.validate(read_config(request.config, request.index))
    lows = tuple(request.lows.split(","))
    sens = measure_sensitivity(ws, config, request.runtime, request.high, lows, request.block_size, progress)
    params = group_params(ws.weights(config))
    L = len(config.layers)
    uniform = {k: PrecisionMix.uniform(request.runtime, k, L, block_size=request.block_size) for k in (request.high, *lows)}
    budget = request.budget_mb * 1e6 if request.budget_mb else request.budget_share * mix_bytes(uniform[request.high], params)
    mix = allocate(sens, params, budget, request.block_size)

    def ppl(m: PrecisionMix) -> float:
        return ws.at_precision(MixArithmetic(m)).perplexity(config)

    choice = MixChoice(request, mix, mix_bytes(mix, params) / 1e6, budget / 1e6, ppl(mix),
                       {k: (mix_bytes(m, params) / 1e6, ppl(m)) for k, m in uniform.items()},
                       len(sens.perplexity))
    request.out.parent.mkdir(parents=True, exist_ok=True)
    request.out.write_text(json.dumps(mix.to_dict(), indent=1))
    return choice
