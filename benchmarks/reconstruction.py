"""Training-free reconstruction (``--reconstruct``): held-out perplexity of sub-networks sliced
plainly and with their output projections refitted (subnets/reconstruct.py), side by side.

    python benchmarks/reconstruction.py                      # SmolLM2, 1 thread
    python benchmarks/reconstruction.py --model ./my-llama --samples 8

Sub-networks: the search's hand-made baselines (uniform MLP width, layer dropping), uniform
head pruning, and seeded per-layer samples (heads and neurons cut per layer, as the search
proposes them). Also timed: collecting the statistics (once per base model, then cached)
and refitting one sub-network, beside evaluating its perplexity."""

from __future__ import annotations

import argparse
import logging
import math
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from subnets.config import SubnetConfig  # noqa: E402
from subnets.cost import count_params  # noqa: E402
from subnets.reconstruct import grams_for  # noqa: E402
from subnets.workspace import Workspace  # noqa: E402


def configs(ws: Workspace, samples: int, seed: int) -> list[tuple[str, SubnetConfig]]:
    d, bid = ws.space.dims, ws.space.base_id
    out = [(f"uniform MLP {n}", SubnetConfig.uniform(bid, range(d.num_layers), d.num_kv_heads, d.heads_per_group, n))
           for n in (1280, 1024, 768, 512) if n < d.intermediate_size]
    heads = max(1, d.heads_per_group - 1)
    out += [(f"{heads} of {d.heads_per_group} heads per group, MLP {n}",
             SubnetConfig.uniform(bid, range(d.num_layers), d.num_kv_heads, heads, n)) for n in (d.intermediate_size, 1024)]
    out += [(f"{k} layers kept", SubnetConfig.uniform(bid, ws.importance.kept_layers(k), d.num_kv_heads,
                                                      d.heads_per_group, d.intermediate_size))
            for k in (round(d.num_layers * 0.87), round(d.num_layers * 0.73))]
    sampled = ws.space.sample(samples, seed, granularity="per-layer", layer_ranking=ws.importance.layer_ranking())
    out += [(f"per-layer sample {i}", c) for i, c in enumerate(sampled)]
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--samples", type=int, default=4)
    ap.add_argument("--seed", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    plain = Workspace.open(args.model)
    t0 = time.perf_counter()
    grams = grams_for(plain.base, cache=False)
    t_grams = time.perf_counter() - t0
    refitted = plain.reconstructing(grams=grams)
    full_params = count_params(plain.space.full(), plain.space.dims)
    full = plain.perplexity(plain.space.full())
    print(f"{plain.base.base_id}: full model perplexity {full:.2f} on {plain.eval_tokens().num_tokens} held-out tokens; "
          f"statistics collected on {grams.calibration['tokens']} calibration tokens in {t_grams:.0f} s "
          f"({args.threads} thread(s))", flush=True)
    print("| sub-network | params | sliced | reconstructed | reconstructed / sliced |")
    print("| --- | --- | --- | --- | --- |")
    ratios, t_refit, t_eval = [], [], []
    for name, cfg in configs(plain, args.samples, args.seed):
        a = plain.perplexity(cfg)
        t0 = time.perf_counter()
        w = refitted.weights(cfg)
        t_refit.append(time.perf_counter() - t0)
        del w
        t0 = time.perf_counter()
        b = refitted.perplexity(cfg)
        t_eval.append(time.perf_counter() - t0)
        ratios.append(b / a)
        share = count_params(cfg, plain.space.dims) / full_params
        print(f"| {name} ({cfg.summary()[:40]}) | {share:.0%} | {a:.2f} | {b:.2f} | {b / a:.2f} |", flush=True)
    geo = math.exp(sum(math.log(r) for r in ratios) / len(ratios))
    print(f"geometric mean of reconstructed / sliced: {geo:.2f}; refitting a sub-network took "
          f"{sorted(t_refit)[len(t_refit) // 2]:.2f} s (median; its perplexity evaluation, refit included, "
          f"{sorted(t_eval)[len(t_eval) // 2]:.1f} s)")


if __name__ == "__main__":
    main()
