"""Does choosing what to measure by the predictor's uncertainty need fewer measurements than
random choice? Pool-based simulation on a store of real measurements: a held-out quarter of
the sub-networks is the test set; from the rest, start with 10 random sub-networks and add
10 at a time, either at random or the most uncertain (``predictor.active``); after each
round, fit the predictor and score it on the test set.

    python benchmarks/active_profiling.py --db runs/bench.db --device local --phase prefill
"""

from __future__ import annotations

import argparse
import logging

import numpy as np

from predictor.active import select
from predictor.data import load_measurements
from predictor.evaluate import group_folds
from predictor.metrics import accuracy
from predictor.model import LatencyPredictor
from profiler.store import Store
from subnets.basemodel import load_base_info


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--db", required=True)
    ap.add_argument("--device", default="local")
    ap.add_argument("--phase", default="prefill")
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    base_id, dims = load_base_info("smollm2")
    store = Store(args.db)
    m = load_measurements(store, args.device, args.phase, dims, base_id)
    store.close()
    shape = (float(m.seq_len.max()), float(m.past_len.max()))
    results: dict[str, list[list[dict[str, float]]]] = {"random": [], "uncertainty": []}
    for seed in range(args.seeds):
        test = group_folds(m, 4, seed) == 0
        pool_hashes = sorted(set(m.subnet_hashes[~test].tolist()))
        configs = {h: m.configs[int(np.flatnonzero(m.subnet_hashes == h)[0])] for h in pool_hashes}
        rng = np.random.default_rng(seed)
        start = list(rng.choice(pool_hashes, 10, replace=False))
        for strategy in results:
            chosen = list(start)
            curve = []
            for _ in range(args.rounds):
                train = m.subset(np.isin(m.subnet_hashes, chosen))
                te = m.subset(test)
                p = LatencyPredictor(dims, args.phase, seed=seed).fit(train.batch, train.seq_len, train.past_len, train.y_ms)
                acc = accuracy(te.y_ms, p.predict(te.batch, te.seq_len, te.past_len))
                acc["n_subnets"] = len(chosen)
                curve.append(acc)
                rest = [h for h in pool_hashes if h not in chosen]
                if strategy == "random":
                    chosen += list(rng.choice(rest, min(10, len(rest)), replace=False))
                else:
                    picks = select(train, [configs[h] for h in rest], 10, shape[0], shape[1], seed=seed)
                    chosen += [c.config_hash() for c in picks]
            results[strategy].append(curve)
    print(f"{args.phase}: {len(m)} measurements of {len(set(m.subnet_hashes.tolist()))} sub-networks; mean over {args.seeds} splits")
    print(f"{'sub-networks measured':>22s} {'random: ±5% / MAPE':>22s} {'uncertainty: ±5% / MAPE':>26s}")
    for r in range(args.rounds):
        cells = []
        for strategy in results:
            w5 = np.mean([c[r]["within_5pct"] for c in results[strategy]])
            mape = np.mean([c[r]["mape"] for c in results[strategy]])
            cells.append(f"{w5:.1%} / {mape:.2%}")
        n = results["random"][0][r]["n_subnets"]
        print(f"{n:22d} {cells[0]:>22s} {cells[1]:>26s}")


if __name__ == "__main__":
    main()
