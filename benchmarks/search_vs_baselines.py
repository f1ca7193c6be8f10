"""Search against random search and the hand-made baselines, SmolLM2 on this CPU.

1. Hypervolume of NSGA-II and of random search at equal trial budgets (both start from the
   same baseline configs), over several seeds, at two reference perplexities: 1e5 (any
   point counts) and --ref-ppl (only sub-networks worth shipping count).
2. At the perplexity of the best uniform-width baseline under the budget, the fastest
   searched sub-network at least as good: predicted and *measured* latency of both.
3. Share of verified front points that meet the budget on the device.

    python benchmarks/search_vs_baselines.py --predictor runs/predictors/local --db runs/bench.db \\
        --budget-share 0.85 --evals 120 --seeds 3 --quality-tokens 512 [--granularity tapered|per-layer|uniform]
"""

from __future__ import annotations

import argparse
import logging
import statistics
import tempfile
from pathlib import Path

import numpy as np

from predictor.features import ConfigBatch
from predictor.workload import LatencyObjective, Workload
from search.baselines import baseline_configs, evaluate_baselines
from search.pareto import hypervolume
from search.storage import parse_storage
from search.study import run_search, shared_quality
from search.verify import pick_spread, verify
from subnets.workspace import Workspace


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--predictor", type=Path, required=True)
    ap.add_argument("--db", type=Path, required=True, help="store the verification measurements go to")
    ap.add_argument("--device", default="local")
    ap.add_argument("--workload", default="128,64")
    ap.add_argument("--budget-share", type=float, default=0.7)
    ap.add_argument("--evals", type=int, default=40)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--verify", type=int, default=4)
    ap.add_argument("--quality-tokens", type=int, default=1024)
    ap.add_argument("--granularity", choices=["per-layer", "tapered", "uniform"], default="tapered")
    ap.add_argument("--ref-ppl", type=float, default=None,
                    help="reference perplexity of the second hypervolume (default 10 x the full model's)")
    ap.add_argument("--algorithms", default="nsga2,random")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    ws = Workspace.open("smollm2", eval_budget=args.quality_tokens)
    wl = Workload.parse(args.workload)
    obj = LatencyObjective.load(args.predictor, wl, args.device, ws.base.base_id)
    full = float(obj.predict(ConfigBatch.from_configs([ws.space.full()], 30))[0])
    budget = args.budget_share * full
    print(f"workload {args.workload}: full model predicted {full:.0f} ms; budget {budget:.0f} ms")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        storage = parse_storage(None, tmp / "study.db")  # every study and its perplexities: equal configs cost once
        warm = [c for cs in baseline_configs(ws).values() for c in cs]
        algos = args.algorithms.split(",")
        quality0 = shared_quality(storage, ws)
        full_ppl = quality0(ws.space.full())
        ref2 = args.ref_ppl or 10 * full_ppl
        print(f"full model perplexity {full_ppl:.1f}; hypervolume references: perplexity 1e5 and {ref2:.0f}")
        hv: dict[str, list[float]] = {a: [] for a in algos}
        hv2: dict[str, list[float]] = {a: [] for a in algos}
        fronts = []
        for seed in range(args.seeds):
            for algo in algos:
                res = run_search(ws, obj, algo, args.evals, budget, storage, seed=seed, granularity=args.granularity,
                                 warm_start=warm)
                hv[algo].append(res.hypervolume)
                feas = [p for p in res.points if p["feasible"]]
                hv2[algo].append(hypervolume(np.array([p["perplexity"] for p in feas]),
                                             np.array([p["latency_ms"] for p in feas]), ref2, budget))
                print(f"seed {seed} {algo:6s}: hypervolume {res.hypervolume:8.1f} / {hv2[algo][-1]:7.1f}, "
                      f"front {len(res.front)}, best ppl {min((p['perplexity'] for p in feas), default=float('nan')):.1f}, "
                      f"feasible {sum(p['feasible'] for p in res.points)}/{len(res.points)}, "
                      f"predictor share {res.seconds['predictor'] / res.seconds['total']:.2%}")
                if algo == algos[0]:
                    fronts.extend(res.front)
        for algo in algos:
            for ref, vals in (("1e5", hv[algo]), (f"{ref2:.0f}", hv2[algo])):
                print(f"{algo}: hypervolume (ref ppl {ref}) mean {statistics.mean(vals):.1f} "
                      f"(min {min(vals):.1f}, max {max(vals):.1f})")
        quality = shared_quality(storage, ws)
        base = evaluate_baselines(ws, obj, quality)
        # the search's own rule: the predicted upper bound within the budget
        uni = [b for b in base["uniform width"] if b["upper_ms"] <= budget]
        if not uni or not fronts:
            print("no uniform baseline under the budget; raise --budget-share")
            return
        best_uni = min(uni, key=lambda b: b["perplexity"])
        better = [p for p in fronts if p["perplexity"] <= best_uni["perplexity"]]
        print(f"best uniform-width baseline under the budget: {best_uni['summary']}, ppl {best_uni['perplexity']:.1f}, "
              f"predicted {best_uni['latency_ms']:.0f} ms")
        chosen = []
        if better:
            pick = min(better, key=lambda p: p["latency_ms"])
            print(f"fastest searched point at least as good: {pick['summary']}, ppl {pick['perplexity']:.1f}, "
                  f"predicted {pick['latency_ms']:.0f} ms ({1 - pick['latency_ms'] / best_uni['latency_ms']:.0%} lower)")
            chosen = [pick]
        else:
            print("no searched point reaches the uniform baseline's perplexity")
        front = sorted({p["config_hash"]: p for p in fronts}.values(), key=lambda p: p["latency_ms"])
        pts = [*chosen, dict(best_uni, upper_ms=None), *pick_spread(front, args.verify)]
        rows = verify(ws, obj, pts, args.device, args.db, budget)
        for r in rows:
            print(f"  {r['summary']:42s} ppl {r['perplexity']:10.1f} predicted {r['latency_ms']:7.1f} ms, measured "
                  f"{r.get('measured_ms') or float('nan'):7.1f} ms ({r.get('error_pct', float('nan')):+.1%})"
                  f"{'' if r.get('meets_budget', True) else '  OVER BUDGET'}")
        if chosen and rows[0].get("measured_ms") and rows[1].get("measured_ms"):
            print(f"measured latency cut at equal-or-better perplexity: {1 - rows[0]['measured_ms'] / rows[1]['measured_ms']:.1%}")
        ver = [r for r in rows[len(chosen) + 1:] if r.get("measured_ms")]
        print(f"verified front points meeting the budget on the device: {sum(r['meets_budget'] for r in ver)}/{len(ver)}; "
              f"median |error| {np.median([abs(r['error_pct']) for r in ver]):.1%}")


if __name__ == "__main__":
    main()
