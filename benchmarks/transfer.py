"""Few-shot transfer of a latency predictor to a new device: learning curves on device B,
trained from scratch against adapted from device A's predictor.

Only one CPU is reachable here, so device B is this CPU under another runtime
configuration, in the same store as A:

- ``--target-backend ort-cpu:opt-disabled``: onnxruntime with graph optimizations off (no
  fusions, no constant folding): per-op overheads grow, so B is not A rescaled. 1 thread,
  as quiet as A.
- ``--target-threads 2 --target-backend ort-cpu``: 2 threads (measured ``--paired``):
  B / A's prediction 0.53-0.71 per sub-network, a device reshaped, not rescaled.

    profile-device --host local --samples 120 --seed 11 --seq-len 64,128 --db runs/bench.db ...
    profile-device --host local --samples 40 --seed 31 --graph-opt disabled --phases prefill --seq-len 128 \
        --db runs/bench.db
    python benchmarks/transfer.py --db runs/bench.db --target-backend ort-cpu:opt-disabled
    profile-device --host local --samples 40 --seed 65 --threads 2 --paired --db runs/bench.db ...
    python benchmarks/transfer.py --db runs/bench.db --target-threads 2 --target-backend ort-cpu --phase decode
"""

from __future__ import annotations

import argparse
import logging

import numpy as np

from predictor.data import load_measurements
from predictor.evaluate import group_folds
from predictor.metrics import accuracy
from predictor.model import BoostedCostModel
from profiler.store import Store
from subnets.basemodel import load_base_info


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--db", required=True)
    ap.add_argument("--device", default="local")
    ap.add_argument("--source-threads", type=int, default=1)
    ap.add_argument("--target-threads", type=int, default=1)
    ap.add_argument("--source-backend", default="ort-cpu")
    ap.add_argument("--target-backend", default="ort-cpu:opt-disabled")
    ap.add_argument("--phase", default="prefill")
    ap.add_argument("--seeds", type=int, default=10)
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    base_id, dims = load_base_info("smollm2")
    store = Store(args.db)
    a = load_measurements(store, args.device, args.phase, dims, base_id, threads=args.source_threads,
                          backend=args.source_backend)
    b = load_measurements(store, args.device, args.phase, dims, base_id, threads=args.target_threads,
                          backend=args.target_backend)
    store.close()
    source = BoostedCostModel(dims, args.phase).fit(a.batch, a.seq_len, a.past_len, a.y_ms)
    ratio = np.median(b.y_ms) / np.median(a.y_ms)
    print(f"source: {len(a)} measurements ({args.source_backend}, {args.source_threads} thread(s)); target: {len(b)} "
          f"({args.target_backend}, {args.target_threads} thread(s); {b.excluded_unstable} unstable excluded); "
          f"median latency ratio B/A {ratio:.2f}")
    r = b.y_ms / source.predict(b.batch, b.seq_len, b.past_len)
    print(f"B measured / A's prediction per sub-network: {r.min():.2f}..{r.max():.2f} (CoV {r.std() / r.mean():.1%}): "
          f"a constant factor would not need these measurements")
    print(f"{'n on B':>6s} {'from scratch: ±5% / ±10% / MAPE':>34s} {'with transfer: ±5% / ±10% / MAPE':>36s}")
    for n in (5, 10, 15, 20):
        res: dict[str, list[dict[str, float]]] = {"scratch": [], "transfer": []}
        for seed in range(args.seeds):
            test = group_folds(b, 3, seed) == 0
            pool = np.flatnonzero(~test)
            if len(pool) < n:
                continue
            pick = np.zeros(len(b), dtype=bool)
            pick[np.random.default_rng(seed).choice(pool, n, replace=False)] = True
            tr, te = b.subset(pick), b.subset(test)
            for name, prior in (("scratch", None), ("transfer", source)):
                if prior is None and n < 10:
                    continue  # without a prior the predictor refuses fewer than 10 measurements
                m = BoostedCostModel(dims, args.phase, prior=prior).fit(tr.batch, tr.seq_len, tr.past_len, tr.y_ms)
                res[name].append(accuracy(te.y_ms, m.predict(te.batch, te.seq_len, te.past_len)))
        cells = []
        for name in ("scratch", "transfer"):
            r = res[name]
            cells.append("-" if not r else "{:.0%} / {:.0%} / {:.1%}".format(*(np.mean([x[k] for x in r]) for k in (
                "within_5pct", "within_10pct", "mape"))))
        print(f"{n:6d} {cells[0]:>34s} {cells[1]:>36s}")


if __name__ == "__main__":
    main()
