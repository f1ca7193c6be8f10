"""Per-layer precision mixes against uniform weight types on llama.cpp, training-free.

    python benchmarks/precision_mix.py                  # SmolLM2, llama.cpp tools from the build cache
    python benchmarks/precision_mix.py --lows q4_0 --rounds 3

For the full model: per-group sensitivity (each tensor group alone at each lower type, the
rest at Q8_0; measured once and cached), then deployments: the uniform types a llama.cpp user
picks without the suite, the hand rule of a probe (head at Q8_0, the k most sensitive groups
at Q8_0, the rest at Q4_0), and the mixed-integer allocation (search/mix_allocation.py) at a
range of byte budgets and of decode-time budgets (each type's cost per weight fitted to a first
timing session of the hand-made deployments: on this CPU a Q5_0 weight costs more than a
Q8_0 one, so bytes alone mislead). Each is judged as llama.cpp computes it (torch emulation, which
llama-perplexity matches; tests/test_llamacpp.py) on the held-out docstrings and on a
second domain (GPL-3 text), exported as a GGUF with its per-tensor types, and timed by
llama-bench (decode of 16 tokens at depth 128, 1 thread) in interleaved rounds: every
deployment once per round, in a shuffled order, so a load spike spreads over all of them.
Gains are against the uniform types' front interpolated (piecewise linear) at equal bytes
and at equal measured latency."""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "device_agents"))

import agent_llamacpp  # noqa: E402

from export.gguf_file import GGUF_FILE, GgufOptions, export_gguf  # noqa: E402
from export.mix import PrecisionMix  # noqa: E402
from export.quantize import MixArithmetic  # noqa: E402
from search.mix_allocation import allocate, fit_type_costs, greedy, group_params, mix_bytes  # noqa: E402
from search.sensitivity import measure_sensitivity  # noqa: E402
from subnets.paths import cache_dir  # noqa: E402
from subnets.workspace import Workspace  # noqa: E402


def hand_made(sens: Any, L: int) -> dict[str, PrecisionMix]:
    """What a llama.cpp user picks without the suite, and the probe's hand rule."""
    out = {f"uniform {k}": PrecisionMix.uniform("llama.cpp", k, L) for k in ("f16", "q8_0", "q5_0", "q4_0")}
    out["q4_0, head q8_0"] = PrecisionMix("llama.cpp", "q8_0", ("q4_0",) * L, ("q4_0",) * L)
    for k in (2, 6, 10):
        out[f"hand rule k={k}"] = greedy(sens, "q4_0", keep=k)
    return out


def allocated(sens: Any, params: dict[str, int], byte_budgets: list[float], costs: Any, q4_ms: float,
              time_budgets: list[float]) -> dict[str, PrecisionMix]:
    """MILP mixes within byte budgets (x uniform Q4_0's bytes) and within time budgets (x
    uniform Q4_0's measured decode time, by the per-type costs fitted on the board)."""
    lo = mix_bytes(PrecisionMix.uniform("llama.cpp", "q4_0", sens.num_layers), params)
    out = {f"MILP {share:.2f}x q4_0 bytes": allocate(sens, params, share * lo) for share in byte_budgets}
    for share in time_budgets:
        out[f"MILP {share:.2f}x q4_0 time"] = allocate(sens, params, share * q4_ms, costs=costs)
    return out


def interpolate(x: float, points: list[tuple[float, float]]) -> float | None:
    """Piecewise-linear y at x over the (x, y) points sorted by x; None outside their range."""
    pts = sorted(points)
    for (x0, y0), (x1, y1) in itertools.pairwise(pts):
        if x0 <= x <= x1:
            return y0 + (y1 - y0) * (x - x0) / (x1 - x0) if x1 > x0 else min(y0, y1)
    return None


def time_decode(bench: str, files: dict[str, Path], rounds: int, reps: int, depth: int, seed: int) -> dict[str, float]:
    """Median ms per generated token of each file, measured in interleaved, shuffled rounds."""
    samples: dict[str, list[float]] = {k: [] for k in files}
    rng = random.Random(seed)
    for r in range(rounds):
        order = list(files)
        rng.shuffle(order)
        for name in order:
            cmd = agent_llamacpp.bench_command(bench, str(files[name]), "decode", 16, depth, 1, reps)
            res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
            if res.returncode != 0:
                raise RuntimeError(f"llama-bench failed on {name}: {res.stderr[-1000:]}")
            _, per_token = agent_llamacpp.parse_bench_json(res.stdout)
            samples[name] += [1000 * s for s in per_token]
        logging.info("round %d/%d timed", r + 1, rounds)
    return {k: statistics.median(v) for k, v in samples.items()}


def evaluate(ws: Any, second: Any, cfg: Any, mixes: dict[str, PrecisionMix], params: dict[str, int],
             root: Path) -> dict[str, dict[str, Any]]:
    rows = {}
    for name, mix in mixes.items():
        t0 = time.perf_counter()
        judged, judged2 = ws.at_precision(MixArithmetic(mix)), second.at_precision(MixArithmetic(mix))
        e = export_gguf(ws.weights(cfg), root / "gguf", GgufOptions("f16", mix=mix), tokenizer_dir=ws.base.path)
        rows[name] = {"mix": mix.to_dict(), "summary": mix.summary(), "mb": mix_bytes(mix, params) / 1e6,
                      "file_mb": (e.folder / GGUF_FILE).stat().st_size / 1e6, "gguf": str(e.folder / GGUF_FILE),
                      "ppl": judged.perplexity(cfg), "ppl_second": judged2.perplexity(cfg)}
        logging.info("%-26s %6.1f MB  ppl %.2f / %.2f  (%.0f s)", name, rows[name]["mb"], rows[name]["ppl"],
                     rows[name]["ppl_second"], time.perf_counter() - t0)
    return rows


def gains(rows: dict[str, dict[str, Any]]) -> None:
    """Each deployment against the uniform types' front at equal bytes and equal latency."""
    uniform = [r for n, r in rows.items() if n.startswith("uniform")]
    for r in rows.values():
        for key, x in (("at_bytes", "mb"), ("at_ms", "ms_per_token")):
            if x not in r:
                continue
            ref = interpolate(r[x], [(u[x], u["ppl"]) for u in uniform])
            r[f"uniform_ppl_{key}"] = ref
            r[f"gain_{key}"] = None if ref is None else 1 - r["ppl"] / ref


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--lows", default="q4_0", help="lower types the sensitivity measures (comma-separated)")
    ap.add_argument("--sensitivity-tokens", type=int, default=2048)
    ap.add_argument("--quality-tokens", type=int, default=4096)
    ap.add_argument("--second-text", default="/usr/share/common-licenses/GPL-3")
    ap.add_argument("--budgets", default="1.10,1.30,1.60", help="MILP byte budgets, x uniform Q4_0's bytes")
    ap.add_argument("--time-budgets", default="1.05,1.10,1.20,1.30,1.45,1.60",
                    help="MILP time budgets, x uniform Q4_0's measured decode time")
    ap.add_argument("--llama-cpp", type=Path, default=cache_dir() / "llama.cpp" / "0.3.36" / "bin")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--depth", type=int, default=128)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=Path("runs/precision-mix"))
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    args.out.mkdir(parents=True, exist_ok=True)
    base = Workspace.open(args.model, eval_budget=args.sensitivity_tokens)
    cfg = base.space.full()
    t0 = time.perf_counter()
    sens = measure_sensitivity(base, cfg, "llama.cpp", "q8_0", tuple(args.lows.split(",")),
                               progress=lambda n, t: logging.info("sensitivity %d/%d", n, t))
    t_sens = time.perf_counter() - t0
    params = group_params(base.weights(cfg))
    ws = base.evaluated_on(None, args.quality_tokens)
    second = base.evaluated_on(args.second_text, args.quality_tokens)
    bench = str(args.llama_cpp / "llama-bench")
    rows = evaluate(ws, second, cfg, hand_made(sens, len(cfg.layers)), params, args.out)
    # a first timing session of the hand-made deployments gives each type's cost per weight
    first = time_decode(bench, {n: Path(r["gguf"]) for n, r in rows.items()}, 3, args.reps, args.depth, args.seed + 1)
    costs = fit_type_costs([(PrecisionMix.from_dict(r["mix"]), params, first[n]) for n, r in rows.items()])
    logging.info("type costs (ms per million weights): %s",
                 {k: round(1e6 * v, 4) for k, v in costs.per_weight.items()})
    mixes = allocated(sens, params, [float(b) for b in args.budgets.split(",")], costs, first["uniform q4_0"],
                      [float(b) for b in args.time_budgets.split(",")])
    rows |= evaluate(ws, second, cfg, mixes, params, args.out)
    # the final table: every deployment timed side by side in one interleaved session
    ms = time_decode(bench, {n: Path(r["gguf"]) for n, r in rows.items()}, args.rounds, args.reps, args.depth,
                     args.seed)
    for r in rows.values():
        r["fitted_ms_per_token"] = costs.of(PrecisionMix.from_dict(r["mix"]), params)
    for n, r in rows.items():
        r["ms_per_token"] = ms[n]
    gains(rows)
    result = {"model": base.base.base_id, "sensitivity_s": t_sens, "sensitivity_tokens": args.sensitivity_tokens,
              "type_costs_ms_per_million": {k: 1e6 * v for k, v in costs.per_weight.items()},
              "quality_tokens": args.quality_tokens, "base_ppl_q8_0": sens.base_perplexity,
              "most_sensitive": sens.ranked("q4_0")[:10], "rows": rows}
    (args.out / "results.json").write_text(json.dumps(result, indent=1, default=str))
    print(f"{'deployment':28} {'MB':>6} {'ppl':>7} {'GPL-3':>7} {'ms/tok':>7} {'fitted':>7} "
          f"{'vs uniform @bytes':>18} {'@latency':>9}")
    for n, r in sorted(rows.items(), key=lambda kv: kv[1]["ms_per_token"]):
        gb, gm = r.get("gain_at_bytes"), r.get("gain_at_ms")
        print(f"{n:28} {r['mb']:6.1f} {r['ppl']:7.2f} {r['ppl_second']:7.2f} {r['ms_per_token']:7.2f} "
              f"{r['fitted_ms_per_token']:7.2f} {'-' if gb is None else f'{gb:+.1%}':>18} "
              f"{'-' if gm is None else f'{gm:+.1%}':>9}")
    print(f"results: {args.out / 'results.json'}; sensitivity measured in {t_sens:.0f} s")


if __name__ == "__main__":
    main()
