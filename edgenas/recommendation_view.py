"""The main job's answer as its user reads it: the recommendation table (the deployment to ship
beside the obvious alternatives under the same budget), ``recommendation.json``, and the
recommended deployment exported as the files its runtime loads (``ship/``)."""

from __future__ import annotations

import json
from typing import Any

from rich.console import Console
from rich.table import Table

from search.recommendation import Choice, Recommendation


def _ms(v: float | None) -> str:
    return "-" if v is None else f"{v:.1f}"


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{v:+.0%}"


def _status(c: Choice, rec: Recommendation) -> str:
    if c.upper_ms > rec.budget_ms:
        return "bound over"
    if c.perplexity > rec.ceiling:
        return "ppl over"
    return {False: "missed", True: "met", None: "unmeasured"}[c.meets_budget]


def _row(c: Choice, rec: Recommendation, role: str) -> list[str]:
    name = f"{c.family} {c.precision}, {c.runtime}"
    return [f"[bold]{role}:[/] {name}" if role else name, c.summary, f"{c.size_mb:.0f}",
            f"{c.perplexity:.1f} ({c.perplexity / rec.full_perplexity:.2f}x)",
            f"{c.predicted_ms:.0f}/{c.upper_ms:.0f}", _ms(c.measured_ms), _pct(c.ppl_gain), _pct(c.latency_cut),
            _status(c, rec)]


def recommendation_table(rec: Recommendation, title: str) -> Table:
    """One row per deployment, the one to ship first; ``budget``: met or missed on the
    device, or why it was not measured (its bound over the budget, its perplexity over the
    ceiling). Narrow enough for a 120-column terminal."""
    t = Table(title=title)
    for col in ("deployment", "architecture", "MB", "perplexity", "pred/bound ms", "measured", "gain", "cut",
                "budget"):
        t.add_column(col, justify="left" if col in ("deployment", "architecture", "budget") else "right",
                     no_wrap=col != "deployment", min_width=18 if col == "deployment" else None)
    if rec.chosen is not None:
        t.add_row(*_row(rec.chosen, rec, "ship"))
    for c in rec.alternatives:
        t.add_row(*_row(c, rec, ""))
    for c in rec.rejected:
        t.add_row(*_row(c, rec, "set aside"))
    for c in rec.nearest:
        t.add_row(*_row(c, rec, "nearest"))
    return t


def render_recommendation(rec: Recommendation, request: Any, console: Console) -> None:
    budget = f"{rec.budget_ms:.1f} ms for workload {request.workload} on {request.host}"
    console.print(recommendation_table(rec, f"What to ship: {budget}, perplexity within {rec.ceiling:.1f}"))
    console.print("gain: the shipped deployment's perplexity below this one's, both within the budget; cut: the "
                  "fastest admissible deployment at least as good as this one, against its predicted latency")
    if rec.chosen is None:
        console.print(f"[bold red]nothing meets both limits[/]; relax: {rec.relax}")
        return
    c = rec.chosen
    console.print(f"[bold]ship[/] {c.summary} at {c.precision} on {c.runtime}: perplexity {c.perplexity:.1f} "
                  f"({c.perplexity / rec.full_perplexity:.2f}x the full model), {_ms(c.measured_ms)} ms measured "
                  f"against a budget of {rec.budget_ms:.1f} ms; files in {request.out / 'ship'}")


FAMILY_MARKERS = {"full model": "*", "uniform width": "s", "layer dropping": "^", "precision mix": "P", "searched": "o"}
RUNTIME_COLORS = {"onnxruntime": "C0", "llama.cpp": "C1"}


def plot_recommendation(rec: Recommendation, path: Any, title: str) -> Any:
    """Every row of the recommendation table where the table puts it: each deployment at its
    predicted latency, a whisker to its bound (hollow: bound over the budget), a cross at what
    the device measured; the one to ship ringed. Marker: family; colour: runtime."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 5), dpi=110)
    rows = [*([rec.chosen] if rec.chosen else []), *rec.alternatives, *rec.rejected, *rec.nearest]
    for c in rows:
        col, fits = RUNTIME_COLORS.get(c.runtime, "C2"), c.upper_ms <= rec.budget_ms
        ax.plot([c.predicted_ms, c.upper_ms], [c.perplexity] * 2, color=col, lw=0.8, alpha=0.7)
        ax.scatter([c.predicted_ms], [c.perplexity], marker=FAMILY_MARKERS.get(c.family, "D"), s=60,
                   facecolors=col if fits else "none", edgecolors=col, zorder=3)
        if c.measured_ms is not None:
            ax.scatter([c.measured_ms], [c.perplexity], marker="x", s=40, color="red" if c.meets_budget is False else "k",
                       zorder=4)
        ax.annotate(f"{c.family} {c.precision}", (c.predicted_ms, c.perplexity), fontsize=6, xytext=(4, 3),
                    textcoords="offset points")
    if rec.chosen is not None:
        ax.scatter([rec.chosen.predicted_ms], [rec.chosen.perplexity], s=380, facecolors="none", edgecolors="green",
                   lw=1.6, zorder=5, label=f"ship: {rec.chosen.family} {rec.chosen.precision}")
    ax.axvline(rec.budget_ms, color="red", lw=0.8, ls=":", label=f"budget {rec.budget_ms:g} ms")
    ax.axhline(rec.full_perplexity, color="k", lw=0.6, ls="--", label=f"full fp32 model, {rec.full_perplexity:.1f}")
    for family, mk in FAMILY_MARKERS.items():
        if any(c.family == family for c in rows):
            ax.scatter([], [], marker=mk, color="grey", label=family)
    for runtime, col in RUNTIME_COLORS.items():
        if any(c.runtime == runtime for c in rows):
            ax.plot([], [], "-", color=col, lw=3, label=runtime)
    ax.scatter([], [], marker="x", color="k", label="measured on the device (red: over the budget)")
    ax.set_yscale("log")
    ax.set_xlabel("workload latency (ms): predicted, whisker to the bound; x measured")
    ax.set_ylabel("perplexity (held-out)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def write_recommendation(request: Any, ws: Any, rec: Recommendation) -> None:
    """recommendation.json, and the chosen deployment exported to ``out/ship``: the HF folder,
    the ONNX graphs (MatMulNBits/MatMulInteger per layer for int4/int8) or the GGUF file."""
    from export.mix import PrecisionMix
    from export.quantize import GGUF_PRESETS
    from export.request import ExportRequest, write_export
    from search.recommendation import runtime_of
    from subnets.config import SubnetConfig

    (request.out / "recommendation.json").write_text(json.dumps(rec.to_dict(), indent=1))
    plot_recommendation(rec, request.out / "recommendation.png",
                        f"What to ship: {rec.budget_ms:.1f} ms for workload {request.workload} on {request.host}")
    if rec.chosen is None:
        return
    c, ship = rec.chosen, request.out / "ship"
    ship.mkdir(parents=True, exist_ok=True)
    config = SubnetConfig.from_dict(c.config)
    (ship / "config.jsonl").write_text(config.to_json() + "\n")
    mix, preset = None, c.precision if c.precision in GGUF_PRESETS else None
    if preset is None and (c.mix is not None or c.precision != "fp32"):
        mix = ship / "mix.json"
        chosen = c.mix or PrecisionMix.uniform(runtime_of(c.precision), c.precision, len(config.layers)).to_dict()
        mix.write_text(json.dumps(chosen, indent=1))
    write_export(ExportRequest(ship / "config.jsonl", ship, model=request.model, neuron_step=request.neuron_step,
                               reconstruct=request.reconstruct, no_perplexity=True, mix=mix, gguf=preset), ws)
