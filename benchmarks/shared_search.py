"""Search workers sharing one study: wall time of 1 and 2 workers at equal perplexity
evaluations on this 2-core CPU, the hypervolume each reaches, and that no candidate was
evaluated twice.

    python benchmarks/shared_search.py --predictor runs/pipeline-int4/predictors/local \\
        --precision int4 --evals 40

Each run is a fresh study (its own storage) of ``search-subnets`` on the embedded SmolLM2,
the same settings besides ``--workers``; ``--storage`` picks the storage kind (default a
journal file; a PostgreSQL URL works the same). Two workers on two cores each get one torch
thread where one worker gets both, so the speed-up is the perplexity evaluation's parallel
efficiency on this box, not a second machine's."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from search.request import SearchRequest  # noqa: E402
from search.run import search  # noqa: E402


def one(args: argparse.Namespace, workers: int, root: Path) -> dict:
    out = root / f"w{workers}"
    storage = args.storage or f"journal:{out / 'study.journal'}"
    request = SearchRequest(device="local", predictor=(args.predictor,), latency_budget_ms=args.budget_ms,
                            workload=args.workload, algorithm=args.algorithm, evals=args.evals, granularity="per-layer",
                            max_perplexity=args.max_perplexity, db=out / "m.db", out=out, model="smollm2",
                            seed=args.seed, quality_tokens=args.quality_tokens,
                            precision=args.precision, no_baselines=True, storage=storage,
                            study_name=f"w{workers}-{int(time.time())}", workers=workers)
    t0 = time.perf_counter()
    res = search(request).to_dict()
    return {"workers": workers, "seconds": time.perf_counter() - t0, "hypervolume": res["hypervolume"],
            "front": len(res["front"]), "ppl_evaluations": res["ppl_evaluations"]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--predictor", type=Path, required=True)
    ap.add_argument("--precision", default="fp32")
    ap.add_argument("--evals", type=int, default=40)
    ap.add_argument("--budget-ms", type=float, default=None, help="default: --budget-share of the full model's prediction")
    ap.add_argument("--budget-share", type=float, default=0.9)
    ap.add_argument("--max-perplexity", default=None, help="a quality ceiling (default none: the front of all points)")
    ap.add_argument("--workload", default="128,64")
    ap.add_argument("--algorithm", default="nsga2")
    ap.add_argument("--quality-tokens", type=int, default=1024)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--storage", default=None, help="an Optuna storage URL (default: a journal file per run)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args.budget_ms is None:
        from predictor.features import ConfigBatch
        from predictor.workload import LatencyObjective, Workload
        from subnets.workspace import Workspace

        ws = Workspace.open("smollm2")
        obj = LatencyObjective.load(args.predictor, Workload.parse(args.workload), "local", ws.base.base_id)
        args.budget_ms = args.budget_share * float(obj.predict(ConfigBatch.from_configs([ws.space.full()], 30))[0])
    root = Path(tempfile.mkdtemp(prefix="edgenas-shared-"))
    rows = [one(args, w, root) for w in (1, 2)]
    print(f"{args.algorithm}, {args.evals} evaluations, budget {args.budget_ms:.0f} ms, precision {args.precision}, "
          f"{args.quality_tokens} held-out tokens per perplexity")
    for r in rows:
        print(f"  {r['workers']} worker(s): {r['seconds']:.0f} s ({rows[0]['seconds'] / r['seconds']:.2f}x one worker's "
              f"speed), hypervolume {r['hypervolume']:.1f}, front {r['front']} points, "
              f"{r['ppl_evaluations']} perplexity evaluations")
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
