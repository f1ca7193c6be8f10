"""What the deployment search buys at each budget: the recommended deployment (searched over
architecture x precision x runtime, plus the full model's precision mixes) against the best
obvious alternative under the same budget (the full model, uniform width or layer dropping at
one precision), both measured on this CPU, at budgets of 30-85% of the full fp32 model's
predicted workload latency (128-token prompt + 64 generated, 1 thread).

It reuses a main job's run folder (its measurement store and predictors, so nothing is
profiled twice) and runs, per budget, the same search and recommendation the main job runs:

    .venv/bin/edgenas pipeline --out runs/pipeline          # once (llama.cpp tools built)
    python benchmarks/deployment.py --run runs/pipeline --out runs/deployment
    python benchmarks/deployment.py --run runs/pipeline --out runs/deployment-ort --precision fp32,int8,int4

Per budget: the recommendation and the best admissible obvious deployment, their perplexity on
the held-out docstrings and on a second domain (the GPL-3 text), measured latency, the
perplexity gap to the full fp32 model that the recommendation closes, and the search's
hypervolume and repeated-trial share. Writes OUT/deployment.json and prints a Markdown table."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from rich.console import Console

from edgenas.pipeline import PipelineRequest, open_workspace, recommend_stage
from search.recommendation import MIX, SEARCHED, Choice


def second_domain(ws: Any, c: Choice, text: str, tokens: int) -> float:
    """``c``'s perplexity on another text, at its precision (or mix) as its runtime computes."""
    from export.arithmetic import at_precision
    from export.mix import PrecisionMix
    from export.quantize import MixArithmetic
    from subnets.config import SubnetConfig

    other = ws.evaluated_on(text, tokens)
    view = other.at_precision(MixArithmetic(PrecisionMix.from_dict(c.mix))) if c.mix else at_precision(other, c.precision)
    return view.perplexity(SubnetConfig.from_dict(c.config))


def best_obvious(rec: Any) -> Choice | None:
    """The deployment a user would pick without the suite: the admissible obvious deployment
    of least perplexity that the device kept within the budget (the recommendation itself
    when it is an obvious one: then the search gained nothing)."""
    ok = [a for a in rec.alternatives if a.family not in (SEARCHED, MIX) and a.ppl_gain is not None]
    if rec.chosen is not None and rec.chosen.family not in (SEARCHED, MIX):
        ok.append(rec.chosen)
    return min(ok, key=lambda a: a.perplexity, default=None)


def one_budget(request: PipelineRequest, ws: Any, share: float, second: str, tokens: int,
               full_ppl: float) -> dict[str, Any]:
    from dataclasses import replace

    from edgenas.commands.search import run_with_progress

    budget = round(share * full_fp32_ms(request, ws), 1)
    # one study storage for every budget: each candidate's perplexity is judged once
    tag = "" if request.precision == "auto" else "-" + request.precision.replace(",", "-")
    search_request = replace(request.search(budget), out=request.out / f"search-{int(share * 100)}{tag}",
                             storage=f"sqlite:///{(request.out / 'deployment-studies.db').resolve()}")
    outcome = run_with_progress(search_request, ws, Console(file=open(Path("/dev/null"), "w")))
    rec = recommend_stage(request, ws, outcome)
    row: dict[str, Any] = {"share": share, "budget_ms": budget, "hypervolume": outcome.result.hypervolume,
                           "trials": len(outcome.result.points) + outcome.result.repeats,
                           "repeats": outcome.result.repeats, "recommendation": rec.to_dict()}
    alt = best_obvious(rec)
    for name, c in (("chosen", rec.chosen), ("obvious", alt)):
        if c is not None:
            row[name] = {"label": c.label, "summary": c.summary, "perplexity": c.perplexity,
                         "second": second_domain(ws, c, second, tokens), "measured_ms": c.measured_ms,
                         "predicted_ms": c.predicted_ms}
    if rec.chosen is not None and alt is not None and alt.perplexity > full_ppl:
        row["gap_closed"] = (alt.perplexity - rec.chosen.perplexity) / (alt.perplexity - full_ppl)
    return row


def full_fp32_ms(request: PipelineRequest, ws: Any) -> float:
    from predictor.features import ConfigBatch
    from predictor.workload import LatencyObjective, Workload

    objective = LatencyObjective.load(request.predictors(), Workload.parse(request.workload), request.host,
                                      ws.base.base_id)
    return float(objective.predict(ConfigBatch.from_configs([ws.space.full()], ws.space.dims.num_layers))[0])


def table(rows: list[dict[str, Any]]) -> str:
    out = ["| budget | recommended | ppl / second | measured ms | best obvious | ppl / second | measured ms | "
           "gap closed | trials (repeats) |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        c, o = r.get("chosen"), r.get("obvious")

        def cells(x: dict[str, Any] | None) -> str:
            if x is None:
                return "none | - | -"
            ms = "-" if x["measured_ms"] is None else f"{x['measured_ms']:.0f}"
            return f"{x['label']}: {x['summary']} | {x['perplexity']:.1f} / {x['second']:.1f} | {ms}"

        gap = "-" if "gap_closed" not in r else f"{r['gap_closed']:.0%}"
        out.append(f"| {r['share']:.0%} ({r['budget_ms']:.0f} ms) | {cells(c)} | {cells(o)} | {gap} | "
                   f"{r['trials']} ({r['repeats']}) |")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", type=Path, default=Path("runs/pipeline"), help="a main job's --out folder")
    ap.add_argument("--out", type=Path, default=Path("runs/deployment"))
    ap.add_argument("--shares", default="0.3,0.4,0.5,0.6,0.7,0.85")
    ap.add_argument("--evals", type=int, default=40)
    ap.add_argument("--second-text", default="/usr/share/common-licenses/GPL-3")
    ap.add_argument("--precision", default="auto",
                    help="the deployments searched: auto (every runtime the run profiled), or one runtime's, "
                         "e.g. fp32,int8,int4 (onnxruntime) or q8_0,q4_0 (llama.cpp)")
    args = ap.parse_args()
    request = PipelineRequest(out=args.run, evals=args.evals, precision=args.precision)
    ws = open_workspace(request)
    full_ppl = ws.perplexity(ws.space.full())
    rows = []
    args.out.mkdir(parents=True, exist_ok=True)
    for share in (float(s) for s in args.shares.split(",")):
        rows.append(one_budget(request, ws, share, args.second_text, request.quality_tokens, full_ppl))
        (args.out / "deployment.json").write_text(json.dumps({"full_perplexity": full_ppl, "rows": rows}, indent=1))
        print(table(rows[-1:]), flush=True)
    print(f"\nfull fp32 model: perplexity {full_ppl:.2f}\n")
    print(table(rows))


if __name__ == "__main__":
    main()
