"""Why ranking matters: perplexity of SmolLM2 sub-networks whose units are chosen by
activation-aware importance, by weight magnitude, or by position.

    python benchmarks/importance_table.py [--budget 4096]

Held-out text: stdlib docstrings (the split not used for calibration)."""

from __future__ import annotations

import argparse
import logging

import torch

from subnets.config import SubnetConfig
from subnets.extract import extract
from subnets.importance import Importance, importance_for
from subnets.quality import perplexity
from subnets.workspace import Workspace


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--budget", type=int, default=4096, help="held-out tokens")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(2)
    ws = Workspace.open("smollm2", eval_budget=args.budget)
    base, bid = ws.base, ws.base.base_id
    act = ws.importance
    mag = importance_for(base, method="magnitude")
    L = base.dims.num_layers

    def ppl(imp: Importance, c: SubnetConfig) -> float:
        return perplexity(extract(base, imp, c), ws.eval_tokens())

    rows = [("full model", "-", ppl(act, ws.space.full()))]
    for n in (1024, 768):
        c = SubnetConfig.uniform(bid, range(L), 3, 3, n)
        rows += [(f"MLP {n} neurons", "activation", ppl(act, c)), (f"MLP {n} neurons", "magnitude", ppl(mag, c))]
    c = SubnetConfig.uniform(bid, range(L), 3, 2, 1536)
    rows += [("6 heads (3 groups x 2)", "activation", ppl(act, c)), ("6 heads (3 groups x 2)", "magnitude", ppl(mag, c))]
    c = SubnetConfig.uniform(bid, range(L), 2, 3, 1536)
    rows += [("6 heads (2 groups x 3)", "activation", ppl(act, c))]
    for k in (24, 20):
        rows += [
            (f"{k} layers", "block influence", ppl(act, SubnetConfig.uniform(bid, act.kept_layers(k), 3, 3, 1536))),
            (f"{k} layers", f"first {k}", ppl(act, SubnetConfig.uniform(bid, range(k), 3, 3, 1536))),
            (f"{k} layers", f"last {k}", ppl(act, SubnetConfig.uniform(bid, range(L - k, L), 3, 3, 1536))),
        ]
    print(f"perplexity, {ws.eval_tokens().num_tokens} held-out tokens ({base.base_id})")
    print(f"{'sub-network':26s} {'ranking':18s} {'perplexity':>12s}")
    for name, how, p in rows:
        print(f"{name:26s} {how:18s} {p:12.1f}")


if __name__ == "__main__":
    main()
