"""Weight precision on this CPU: latency of fp32, fp16, int8 (dynamic, MatMulInteger) and
int4 (MatMulNBits) onnxruntime graphs of the same sub-networks, plain and with onnxruntime's
fused decoder operators (GroupQueryAttention, SkipSimplifiedLayerNormalization; "shared": with
the in-place KV buffer), and with ``--llama-cpp DIR`` of their GGUF files at F16, Q8_0 and
Q4_0 under llama.cpp's llama-bench, side by side in one run, and the perplexity each precision
costs.

    python benchmarks/precision_speed.py --samples 20 --quality-samples 5 --rounds 2 --threads 1 \
        --llama-cpp ~/.cache/edgenas/llama.cpp/0.3.36/bin

Latency: each graph in its own session of the agent's runner (1 thread; shared KV buffers
bound as the agent binds them), prefill S=128 and decode at past 128 and 512; the rounds
interleave the precisions, and each cell's figure is the median over rounds of a 1 s median,
so slow phases of the machine hit all precisions alike. Quality: perplexity
on held-out tokens of torch running exactly the graph's arithmetic (dequantized weights; for
int8 also the per-tensor uint8 activations; for GGUF types the Q8_0-rounded activations of
llama.cpp's CPU kernels). llama.cpp cells: the median of llama-bench's repetitions (about the
same timed seconds), prefill ``-p 128``, decode ``-n 1 -d P``."""

from __future__ import annotations

import argparse
import importlib
import logging
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from device_agents import AGENT_DIR
from export.gguf_file import GgufOptions, export_gguf
from export.onnx_graphs import ExportOptions, export_subnet
from export.quantize import dequantized, emulate
from subnets.extract import build_model
from subnets.quality import perplexity
from subnets.workspace import Workspace

PRECISIONS = ("fp32", "fp16", "int8", "int4")
# onnxruntime graphs timed: (name, ExportOptions); "fused": onnxruntime's contrib decoder
# operators, "shared": those with the in-place KV buffer
ORT = (("fp32", ExportOptions()), ("fp16", ExportOptions(precision="fp16")), ("int8", ExportOptions(precision="int8")),
       ("int4", ExportOptions(precision="int4")), ("fused fp32", ExportOptions(graph="fused")),
       ("shared fp32", ExportOptions(graph="fused-shared")),
       ("shared int4", ExportOptions(precision="int4", graph="fused-shared")))
GGUF = ("f16", "q8_0", "q4_0")


def agent_module(name: str) -> Any:
    sys.path.insert(0, str(AGENT_DIR))
    return importlib.import_module(name)


def median_ms(sess: Any, seconds: float) -> float:
    for _ in range(3):
        sess.run_once()
    times, t_end = [], time.perf_counter() + seconds
    while time.perf_counter() < t_end or len(times) < 5:
        a = time.perf_counter()
        sess.run_once()
        times.append((time.perf_counter() - a) * 1000)
    return statistics.median(times)


def llama_bench_ms(bench: str, gguf: Path, phase: str, seq: int, past: int, threads: int, seconds: float) -> float:
    agent_llamacpp = agent_module("agent_llamacpp")
    _, first = agent_llamacpp.run_bench(agent_llamacpp.bench_command(bench, str(gguf), phase, seq, past, threads, 3), 600)
    reps = max(5, int(seconds / statistics.median(first)))
    _, samples = agent_llamacpp.run_bench(agent_llamacpp.bench_command(bench, str(gguf), phase, seq, past, threads,
                                                                       reps), 600)
    return statistics.median(samples) * 1000


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--samples", type=int, default=5, help="sampled sub-networks besides the full model")
    ap.add_argument("--quality-samples", type=int, default=5, help="of those, how many get perplexities")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=1.0, help="timed seconds per cell per round")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--quality-tokens", type=int, default=2048)
    ap.add_argument("--llama-cpp", type=Path, default=None, help="folder of llama-bench: add llama.cpp F16/Q8_0/Q4_0")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    ws = Workspace.open(args.model, eval_budget=args.quality_tokens)
    configs = [ws.space.full(), *ws.space.sample(args.samples, 3, granularity="tapered",
                                                 layer_ranking=ws.importance.layer_ranking())]
    root = Path(tempfile.mkdtemp())
    runtime = agent_module("agent_runtime")
    cells = [("prefill", 128, 0), ("decode", 1, 128), ("decode", 1, 512)]
    gguf = GGUF if args.llama_cpp else ()
    bench = str(args.llama_cpp / "llama-bench") if args.llama_cpp else ""
    names = [*(n for n, _ in ORT), *(f"llama.cpp {g}" for g in gguf)]
    print(f"{'sub-network':34s} {'cell':12s} " + " ".join(f"{p[-11:]:>11s}" for p in names) + "   (ms; ratios below)")
    ratios: dict[str, list[float]] = {p: [] for p in names}
    for c in configs:
        w = ws.weights(c)
        here = root / c.config_hash()  # deleted after the sub-network: 10 exports of SmolLM2 take ~4 GB
        sessions = {n: {ph: runtime.OrtSession(ort, str(export_subnet(w, here / n.replace(" ", "-"), o).path(ph)),
                                               threads=args.threads) for ph in ("prefill", "decode")} for n, o in ORT}
        files = {f"llama.cpp {g}": export_gguf(w, here / g, GgufOptions(g), tokenizer_dir=ws.base.path).folder
                 / "model.gguf" for g in gguf}
        for phase, seq, past in cells:
            for s in sessions.values():
                s[phase].prepare(s[phase].make_feeds(np, 1, seq, past, 1000))
            per: dict[str, list[float]] = {p: [] for p in names}
            for _ in range(args.rounds):
                for p in sessions:
                    per[p].append(median_ms(sessions[p][phase], args.seconds))
                for p, f in files.items():
                    per[p].append(llama_bench_ms(bench, f, phase, seq, past, args.threads, args.seconds))
            med = {p: statistics.median(v) for p, v in per.items()}
            for p in names:
                ratios[p].append(med[p] / med["fp32"])
            cell = f"{phase} S={seq}" if phase == "prefill" else f"decode P={past}"
            print(f"{c.summary()[:34]:34s} {cell:12s} " + " ".join(f"{med[p]:11.2f}" for p in names)
                  + "   " + " ".join(f"{med[p] / med['fp32']:.2f}" for p in names[1:]), flush=True)
        del sessions
        shutil.rmtree(here, ignore_errors=True)
    print("geometric mean latency ratio to fp32: " + ", ".join(
        f"{p} {float(np.exp(np.mean(np.log(v)))):.2f}" for p, v in ratios.items() if p != "fp32"))
    print("perplexity (held-out, torch on the graph's arithmetic):")
    quality = [*PRECISIONS, *gguf]
    for c in configs[:1 + args.quality_samples]:
        row = []
        for p in quality:
            model = emulate(build_model(dequantized(ws.weights(c), p)), p)
            row.append(perplexity(model, ws.eval_tokens()))
        print(f"  {c.summary()[:40]:40s} " + "  ".join(f"{p} {v:8.2f}" for p, v in zip(quality, row)), flush=True)


if __name__ == "__main__":
    main()
