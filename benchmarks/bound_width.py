"""How far above the prediction the search's workload bound sits: fit both phases' predictors
on a store, then ``predict_both`` on sampled sub-networks (the budget a bound spends).

    python benchmarks/bound_width.py --db runs/bench.db --device local --workload 128,64
"""

from __future__ import annotations

import argparse
import logging

import numpy as np

from predictor.data import load_measurements
from predictor.features import ConfigBatch
from predictor.model import BoostedCostModel
from predictor.workload import LatencyObjective, Workload
from profiler.store import Store
from subnets.basemodel import load_base_info
from subnets.space import SearchSpace


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--db", required=True)
    ap.add_argument("--device", default="local")
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--workload", default="128,64")
    ap.add_argument("--samples", type=int, default=500)
    ap.add_argument("--granularity", default="per-layer")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    base_id, dims = load_base_info(args.model)
    store = Store(args.db)
    try:
        fitted = {}
        for phase in ("prefill", "decode"):
            m = load_measurements(store, args.device, phase, dims, base_id)
            fitted[phase] = BoostedCostModel(dims, phase).fit(m.batch, m.seq_len, m.past_len, m.y_ms)
    finally:
        store.close()
    obj = LatencyObjective(fitted["prefill"], fitted["decode"], Workload.parse(args.workload), args.device, base_id)
    configs = SearchSpace(base_id, dims).sample(args.samples, 5, granularity=args.granularity)
    mean, upper = obj.predict_both(ConfigBatch.from_configs(configs, dims.num_layers))
    r = upper / mean
    print(f"workload bound / prediction over {len(configs)} sub-networks: median {np.median(r):.4f}, "
          f"p10 {np.percentile(r, 10):.4f}, p90 {np.percentile(r, 90):.4f}; stated: {obj.bound()}")


if __name__ == "__main__":
    main()
