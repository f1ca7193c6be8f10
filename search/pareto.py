"""Pareto fronts, hypervolume and the quality-latency plot."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np


def pareto_mask(ppl: np.ndarray, lat: np.ndarray) -> np.ndarray:
    """True for points no other point beats in both perplexity and latency."""
    order = np.lexsort((ppl, lat))
    keep = np.zeros(len(ppl), dtype=bool)
    best = math.inf
    for i in order:
        if ppl[i] < best:
            keep[i] = True
            best = ppl[i]
    return keep


def hypervolume(ppl: np.ndarray, lat: np.ndarray, ref_ppl: float, ref_lat: float) -> float:
    """Area dominated by the points in (log perplexity, latency ms), up to the reference."""
    pts = [(float(lt), math.log(p)) for p, lt in zip(ppl, lat) if p < ref_ppl and lt < ref_lat]
    if not pts:
        return 0.0
    pts.sort()
    area, best_q = 0.0, math.log(ref_ppl)
    for i, (lt, q) in enumerate(pts):
        nxt = pts[i + 1][0] if i + 1 < len(pts) else ref_lat
        best_q = min(best_q, q)
        area += (nxt - lt) * (math.log(ref_ppl) - best_q)
    return area


def plot_front(points: Sequence[dict[str, Any]], front: Sequence[dict[str, Any]], baselines: dict[str, list[dict[str, Any]]],
               budget_ms: float | None, path: Path, title: str, ppl_cap: float | None = None,
               full_ppl: float | None = None) -> Path:
    """Front, evaluated points and baselines; with ``ppl_cap`` the perplexity axis stops
    there (points above it are counted in the legend), so the useful range fills the plot.
    Each front and baseline point is drawn at its predicted latency with a whisker to its
    upper bound, the value the budget is applied to; a baseline whose bound misses the budget
    is drawn hollow, so the plot and the tables agree on what fits."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 5), dpi=110)
    feas = [p for p in points if p["feasible"]]
    if feas:
        ax.scatter([p["latency_ms"] for p in feas], [p["perplexity"] for p in feas], s=8, color="lightsteelblue",
                   label="evaluated sub-networks")
    if front:
        f = sorted(front, key=lambda p: p["latency_ms"])
        ax.plot([p["latency_ms"] for p in f], [p["perplexity"] for p in f], "o-", color="C0", ms=4, label="Pareto front")
        _whiskers(ax, f, "C0")
    _baselines(ax, baselines, budget_ms)
    if budget_ms:
        ax.axvline(budget_ms, color="red", lw=0.8, ls=":", label=f"budget {budget_ms:g} ms")
    if full_ppl:
        ax.axhline(full_ppl, color="k", lw=0.6, ls="--", label=f"full model, perplexity {full_ppl:.1f}")
    ax.set_yscale("log")
    if ppl_cap:
        vals = [p["perplexity"] for p in points if p["feasible"]] + [p["perplexity"] for ps in baselines.values() for p in ps]
        above = sum(v > ppl_cap for v in vals)
        low = min([v for v in vals if v > 0] + [full_ppl or ppl_cap]) / 1.15
        ax.set_ylim(low, ppl_cap * 1.15)
        if above:
            ax.plot([], [], " ", label=f"{above} point(s) above perplexity {ppl_cap:.0f} (off the plot)")
    if budget_ms and any(p.get("upper_ms") is not None for ps in baselines.values() for p in ps):
        ax.plot([], [], " ", label="hollow: upper bound over the budget")
    ax.set_xlabel("workload latency (ms): predicted; whisker to the upper bound the budget applies to")
    ax.set_ylabel("perplexity (held-out)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


MARKERS = {"full model": "*", "uniform width": "s", "layer dropping": "^"}


def _baselines(ax: Any, baselines: dict[str, list[dict[str, Any]]], budget_ms: float | None) -> None:
    """Each obvious family (``name`` or ``name @ precision``) by its marker; with several
    precisions, each precision by its colour (a legend entry per family and per precision,
    not per series, so a five-precision search's plot stays readable)."""
    precisions = list(dict.fromkeys(name.partition(" @ ")[2] for name in baselines))
    by_precision = len(precisions) > 1
    colors = {p: f"C{i + 1}" for i, p in enumerate(precisions)}
    families = {}
    for name, pts in baselines.items():
        if not pts:
            continue
        family, _, precision = name.partition(" @ ")
        mk = MARKERS.get(family, "D")
        col = colors[precision] if by_precision else {"*": "k", "s": "C1", "^": "C2"}.get(mk, "C3")
        ax.plot([p["latency_ms"] for p in pts], [p["perplexity"] for p in pts], "--", color=col, lw=0.8)
        fits = [budget_ms is None or p.get("upper_ms", p["latency_ms"]) <= budget_ms for p in pts]
        ax.scatter([p["latency_ms"] for p in pts], [p["perplexity"] for p in pts], marker=mk, s=36,
                   facecolors=[col if ok else "none" for ok in fits], edgecolors=col,
                   label=None if by_precision else name)
        _whiskers(ax, pts, col)
        families[family] = mk
    if by_precision:
        for family, mk in families.items():
            ax.scatter([], [], marker=mk, s=36, color="grey", label=family)
        for p, col in colors.items():
            ax.plot([], [], "-", color=col, lw=3, label=p)


def _whiskers(ax: Any, pts: Sequence[dict[str, Any]], color: str) -> None:
    """A line from each point's predicted latency to its upper bound."""
    for p in pts:
        if p.get("upper_ms") is not None:
            ax.plot([p["latency_ms"], p["upper_ms"]], [p["perplexity"]] * 2, color=color, lw=0.6, alpha=0.6)
