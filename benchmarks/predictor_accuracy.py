"""Predictor accuracy on held-out sub-networks beside the baselines, learning curve, and
batch prediction speed, from a measurement store.

    profile-device --host local --samples 120 --seed 11 --db runs/bench.db \\
        --min-time 0.5 --max-time 5 --seq-len 64,128 --past-len 128,512
    python benchmarks/predictor_accuracy.py --db runs/bench.db --device local
"""

from __future__ import annotations

import argparse
import logging
import time

import numpy as np

from predictor.data import load_measurements
from predictor.estimator import LatencyEstimator
from predictor.evaluate import compare, cross_validate, learning_curve
from predictor.features import ConfigBatch
from predictor.metrics import accuracy
from predictor.model import BoostedCostModel, model_form
from profiler.store import Store
from subnets.basemodel import load_base_info


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--db", required=True)
    ap.add_argument("--device", default="local")
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--phases", default="prefill,decode")
    ap.add_argument("--draws", type=int, default=3, help="learning curve: random train/test draws per size")
    ap.add_argument("--raw", action="store_true", help="score on the cells' own medians even where they are paired")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    base_id, dims = load_base_info(args.model)
    store = Store(args.db)
    for phase in args.phases.split(","):
        m = load_measurements(store, args.device, phase, dims, base_id, use_paired=not args.raw)
        shapes = sorted(set(zip(m.seq_len.tolist(), m.past_len.tolist())))
        print(f"\n== {phase}: {len(m)} measurements, {len(set(m.subnet_hashes.tolist()))} sub-networks, shapes {shapes}, "
              f"{m.excluded_unstable} unstable and {m.excluded_throttled} throttled excluded; {args.folds}-fold by sub-network; "
              f"{m.paired} paired (companion-normalized)")
        print(f"{'model':50s} {'±5%':>7s} {'±10%':>7s} {'MAPE':>7s} {'tau':>6s} {'bound cov.':>10s}")
        rows = compare(m, k=args.folds)[0]
        # the predictor before its base was chosen by cross-validation: the full physics base always
        pred, upper = cross_validate(LatencyEstimator(dims, phase, base="physics"), m, k=args.folds)
        rows["edgenas predictor, physics base only"] = accuracy(m.y_ms, pred, upper)
        for name, r in rows.items():
            cov = r.get("upper_coverage")
            print(f"{name:50s} {r['within_5pct']:7.1%} {r['within_10pct']:7.1%} {r['mape']:7.2%} {r['kendall_tau']:6.3f} "
                  f"{'-' if cov is None else f'{cov:.1%}':>10s}")
        print(f"learning curve (held-out 20% of sub-networks, mean of {args.draws} draws): n_train -> ±5% / ±10% / MAPE")
        for row in learning_curve(m, sizes=(20, 50, 100, 200), repeats=args.draws):
            cells = "   ".join(f"{k}: {v['within_5pct']:.0%} / {v['within_10pct']:.0%} / {v['mape']:.1%}"
                               for k, v in row.items() if k != "n_train")
            print(f"  {row['n_train']:4d}  {cells}")
        model = BoostedCostModel(dims, phase).fit(m.batch, m.seq_len, m.past_len, m.y_ms)
        reps = max(1, 100_000 // len(m))
        big = ConfigBatch(*(np.repeat(a, reps, 0) for a in (m.batch.kept, m.batch.kv_groups, m.batch.heads_per_group,
                                                             m.batch.neurons)))
        seq, past = np.repeat(m.seq_len, reps), np.repeat(m.past_len, reps)
        t = time.perf_counter()
        model.predict(big, seq, past)
        dt = time.perf_counter() - t
        one = ConfigBatch(*(a[:1] for a in (m.batch.kept, m.batch.kv_groups, m.batch.heads_per_group, m.batch.neurons)))
        t1 = time.perf_counter()
        for _ in range(200):
            model.predict(one, m.seq_len[:1], m.past_len[:1])
        single = (time.perf_counter() - t1) / 200
        print(f"predictor: {model_form(model.fit_info)}")
        print(f"speed: {len(big) / dt:,.0f} configs/s in a batch of {len(big):,}; {single * 1e3:.2f} ms for one "
              f"(boosted: {model.booster is not None})")
    store.close()


if __name__ == "__main__":
    main()
