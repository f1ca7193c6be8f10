"""``edgenas profile`` (``profile-device``): the parser builds a ``SweepRequest``; the summary
tables are drawn from the ``FleetSummary`` that ``profiler.request.profile`` returns. Also
``edgenas measurements`` (list, CSV/Parquet, merge)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from edgenas.clikit import add_granularity, add_graph, make_parser, progress_bar, request_from_args, run
from profiler.database import Location, describe, exists, store_location
from profiler.errors import StoreError
from profiler.request import DEFAULT_DB, SweepRequest, profile

out_console = Console(width=None if sys.stdout.isatty() else 150)



def _ints(text: str) -> tuple[int, ...]:
    try:
        vals = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers") from None
    if not vals or any(v < 1 for v in vals):
        raise argparse.ArgumentTypeError(f"{text!r}: give positive integers, e.g. 64,128")
    return vals


def _phases(text: str) -> tuple[str, ...]:
    vals = tuple(x.strip() for x in text.split(",") if x.strip())
    bad = [v for v in vals if v not in ("prefill", "decode")]
    if bad or not vals:
        raise argparse.ArgumentTypeError(f"unknown phase(s) {bad or text!r}: use prefill, decode or prefill,decode")
    return vals


def _add_what_args(p: argparse.ArgumentParser) -> None:
    """The board, the model and which sub-networks."""
    p.add_argument("--host", required=True,
                   help="~/.ssh/config alias, inventory entry, or 'local'; several boards as a comma-separated list or "
                        "an inventory [groups] name: boards of one fingerprint share the jobs")
    p.add_argument("--model", default="smollm2", help="base model: 'smollm2', a local HF folder, or a .gguf file")
    p.add_argument("--neuron-step", type=int, default=64)
    src = p.add_mutually_exclusive_group()
    src.add_argument("--samples", type=int, default=None, help="sample N sub-networks (stratified by size)")
    src.add_argument("--configs", type=Path, default=None, help="JSON-lines file of sub-network configs")
    p.add_argument("--seed", type=int, default=0)
    add_granularity(p, "what varies between the sampled sub-networks' layers")


def _add_shape_args(p: argparse.ArgumentParser) -> None:
    """The shapes, threads and store."""
    p.add_argument("--phases", type=_phases, default=("prefill", "decode"))
    p.add_argument("--seq-len", type=_ints, default=(128,), help="prefill lengths, e.g. 64,128")
    p.add_argument("--past-len", type=_ints, default=(128,), help="decode past lengths, e.g. 128,512")
    p.add_argument("--threads", type=int, default=None, help="runtime threads (default: inventory, else 1)")


def _add_runtime_args(p: argparse.ArgumentParser) -> None:
    """The runtime and weights measured, and where the measurements go."""
    p.add_argument("--backend", default=None,
                   help="ort-cpu (default), ort-cuda, ort-trt, trt (TensorRT Python API), trtexec, llama.cpp (GGUF "
                        "files timed by the board's llama-bench), llama.cpp-py (the same files through the board's "
                        "llama-cpp-python, timed by the agent), or auto (best onnxruntime back-end the board offers)")
    p.add_argument("--db", type=store_location, default=DEFAULT_DB,
                   help=f"measurement store: a file (default {DEFAULT_DB}) or a postgresql://user@host/database URL that "
                        "sweeps on several hosts share")
    p.add_argument("--inventory", type=Path, default=None, help="inventory TOML (default ~/.config/edgenas/inventory.toml)")
    p.add_argument("--ssh-config", type=Path, default=None, help="ssh config (default ~/.ssh/config)")
    p.add_argument("--accept-new-host-key", action="store_true",
                   help="trust and record a host key seen for the first time (changed keys are always refused)")
    p.add_argument("--weights", choices=["none", "real"], default="none",
                   help="none: ship graphs only, the board fills random weights (default); real: ship the weights")
    p.add_argument("--precision", choices=["fp16", "fp32", "int8", "int4", "f32", "f16", "q8_0", "q4_0", "q6_k", "q5_k_m",
                                           "q4_k_m", "q3_k_m"], default=None,
                   help="trt/trtexec: engine precision fp16 (default) or fp32; onnxruntime back-ends: the linear layers' "
                        "weights fp32 (default), int8 (MatMulInteger, dynamically quantized activations) or int4 "
                        "(MatMulNBits), or fp16 (the whole graph in half precision); llama.cpp: the GGUF weight type f16 (default), f32, q8_0 or q4_0, or a "
                        "K-quant preset written by llama-quantize (with --weights real)")
    add_graph(p, "onnxruntime back-ends")
    p.add_argument("--gpu-layers", type=int, default=0,
                   help="llama.cpp: layers offloaded to the board's GPU (llama-bench -ngl; default 0, CPU only)")
    p.add_argument("--block-size", type=int, default=32, choices=[16, 32, 64, 128],
                   help="int4 weights: inputs per scale (default 32)")
    p.add_argument("--graph-opt", choices=["all", "extended", "basic", "disabled"], default="all",
                   help="onnxruntime graph optimization level (default all; stored as part of the back-end)")


def _add_protocol_args(p: argparse.ArgumentParser) -> None:
    """The timing protocol, leases and retries."""
    p.add_argument("--min-time", type=float, default=1.0, help="timed seconds per cell at least")
    p.add_argument("--decode-min-time", type=float, default=None,
                   help="timed seconds per decode cell at least (default 3 x --min-time: decode steps are short and drift)")
    p.add_argument("--max-time", type=float, default=20.0, help="timed seconds per cell at most")
    p.add_argument("--sessions", type=int, default=1,
                   help="split each cell's time over N fresh sessions of the model (default 1)")
    p.add_argument("--decode-sessions", type=int, default=3,
                   help="the same for decode cells (default 3: a decode step's level moves with each session's memory "
                        "placement)")
    p.add_argument("--target-ci", type=float, default=0.02, help="stop when the median's 95%% CI half-width is within this fraction")
    p.add_argument("--max-attempts", type=int, default=3)
    p.add_argument("--lease", type=float, default=30.0, metavar="S",
                   help="seconds a claimed job stays this sweep's without a heartbeat (renewed every S/3): another "
                        "sweep of the store takes over a dead one's jobs within S (default 30)")
    p.add_argument("--reference-every", type=int, default=20, help="re-measure the reference every N jobs (0: never)")
    p.add_argument("--drift-threshold", type=float, default=0.03)
    p.add_argument("--repeat-share", type=float, default=0.1,
                   help="after the sweep, measure this share of its cells again: the board's repeatability (default 0.1)")
    p.add_argument("--repeat-min", type=int, default=3, help="at least this many cells per phase again (default 3)")
    p.add_argument("--retry-failed", action="store_true", help="retry jobs that failed in earlier sweeps")
    p.add_argument("--paired", action="store_true",
                   help="time every cell alternately with the reference sub-network and store the ratio (cancels a "
                        "shared or drifting board's common slow-downs; cells take twice as long)")
    p.add_argument("--rounds", type=int, default=0, metavar="N",
                   help="interleave cells in rounds: a short burst per cell, cells shuffled each round, the reference in "
                        "every round, each cell's rounds pooled until --target-ci (at least N rounds; default 0: each "
                        "cell timed to completion before the next)")
    p.add_argument("--max-rounds", type=int, default=8, help="with --rounds: a cell's rounds at most (default 8)")
    p.add_argument("--round-cells", type=int, default=12,
                   help="with --rounds: cells claimed and interleaved together (default 12)")
    p.add_argument("--round-quantile", type=float, default=0.5,
                   help="with --rounds: the quantile of a cell's round medians that is its level (default 0.5, the "
                        "median; 0.25 where other work on the board only ever adds time)")
    p.add_argument("--normalize-drift", action="store_true",
                   help="with --rounds: a cell's number divides out each round's reference drift (both are stored)")
    p.add_argument("--keep-models", action="store_true",
                   help="leave measured models on the board (default: delete each once its cells are measured)")


def _add_connection_args(p: argparse.ArgumentParser) -> None:
    """Connection timeouts and limits."""
    p.add_argument("--connect-timeout", type=float, default=None)
    p.add_argument("--handshake-timeout", type=float, default=120.0)
    p.add_argument("--measure-timeout", type=float, default=None, help="seconds for one measurement (default 3 x max-time + 120)")
    p.add_argument("--upload-timeout", type=float, default=60.0, help="seconds an upload may stall")
    p.add_argument("--agent-memory-mb", type=int, default=None, help="limit the agent's address space (ulimit -v)")


def add_profile_args(p: argparse.ArgumentParser) -> None:
    for add in (_add_what_args, _add_shape_args, _add_runtime_args, _add_protocol_args, _add_connection_args):
        add(p)


def sweep(request: SweepRequest, ws: Any = None, configs: list[Any] | None = None) -> Any:
    """``profile(request)`` under a progress bar per board; returns the ``FleetSummary``."""
    with progress_bar() as prog:
        def progress(board: str) -> Any:
            task = prog.add_task(f"profiling on {board}", total=None)

            def update(done: int, total: int, text: str) -> None:
                prog.update(task, completed=done, total=total, description=f"{board}: {text[:60]}")

            return update

        return profile(request, ws, configs, progress)


def print_summary(fleet: Any, db: Location) -> int:
    """The sweep's measurements and costs; with several boards, a line per board. Returns
    the exit status: 2 when a device's boards all stopped before its jobs were done."""
    from profiler.store import Store

    boards = [s for s in fleet.boards if s.fingerprint]
    store = Store(db)
    try:
        rows = [r for fp in dict.fromkeys(s.fingerprint for s in boards) for r in store.measurement_rows(device=fp)]
    finally:
        store.close()
    for s in boards:
        _print_board(s, rows if len(fleet.boards) == 1 else [], db)
    if len(fleet.boards) > 1:
        _print_fleet(fleet, rows)
    stopped = [s for s in fleet.boards if s.stopped]
    finished = {s.fingerprint for s in fleet.boards if not s.stopped}
    for s in stopped:
        out_console.print(f"[yellow]board {s.board} stopped:[/] {s.stopped}")
    lost = [s for s in stopped if s.fingerprint not in finished]
    if lost and len(fleet.boards) > 1:
        out_console.print(f"[red]error:[/] no board of {', '.join(sorted({s.device for s in lost}))} finished; "
                          "its remaining jobs are pending in the store (rerun to resume)")
        return 2
    return 0


def _print_fleet(fleet: Any, rows: list[Any]) -> None:
    t = Table(title=f"{len(fleet.boards)} boards, {len(fleet.devices)} device(s), {fleet.seconds:.0f} s: "
                    f"{fleet.subnets_per_hour:.0f} sub-networks/hour")
    for c in ("board", "device", "fingerprint", "measured", "jobs/hour", "taken by others", "faults", "stopped"):
        t.add_column(c, justify="right" if c in ("measured", "jobs/hour", "taken by others", "faults") else "left")
    for s in fleet.boards:
        t.add_row(s.board, s.device, s.fingerprint or "-", str(s.measured), f"{s.jobs_per_hour:.0f}",
                  str(s.held_elsewhere), str(len(s.faults)), (s.stopped or "")[:60])
    out_console.print(t)
    out_console.print(f"{len(rows)} measurements of these devices in the store")


def _print_board(s: Any, rows: list[Any], db: Location) -> None:
    import json

    from subnets.config import SubnetConfig

    if rows:
        t = Table(title=f"latency on {s.device} (device {s.fingerprint}), median ms")
        for c in ("sub-network", "hash", "params (M)", "phase", "S", "P", "median", "p90", "CoV", "n", "flags"):
            t.add_column(c, justify="left" if c in ("sub-network", "hash", "phase", "flags") else "right")
        for r in rows[-40:]:
            flags = ",".join(f for f, on in (("unstable", r["unstable"]), ("throttled", r["throttled"])) if on)
            summ = SubnetConfig.from_json(r["config"]).summary()
            t.add_row(summ, r["subnet_hash"][:10], f"{r['params'] / 1e6:.1f}", r["phase"], str(r["seq_len"]),
                      str(r["past_len"]), f"{r['median_ms']:.2f}", f"{r['p90_ms']:.2f}", f"{r['cov']:.2%}", str(r["n"]),
                      flags)
        out_console.print(t)
    sec = s.seconds
    out_console.print(
        f"{s.board}: jobs {s.jobs}: {s.measured} measured now, {s.already_done} already in the store, {len(s.failed)} "
        f"failed | retries {s.retries}, reconnects {s.reconnects} | {s.unstable} unstable, {s.throttled} throttled")
    for w in s.warnings:
        out_console.print(f"[yellow]warning:[/] {w}")
    if s.faults:
        out_console.print(f"faults met (each retried within --max-attempts): {json.dumps(s.fault_counts())}")
    tot = sec["total"] or 1.0
    out_console.print(
        f"time {sec['total']:.1f} s: export {sec['export']:.1f} s ({sec['export'] / tot:.0%}), upload {sec['upload']:.1f} s "
        f"({sec['upload'] / tot:.0%}, {s.bytes_uploaded / 1e6:.1f} MB), session load {sec['session_load']:.1f} s "
        f"({sec['session_load'] / tot:.0%}), timing {sec['timing']:.1f} s ({sec['timing'] / tot:.0%})"
        f" | {s.subnets_per_hour:.0f} sub-networks/hour" + (f" | {s.rounds} bursts in interleaved rounds" if s.rounds else ""))
    for phase, r in s.repeatability.items():
        out_console.print(f"repeatability, {phase}: {r['n']} cells re-measured, spread {r['sd_log_ratio']:.1%} "
                          f"(sd of the log ratio), {r['within_5pct']:.0%} within ±5%")
    for phase, medians in s.references.items():
        out_console.print(f"reference medians, {phase} (ms): {', '.join(f'{x:.2f}' for x in medians)}")
    for d in s.drift:
        out_console.print(f"[yellow]drift:[/] {d}")
    if s.failed:
        ft = Table(title="failed jobs")
        for c in ("sub-network", "phase", "S", "P", "error class", "attempts", "message"):
            ft.add_column(c)
        for f in s.failed:
            ft.add_row(f["subnet"][:10], f["phase"], str(f["seq_len"]), str(f["past_len"]), str(f["error_class"]),
                       str(f["attempts"]), str(f["message"])[:80])
        out_console.print(ft)
    out_console.print(f"store: {describe(db)} ({json.dumps(s.failure_counts()) if s.failed else 'no failures'})")


def main(argv: Sequence[str] | None = None) -> int:
    p = make_parser("profile-device", "Measure sub-networks' latency on a device into the measurement store.")
    add_profile_args(p)

    def handle(args: argparse.Namespace) -> int:
        request = request_from_args(SweepRequest, args)
        return print_summary(sweep(request), request.db)

    return run(p, argv, handle)


def merge_main(args: argparse.Namespace) -> int:
    from profiler.merge import merge_stores

    if args.into is None:
        raise StoreError("--merge needs --into, the store to write", "add --into merged.db")
    r = merge_stores(list(args.merge), args.into)
    out_console.print(f"merged {len(r.sources)} store(s) into {r.into}: {r.cells_added} cells added, "
                      f"{r.cells_duplicate} already there (kept once), {r.references_added} reference runs; devices "
                      f"{r.devices_added} added, {r.devices_matched} matched by fingerprint; {r.subnets_added} "
                      f"sub-networks added; {r.jobs_pending_added} unmeasured jobs carried over")
    if r.conflicts:
        t = Table(title=f"{len(r.conflicts)} cell(s) measured in two stores with medians more than 5% apart (first kept)")
        for c in ("sub-network", "phase", "S", "P", "back-end", "kept ms", "other ms", "diff"):
            t.add_column(c)
        for c in r.conflicts[:40]:
            t.add_row(c["subnet"][:10], c["phase"], str(c["seq_len"]), str(c["past_len"]), c["backend"],
                      f"{c['kept_ms']:.2f}", f"{c['other_ms']:.2f}", f"{c['rel_diff']:.1%}")
        out_console.print(t)
    return 0


def repeatability_by_device(store: Any) -> dict[tuple[str, str], Any]:
    """(device, phase) -> ``Repeatability`` of every cell measured twice in the store."""
    from profiler.repeatability import by_phase

    rows: dict[str, list[dict[str, Any]]] = {}
    for r in store.repeat_pairs():
        rows.setdefault(r["device"], []).append(r)
    return {(dev, ph): rep for dev, rs in rows.items() for ph, rep in by_phase(rs).items()}


def measurements_main(args: argparse.Namespace) -> int:
    from profiler.store import Store

    if getattr(args, "merge", None):
        return merge_main(args)
    if not exists(args.db):
        raise StoreError(f"measurement store {args.db} does not exist", "run profile-device first, or pass --db PATH")
    store = Store(args.db)
    try:
        if args.csv:
            n = store.export_csv(args.csv)
            out_console.print(f"wrote {n} measurements to {args.csv}")
        if args.parquet:
            n = store.export_parquet(args.parquet)
            out_console.print(f"wrote {n} measurements to {args.parquet}")
        if not args.csv and not args.parquet:
            t = Table(title=describe(args.db))
            for c in ("device", "fingerprint", "phase", "measurements", "median ms (min..max)", "re-measured",
                      "spread", "within ±5%"):
                t.add_column(c)
            again = repeatability_by_device(store)
            for name, fp, phase, n, lo, hi in store.phase_counts():
                r = again.get((name, phase))
                t.add_row(name, fp, phase, str(n), f"{lo:.2f}..{hi:.2f}", *(
                    ("0", "-", "-") if r is None else (str(r.n), f"{r.sd_log_ratio:.1%}", f"{r.within_5pct:.0%}")))
            out_console.print(t)
            out_console.print("spread: sd of log(second / first) over the cells a sweep measured twice")
    finally:
        store.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
