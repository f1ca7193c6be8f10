"""Does choosing what to measure by the predictor's uncertainty need fewer measurements than
random choice? Pool-based simulation on a store of real measurements: a held-out quarter of
the sub-networks is the test set; from the rest, start with 10 random sub-networks and add
10 at a time, either at random or the most uncertain (``predictor.active``); after each
round, fit the predictor and score it on the test set.

With ``--near SHARE`` the test set is the held-out sub-networks whose measured latency (at the
largest shape) lies within 15% of SHARE x the full model's latency, the region a search with
``--budget-share SHARE`` decides in, and the active choice is ``select(..., near=SHARE)``.

    python benchmarks/active_profiling.py --db runs/bench.db --device local --phase prefill
    python benchmarks/active_profiling.py --db runs/bench.db --phase decode --near 0.85 --start 6 --step 4
"""

from __future__ import annotations

import argparse
import logging

import numpy as np

from predictor.active import BAND, full_config, select
from predictor.data import load_measurements
from predictor.evaluate import group_folds
from predictor.features import ConfigBatch
from predictor.metrics import accuracy
from predictor.model import BoostedCostModel
from profiler.store import Store
from subnets.basemodel import load_base_info


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--db", required=True)
    ap.add_argument("--device", default="local")
    ap.add_argument("--phase", default="prefill")
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--start", type=int, default=10, help="random sub-networks to start from")
    ap.add_argument("--step", type=int, default=10, help="sub-networks added per round")
    ap.add_argument("--near", type=float, default=None, help="score and choose near this share of the full latency")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    base_id, dims = load_base_info("smollm2")
    store = Store(args.db)
    m = load_measurements(store, args.device, args.phase, dims, base_id)
    store.close()
    shape = (float(m.seq_len.max()), float(m.past_len.max()))
    at_shape = (m.seq_len == shape[0]) & (m.past_len == shape[1])
    region = np.ones(len(m), dtype=bool)
    if args.near is not None:
        full_ms = float(BoostedCostModel(dims, args.phase).fit(m.batch, m.seq_len, m.past_len, m.y_ms).predict(
            ConfigBatch.from_configs([full_config(m)], dims.num_layers), shape[0], shape[1])[0])
        hs = m.subnet_hashes[at_shape & (np.abs(m.y_ms / (args.near * full_ms) - 1) <= BAND)]
        region = np.isin(m.subnet_hashes, hs)
        print(f"region: {len(set(hs.tolist()))} sub-networks measured within {BAND:.0%} of {args.near} x "
              f"{full_ms:.2f} ms (the full model's predicted latency at shape {shape})")
    results: dict[str, list[list[dict[str, float]]]] = {"random": [], "uncertainty": []}
    for seed in range(args.seeds):
        held = group_folds(m, 4, seed) == 0
        test = held & region
        if not test.any():
            continue
        pool_hashes = sorted(set(m.subnet_hashes[~held].tolist()))
        configs = {h: m.configs[int(np.flatnonzero(m.subnet_hashes == h)[0])] for h in pool_hashes}
        rng = np.random.default_rng(seed)
        start = list(rng.choice(pool_hashes, args.start, replace=False))
        for strategy in results:
            rng = np.random.default_rng(seed + 1000)
            chosen = list(start)
            curve = []
            for _ in range(args.rounds):
                train = m.subset(np.isin(m.subnet_hashes, chosen))
                te = m.subset(test)
                p = BoostedCostModel(dims, args.phase, seed=seed).fit(train.batch, train.seq_len, train.past_len, train.y_ms)
                acc = accuracy(te.y_ms, p.predict(te.batch, te.seq_len, te.past_len))
                acc["n_subnets"] = len(chosen)
                curve.append(acc)
                rest = [h for h in pool_hashes if h not in chosen]
                if strategy == "random":
                    chosen += list(rng.choice(rest, min(args.step, len(rest)), replace=False))
                else:
                    picks = select(train, [configs[h] for h in rest], args.step, shape[0], shape[1], seed=seed,
                                   near=args.near)
                    chosen += [c.config_hash() for c in picks]
            results[strategy].append(curve)
    if not results["random"]:
        raise SystemExit("no held-out sub-network lies in the region; measure more, or widen --near")
    print(f"{args.phase}: {len(m)} measurements of {len(set(m.subnet_hashes.tolist()))} sub-networks; mean over {len(results['random'])} splits"
          f"{'' if args.near is None else ' (scored on the region only)'}")
    print(f"{'sub-networks measured':>22s} {'random: ±5% / MAPE':>22s} {'active: ±5% / MAPE':>26s}")
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
