"""Cost of a super-network training step on SmolLM2, side by side in one run.

1. A sub-network's step (forward + backward, same tokens) through the shared-weight view
   against the same sub-network extracted as a dense model; interleaved, median of R.
2. A sandwich step (one objective over largest + smallest + k random) against the sum of its
   members' dense steps.
3. Training throughput of `edgenas train-supernet` with 1 process and with 2 processes
   (torchrun, gloo), the same per-process batch; tokens/s from the run logs.

    python benchmarks/training_speed.py --threads 1 --reps 5 [--throughput-steps 6]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from subnets.extract import extract
from subnets.workspace import Workspace
from training.loss import LossWeights
from training.objective import RecoveryObjective
from training.sampler import SubnetSampler, analytic_latency
from training.sorting import sort_by_importance
from training.supernet import SuperNetwork

REPO = Path(__file__).resolve().parents[1]


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def step_fn(model, ids, config=None):
    def f() -> None:
        logits = model(ids, config) if config is not None else model(input_ids=ids, use_cache=False).logits
        torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten()).backward()
        for p in model.parameters():
            p.grad = None
    return f


def throughput(procs: int, steps: int, threads: int) -> dict[str, float]:
    out = Path(tempfile.mkdtemp(prefix="edgenas-tput-"))
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    cmd = ["train-supernet", "--steps", str(steps), "--checkpoint-every", str(10 * steps), "--cpu", "--out", str(out)]
    if procs == 1:
        argv = [sys.executable, "-m", "edgenas", *cmd]
    else:
        argv = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(procs), "-m", "edgenas", *cmd]
    done = subprocess.run(argv, env=env, cwd=REPO, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} failed:\n{done.stderr[-3000:]}")
    rows = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    # the first step pays allocator warm-up; rate over the rest
    dt = rows[-1]["seconds"] - rows[0]["seconds"]
    tokens = rows[-1]["tokens_per_s"] * rows[-1]["seconds"] - rows[0]["tokens_per_s"] * rows[0]["seconds"]
    return {"processes": procs, "threads_each": threads, "tokens_per_s": tokens / dt, "steps": steps}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--throughput-steps", type=int, default=6)
    ap.add_argument("--throughput-only", action="store_true", help="skip the step-cost comparisons")
    args = ap.parse_args()
    if args.throughput_only:
        for r in (throughput(1, args.throughput_steps, 2), throughput(2, args.throughput_steps, 1)):
            print(json.dumps(r), flush=True)
        return
    torch.set_num_threads(args.threads)
    ws = Workspace.open(args.model)
    model = copy.deepcopy(ws.base.model)
    sort_by_importance(model, ws.importance, ws.space.dims.num_kv_heads, ws.space.dims.head_dim)
    net = SuperNetwork(model.train(), ws.space.dims)
    ids = ws.eval_tokens().windows[: args.batch, : args.seq_len]
    sampler = SubnetSampler(ws.space, ws.importance.layer_ranking(), analytic_latency(ws.space), "sandwich", k=2,
                            latency_range=(0.5, 1.0), seed=0)
    members = sampler.configs(0)
    dense = [extract(ws.base, ws.importance, c).train() for c in members]
    results = {"threads": args.threads, "tokens": int(ids.numel()), "members": []}
    for c, d in zip(members, dense):
        view, plain = [], []
        step_fn(net, ids, c)()  # warm-up
        step_fn(d, ids)()
        for _ in range(args.reps):
            view.append(timed(step_fn(net, ids, c)))
            plain.append(timed(step_fn(d, ids)))
        row = {"subnet": c.summary(), "view_s": statistics.median(view), "dense_s": statistics.median(plain)}
        row["ratio"] = row["view_s"] / row["dense_s"]
        results["members"].append(row)
        print(json.dumps(row), flush=True)
    objective = RecoveryObjective(net, "inplace", LossWeights())

    def sandwich() -> None:
        loss, _ = objective(ids, members)
        loss.backward()
        for p in net.parameters():
            p.grad = None

    sandwich()
    sw = statistics.median(timed(sandwich) for _ in range(args.reps))
    dense_sum = sum(r["dense_s"] for r in results["members"])
    results["sandwich_s"], results["dense_sum_s"] = sw, dense_sum
    results["sandwich_over_sum"] = sw / dense_sum
    print(json.dumps({"sandwich_s": sw, "sum_of_dense_s": dense_sum, "ratio": sw / dense_sum}), flush=True)
    if args.throughput_steps > 0:
        results["throughput"] = [throughput(1, args.throughput_steps, 2), throughput(2, args.throughput_steps, 1)]
        for r in results["throughput"]:
            print(json.dumps(r), flush=True)
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
