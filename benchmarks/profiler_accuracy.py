"""Is the profiler's number the model's latency? Side by side in one run, 1 thread:

1. the profiler's median (agent, random weights materialized on the board) against a plain,
   independent onnxruntime loop on the real-weights file of the same sub-network;
2. random weights against real weights through the profiler;
3. run-to-run spread of a sub-network's median over 5 sweeps (fresh agent each time);
4. sub-networks per hour and where the time goes.

    python benchmarks/profiler_accuracy.py [--n 4] [--rounds 3] [--repeats 5]
"""

from __future__ import annotations

import argparse
import logging
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

from export.onnx_graphs import ExportOptions, export_subnet
from profiler.hosts import resolve_host
from profiler.store import Store
from profiler.sweep import Profiler, SweepSpec
from profiler.targets import make_target
from subnets.workspace import Workspace


def plain_ort_median(path: Path, phase: str, seconds: float = 3.0) -> float:
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    rng = np.random.RandomState(0)
    feeds = {}
    for i in sess.get_inputs():
        if i.name == "input_ids":
            feeds[i.name] = rng.randint(0, 1000, size=(1, 128 if phase == "prefill" else 1)).astype(np.int64)
        else:
            feeds[i.name] = rng.standard_normal((1, i.shape[1], 128, i.shape[3])).astype(np.float32)
    for _ in range(3):
        sess.run(None, feeds)
    times = []
    t_end = time.perf_counter() + seconds
    while time.perf_counter() < t_end or len(times) < 10:
        a = time.perf_counter()
        sess.run(None, feeds)
        times.append(time.perf_counter() - a)
    return statistics.median(times) * 1000


def profile(ws, configs, db: Path, weights: str, timing: dict) -> dict:
    spec = SweepSpec(seq_lens=(128,), past_lens=(128,), threads=1, weights=weights, timing=timing, reference_every=0)
    store = Store(db)
    summary = Profiler(ws, make_target(resolve_host("local")), store, spec).run(configs)
    rows = {(r["subnet_hash"], r["phase"]): r["median_ms"] for r in store.measurement_rows()}
    store.close()
    return {"rows": rows, "summary": summary}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    ws = Workspace.open("smollm2")
    configs = [ws.space.full(), *ws.space.sample(args.n - 1, args.seed, layer_ranking=ws.importance.layer_ranking())]
    timing = {"min_time_s": 2.0, "max_time_s": 20.0}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        # Interleaved rounds: this shared 2-core box drifts by a few percent over minutes, so
        # each comparison is made round by round and the medians over rounds compared.
        print(f"1-2. profiler (random weights) vs plain onnxruntime loop (real weights) vs profiler (real weights),\n"
              f"     median over {args.rounds} interleaved rounds, ms")
        print(f"{'sub-network':42s} {'phase':8s} {'profiler':>9s} {'plain':>9s} {'diff':>7s} {'real w.':>9s} {'diff':>7s}")
        diffs, wdiffs = [], []
        for c in configs:
            exp = export_subnet(ws.weights(c), tmp / "plain", ExportOptions(weights="real"))
            got: dict = {}
            for rnd in range(args.rounds):
                g = profile(ws, [c], tmp / f"g{c.config_hash()}{rnd}.db", "none", timing)
                r = profile(ws, [c], tmp / f"w{c.config_hash()}{rnd}.db", "real", timing)
                for phase in ("prefill", "decode"):
                    got.setdefault((phase, "p"), []).append(g["rows"][(c.config_hash(), phase)])
                    got.setdefault((phase, "q"), []).append(plain_ort_median(exp.path(phase), phase))
                    got.setdefault((phase, "r"), []).append(r["rows"][(c.config_hash(), phase)])
            for phase in ("prefill", "decode"):
                p, q, r = (statistics.median(got[(phase, k)]) for k in ("p", "q", "r"))
                diffs.append(p / q - 1)
                wdiffs.append(p / r - 1)
                print(f"{c.summary():42s} {phase:8s} {p:9.2f} {q:9.2f} {p / q - 1:+7.1%} {r:9.2f} {p / r - 1:+7.1%}")
        print(f"profiler vs plain loop: max |diff| {max(map(abs, diffs)):.1%}, mean {statistics.mean(diffs):+.1%}, "
              f"within 2%: {sum(abs(d) <= 0.02 for d in diffs)}/{len(diffs)}")
        print(f"random vs real weights: max |diff| {max(map(abs, wdiffs)):.1%}, mean {statistics.mean(wdiffs):+.1%}, "
              f"within 2%: {sum(abs(d) <= 0.02 for d in wdiffs)}/{len(wdiffs)}")
        graph_only = {"summary": profile(ws, configs, tmp / "all.db", "none", timing)["summary"]}

        print(f"\n3. run-to-run spread over {args.repeats} sweeps (fresh agent, fresh store each)")
        meds: dict = {}
        for i in range(args.repeats):
            res = profile(ws, configs[:2], tmp / f"r{i}.db", "none", timing)
            for k, v in res["rows"].items():
                meds.setdefault(k, []).append(v)
        by_hash = {c.config_hash(): c.summary() for c in configs}
        for (h, phase), vs in meds.items():
            cov = statistics.stdev(vs) / statistics.mean(vs)
            print(f"{by_hash[h]:42s} {phase:8s} medians {', '.join(f'{v:.2f}' for v in vs)}  CoV {cov:.2%}")

        s = graph_only["summary"]
        sec = s.seconds
        tot = sec["total"]
        print(f"\n4. first sweep: {s.subnets_measured} sub-networks, {s.measured} cells in {tot:.1f} s = "
              f"{s.subnets_per_hour:.0f} sub-networks/hour; export {sec['export'] / tot:.0%}, upload "
              f"{sec['upload'] / tot:.0%}, session load {sec['session_load'] / tot:.0%}, timing {sec['timing'] / tot:.0%}, "
              f"other {(tot - sec['export'] - sec['upload'] - sec['session_load'] - sec['timing']) / tot:.0%}")


if __name__ == "__main__":
    main()
