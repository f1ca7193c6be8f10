"""``train-predictor`` (builds a ``PredictorRequest``), ``evaluate-predictor``, ``predict-latency``."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from rich.console import Console
from rich.table import Table

from edgenas.clikit import make_parser, request_from_args, run
from predictor.fitting import DEFAULT_DB, PhaseReport, PredictorRequest, train_predictors
from profiler.database import describe, exists, store_location

out_console = Console(width=None if sys.stdout.isatty() else 150)


def metrics_table(title: str, results: dict[str, dict[str, float]]) -> Table:
    t = Table(title=title)
    for c in ("model", "within ±5%", "within ±10%", "MAPE", "error sd", "RMSE ms", "Kendall τ", "bound coverage"):
        t.add_column(c, justify="left" if c == "model" else "right")
    for name, m in results.items():
        cov, sd = m.get("upper_coverage"), m.get("sd_log")
        t.add_row(name, f"{m['within_5pct']:.1%}", f"{m['within_10pct']:.1%}", f"{m['mape']:.2%}",
                  "-" if sd is None else f"{sd:.1%}", f"{m['rmse_ms']:.3f}", f"{m['kendall_tau']:.3f}",
                  "-" if cov is None else f"{cov:.1%}")
    return t


def _phases(text: str) -> list[str]:
    vals = [p.strip() for p in text.split(",") if p.strip()]
    if not vals or any(p not in ("prefill", "decode") for p in vals):
        raise argparse.ArgumentTypeError(f"{text!r}: use prefill, decode or prefill,decode")
    return vals


def render_training(reports: dict[str, PhaseReport], console: Console = out_console) -> None:
    """Each phase's held-out accuracy beside the baselines, and what was left out."""
    for r in reports.values():
        shapes = ", ".join(f"S={int(s)}" if r.phase == "prefill" else f"P={int(q)}" for s, q in r.shapes)
        console.print(metrics_table(
            f"{r.phase}: {r.n} measurements of {r.n_subnets} sub-networks on {r.device_name} "
            f"({r.threads} thread{'s' if r.threads > 1 else ''}, {r.backend}), {r.folds}-fold by sub-network, "
            f"shapes {shapes}{' (transfer from ' + str(r.prior) + ')' if r.prior else ''}", r.comparison))
        if r.form:
            console.print(f"predictor: {r.form}")
        excluded = r.excluded_unstable + r.excluded_throttled
        console.print(f"excluded: {r.excluded_unstable} unstable, {r.excluded_throttled} throttled measurement(s)"
                      if excluded else "excluded: none (no unstable or throttled measurements)")
        rep = r.repeatability
        if rep:
            sd = r.comparison["edgenas predictor"]["sd_log"]
            console.print(f"noise floor: {rep['n']} of these cells re-measured, spread {rep['sd_log_ratio']:.1%} "
                          f"({rep['within_5pct']:.0%} within ±5%); the predictor's error spread {sd:.1%} = "
                          f"{r.noise_ratio:.2f}x that (0.71: wrong by the measurement's own noise alone)")
        else:
            console.print("noise floor: no cell of these measured twice (profile-device --repeat-share)")
        if r.paired:
            console.print(f"{r.paired} of {r.n} latencies are paired: ratio to the interleaved companion x its "
                          "median (profile-device --paired)")
        if r.plot is not None:
            console.print(f"saved {r.folder} (plot: {r.plot})")


def add_train_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", required=True, help="device name (the --host it was profiled as) or fingerprint")
    p.add_argument("--db", type=store_location, default=DEFAULT_DB, help="measurement store: a file or a postgresql:// URL")
    p.add_argument("--phases", "--phase", dest="phase", type=_phases, default=["prefill", "decode"],
                   help="prefill, decode or prefill,decode (default both)")
    p.add_argument("--out", type=Path, default=None, help="output folder (default runs/predictors/DEVICE)")
    p.add_argument("--model", default="smollm2", help="the base model the sub-networks were cut from")
    p.add_argument("--folds", type=int, default=5)
    p.add_argument("--transfer-from", type=Path, default=None,
                   help="a predictor folder of another device or precision: adapt it with these (few, 3 or more) measurements")
    p.add_argument("--threads", type=int, default=None, help="use the measurements at this thread count (default: the most measured)")
    p.add_argument("--backend", default=None,
                   help="use the measurements of this back-end as stored, e.g. ort-cpu:opt-disabled (default: the most measured)")
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--include-unstable", action="store_true",
                   help="train on cells flagged unstable too (their intervals missed the target; their medians still "
                        "inform a transfer from few measurements)")


def handle_train(a: argparse.Namespace) -> int:
    render_training(train_predictors(request_from_args(PredictorRequest, a)))
    return 0


def train_main(argv: Sequence[str] | None = None) -> int:
    p = make_parser("train-predictor", "Train per-phase latency predictors for a device from the measurement store.")
    add_train_args(p)
    return run(p, argv, handle_train)


def add_evaluate_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--predictor", type=Path, required=True, help="a predictor folder (one phase)")
    p.add_argument("--db", type=store_location, required=True, help="measurement store: a file or a postgresql:// URL")
    p.add_argument("--device", default=None, help="device name in that store (default: the predictor's device name)")


def handle_evaluate(a: argparse.Namespace) -> int:
    from predictor.data import load_measurements
    from predictor.persist import load_predictor
    from profiler.errors import StoreError
    from profiler.store import Store

    pred, meta = load_predictor(a.predictor)
    if not exists(a.db):
        raise StoreError(f"measurement store {a.db} does not exist", "pass the --db of the sweep to check against")
    store = Store(a.db)
    try:
        rec = meta.get("metrics") or {}
        m = load_measurements(store, a.device or meta["device_name"], meta["phase"], pred.dims, meta["base_id"], minimum=1,
                              threads=rec.get("threads"), backend=rec.get("backend"), protocol=rec.get("protocol"))
    finally:
        store.close()
    res = pred.metrics(m.batch, m.seq_len, m.past_len, m.y_ms)
    out_console.print(metrics_table(f"{a.predictor} on {len(m)} {meta['phase']} measurements of {m.device_name} in {describe(a.db)}",
                                    {"saved predictor": res}))
    if m.fingerprint != meta["device_fingerprint"]:
        out_console.print(f"[yellow]note:[/] the device fingerprint changed ({meta['device_fingerprint']} -> {m.fingerprint}):"
                          " hardware or runtime differ from training")
    return 0


def evaluate_main(argv: Sequence[str] | None = None) -> int:
    p = make_parser("evaluate-predictor", "Score a saved predictor on another store's measurements.")
    add_evaluate_args(p)
    return run(p, argv, handle_evaluate)


def add_predict_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--predictor", type=Path, required=True)
    p.add_argument("--configs", type=Path, required=True, help="JSON-lines configs")
    p.add_argument("--seq-len", type=int, default=128, help="prefill length")
    p.add_argument("--past-len", type=int, default=128, help="decode past length")
    p.add_argument("--json", action="store_true", help="JSON lines output")
    p.add_argument("--override", action="store_true", help="use a predictor made for another base model")


def handle_predict(a: argparse.Namespace) -> int:
    from predictor.features import ConfigBatch
    from predictor.persist import load_predictor
    from subnets.configio import read_configs
    from subnets.errors import ConfigError
    from subnets.space import SearchSpace

    pred, meta = load_predictor(a.predictor)
    configs = read_configs(a.configs)
    space = SearchSpace(meta["base_id"], pred.dims, neuron_step=1)
    for i, c in enumerate(configs, 1):
        if c.base_id != meta["base_id"] and not a.override:
            raise ConfigError(f"{a.configs}, config {i} is for base model {c.base_id!r}; the predictor is for "
                              f"{meta['base_id']!r}", "use configs of that base model, or --override")
        try:
            space.validate(c if c.base_id == meta["base_id"] else type(c)(meta["base_id"], c.layers))
        except ConfigError as e:
            raise ConfigError(f"{a.configs}, config {i}: {e.problem}", e.fix) from None
    batch = ConfigBatch.from_configs(configs, pred.dims.num_layers)
    y = pred.predict(batch, a.seq_len, a.past_len)
    up = pred.predict_upper(batch, a.seq_len, a.past_len)
    if a.json:
        for c, v, u in zip(configs, y, up):
            print(json.dumps({"config_hash": c.config_hash(), "phase": meta["phase"], "latency_ms": float(v),
                              "upper_ms": float(u)}))
    else:
        t = Table(title=f"{meta['phase']} latency on {meta['device_name']} "
                        f"({'S=' + str(a.seq_len) if meta['phase'] == 'prefill' else 'P=' + str(a.past_len)})")
        for col in ("config", "hash", "predicted ms", f"upper ms ({1 - pred.alpha:.0%})"):
            t.add_column(col)
        for c, v, u in zip(configs, y, up):
            t.add_row(c.summary(), c.config_hash()[:10], f"{v:.2f}", f"{u:.2f}")
        out_console.print(t)
    return 0


def predict_main(argv: Sequence[str] | None = None) -> int:
    p = make_parser("predict-latency", "Predict latencies of sub-networks with a saved predictor.")
    add_predict_args(p)
    return run(p, argv, handle_predict)
