"""The LM head's precision on onnxruntime: int8 and int4 graphs with the LM head kept fp32
(as before exporter 2) against the same graphs with it quantized (a copy of the tied
embedding at int8 / int4; the embedding still gathered from fp32), side by side in one run.

    python benchmarks/lm_head.py --samples 3 --rounds 3 --threads 1

Per sub-network (the full model and uniform-width samples): prefill S=128 and decode P=128,
each cell the median over rounds (the variants interleaved in each round) of a 1 s median in
its own session of the agent's runner; the perplexity of each variant (torch on the graph's
arithmetic, held-out docstrings) and its file size."""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
from pathlib import Path

import numpy as np
import onnxruntime as ort
from precision_speed import agent_module, median_ms  # benchmarks/ is this script's folder

from export.mix import PrecisionMix
from export.onnx_graphs import ExportOptions, export_subnet
from export.quantize import MixArithmetic
from subnets.config import SubnetConfig
from subnets.workspace import Workspace

VARIANTS = (("int8", "fp32"), ("int8", "int8"), ("int4", "fp32"), ("int4", "int8"), ("int4", "int4"))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--samples", type=int, default=3, help="uniform-width sub-networks besides the full model")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=1.0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--quality-tokens", type=int, default=1024)
    args = ap.parse_args()
    ws = Workspace.open(args.model, eval_budget=args.quality_tokens)
    d, full = ws.space.dims, ws.space.full()
    widths = np.linspace(d.intermediate_size, d.intermediate_size // 2, args.samples + 1)[1:]
    configs = [full, *(SubnetConfig.uniform(full.base_id, range(d.num_layers), d.num_kv_heads, d.heads_per_group,
                                            int(n) // 64 * 64) for n in widths)]
    runtime, root = agent_module("agent_runtime"), Path(tempfile.mkdtemp())
    names = [f"{w} head {h}" for w, h in VARIANTS]
    print("| sub-network | " + " | ".join(names) + " |")
    print("| --- |" + " --- |" * len(names))
    for c in configs:
        w, L = ws.weights(c), len(c.layers)
        mixes = {n: PrecisionMix.uniform("onnxruntime", kind, L, head=head) for n, (kind, head) in zip(names, VARIANTS)}
        exps = {n: export_subnet(w, root / c.config_hash() / n.replace(" ", "-"), ExportOptions(mix=m, weights="real"))
                for n, m in mixes.items()}
        cells = {}
        for phase, seq, past in (("prefill", 128, 0), ("decode", 1, 128)):
            sessions = {n: runtime.OrtSession(ort, str(e.path(phase)), threads=args.threads) for n, e in exps.items()}
            for s in sessions.values():
                s.prepare(s.make_feeds(np, 1, seq, past, 1000))
            per: dict[str, list[float]] = {n: [] for n in names}
            for _ in range(args.rounds):
                for n, s in sessions.items():
                    per[n].append(median_ms(s, args.seconds))
            cells[phase] = {n: statistics.median(v) for n, v in per.items()}
        ppl = {n: ws.at_precision(MixArithmetic(m)).perplexity(c) for n, m in mixes.items()}
        print(f"| {c.summary()} | " + " | ".join(
            f"{cells['prefill'][n]:.0f} / {cells['decode'][n]:.1f} ms, ppl {ppl[n]:.2f}, {exps[n].weights_bytes / 1e6:.0f} MB"
            for n in names) + " |", flush=True)
        shutil.rmtree(root / c.config_hash(), ignore_errors=True)
    shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
