"""``edgenas``: the command line of the shared core and the end-to-end pipeline."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from edgenas.clikit import (
    add_granularity,
    add_graph,
    add_reconstruct,
    add_run_config,
    make_parser,
    request_from_args,
    run,
    subparsers,
)
from profiler.database import exists, store_location
from subnets.configio import read_config
from subnets.errors import ConfigError

# Wide enough for the tables when output goes to a file or CI log (rich assumes 80 columns).
out_console = Console(width=None if sys.stdout.isatty() else 150)


def _add_model(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="smollm2",
                   help="base model: 'smollm2' (embedded SmolLM2-135M-Instruct), a local HF Llama-family folder, or a .gguf file")
    p.add_argument("--neuron-step", type=int, default=64, help="MLP neurons move in multiples of this (default 64)")


def _add_export(p: argparse.ArgumentParser) -> None:
    p.add_argument("--opset", type=int, default=17, help="ONNX opset (default 17)")
    p.add_argument("--ir-version", type=int, default=None, help="ONNX IR version (default: oldest that carries the opset)")


def _space_args(s: argparse.ArgumentParser) -> None:
    _add_model(s)
    s.add_argument("--json", action="store_true", help="print JSON")


def _sample_args(s: argparse.ArgumentParser) -> None:
    _add_model(s)
    s.add_argument("--samples", "--n", dest="n", type=int, required=True, help="how many configs")
    s.add_argument("--seed", type=int, default=0)
    add_granularity(s, "what varies between layers")
    s.add_argument("--strategy", choices=["uniform", "stratified"], default="stratified",
                   help="stratified: equal share per parameter-count bin (default)")
    s.add_argument("--random-layers", action="store_true",
                   help="keep a random subset of layers instead of the top-k by block influence")


def _configs_arg(s: argparse.ArgumentParser, required: bool, help: str) -> None:
    s.add_argument("--configs", dest="config", required=required, default=None, help=help)
    s.add_argument("--index", type=int, default=0, help="which config of the file (0-based)")


def _export_args(s: argparse.ArgumentParser) -> None:
    add_reconstruct(s)
    _add_model(s)
    _add_export(s)
    _configs_arg(s, True, "configs file (JSON or JSON lines; the first config is used unless --index)")
    s.add_argument("--out", required=True, type=Path, help="output folder")
    s.add_argument("--no-perplexity", action="store_true", help="skip the perplexity evaluation")
    s.add_argument("--text", default=None, help="held-out text file for perplexity (default: stdlib docstrings)")
    s.add_argument("--supernet", type=Path, default=None,
                   help="take the weights from a trained super-network (`edgenas train-supernet --out`)")
    add_graph(s, "the ONNX graphs")
    s.add_argument("--gguf", choices=["f32", "f16", "q8_0", "q4_0", "q6_k", "q5_k_m", "q4_k_m", "q3_k_m"], default=None,
                   help="also write OUT/model.TYPE.gguf for llama.cpp (per-layer 'deci' architecture) with weights of TYPE "
                        "(the K-quant presets by llama.cpp's llama-quantize)")
    s.add_argument("--mix", type=Path, default=None, metavar="MIX.json",
                   help="a precision mix (JSON: runtime, head, attention and mlp types per kept layer): the deployment's "
                        "file as its runtime loads it, OUT/model.mix.gguf with per-tensor types (llama.cpp) or the ONNX "
                        "graphs with each layer's MatMuls at its type (onnxruntime); perplexity as that mix computes")


def _train_supernet_args(s: argparse.ArgumentParser) -> None:
    from edgenas.commands.training import add_supernet_args

    _add_model(s)
    add_supernet_args(s)


def _finetune_args(s: argparse.ArgumentParser) -> None:
    from edgenas.commands.training import add_finetune_args

    _add_model(s)
    add_finetune_args(s)


def _evaluate_args(s: argparse.ArgumentParser) -> None:
    add_reconstruct(s)
    _add_model(s)
    s.add_argument("--model-dir", type=Path, default=None,
                   help="a saved model folder (`edgenas finetune --out`, its hf/ folder, or `edgenas export`'s hf/); "
                        "default: --model itself, or --configs' sub-network of it")
    _configs_arg(s, False, "evaluate this sub-network of --model (or of --supernet)")
    s.add_argument("--supernet", type=Path, default=None, help="take --configs' weights from a trained super-network")
    s.add_argument("--tasks", nargs="+", required=True,
                   help="lm-eval task names whose data you have locally, or .jsonl files of multiple-choice items "
                        '({"question", "choices", "answer"})')
    s.add_argument("--include-path", default=None, help="a folder of your own lm-eval task YAML files")
    s.add_argument("--limit", type=int, default=None, help="items per task at most")
    s.add_argument("--batch-size", type=int, default=4)
    s.add_argument("--json", action="store_true", help="print JSON")


def _pipeline_args(s: argparse.ArgumentParser) -> None:
    _add_model(s)
    add_reconstruct(s, default=True)
    s.add_argument("--samples", "--n", dest="n", type=int, default=12,
                   help="sampled sub-networks to profile at fp32 besides the full model (default 12)")
    s.add_argument("--transfer-samples", type=int, default=5,
                   help="sub-networks profiled at each other precision, the full model among them: that precision's "
                        "predictors are the fp32 ones rescaled to them (default 5)")
    s.add_argument("--seed", type=int, default=0)
    add_granularity(s, "the sampled and searched sub-networks")
    s.add_argument("--out", type=Path, default=Path("runs/pipeline"))
    s.add_argument("--host", default="local", help="device to profile on (default: this machine's CPU)")
    s.add_argument("--threads", type=int, default=1, help="runtime threads (default 1)")
    s.add_argument("--workload", default="128,64", help="S,N for the search: a prompt of S tokens, N generated")
    s.add_argument("--budget-share", type=float, default=None,
                   help="latency budget as a share of the full fp32 model's predicted latency (default: 85%% of the "
                        "fastest full-model deployment's, so that neither a precision nor a cut alone is the answer)")
    s.add_argument("--evals", type=int, default=40, help="perplexity evaluations the search may spend")
    s.add_argument("--verify", type=int, default=3,
                   help="deployments measured on the device: up to K tries for the recommendation, and the best "
                        "obvious alternatives (0: by prediction alone)")
    s.add_argument("--precision", default="auto",
                   help="deployment precisions searched, comma-separated: onnxruntime fp32, fp16, int8, int4; llama.cpp "
                        "f32, f16, q8_0, q4_0 (default auto: fp32,int8,int4, plus q8_0,q4_0 where llama.cpp's tools "
                        "are on this machine)")
    s.add_argument("--max-perplexity", default="3x", metavar="PPL|Rx",
                   help="quality ceiling for the search, a perplexity or a multiple of the full model's (default 3x)")
    s.add_argument("--quality-tokens", type=int, default=1024, help="held-out tokens per perplexity")
    s.add_argument("--min-time", type=float, default=1.0, help="timed seconds per profiling cell at least")
    s.add_argument("--rounds", type=int, default=6, metavar="N",
                   help="profile cells interleaved in N to 8 rounds, each cell's level the lower quartile of its round "
                        "medians (default 6; 0: each cell timed to completion before the next)")
    s.add_argument("--text", default=None, help="held-out text file for perplexity")
    s.add_argument("--train-steps", type=int, default=0,
                   help="recovery training: train the model as a super-network for N sandwich steps (sampling by the "
                        "device's predicted latency) before the search, which then runs on the trained weights")


def _report_args(s: argparse.ArgumentParser) -> None:
    s.add_argument("run", type=Path, nargs="?", default=Path("runs/pipeline"),
                   help="a run folder (the main job's --out; default runs/pipeline)")
    s.add_argument("--out", type=Path, default=None, help="where to write the page (default RUN/report.html)")


def cmd_report(args: argparse.Namespace) -> int:
    from edgenas.report import write_report

    if not args.run.is_dir():
        raise ConfigError(f"run folder {args.run} does not exist", "pass the --out folder of `edgenas pipeline`")
    out_console.print(f"wrote {write_report(args.run, args.out)}")
    return 0


def _measurements_args(s: argparse.ArgumentParser) -> None:
    s.add_argument("--db", type=store_location, default=Path("runs/measurements.db"),
                   help="measurement store: a file or a postgresql:// URL")
    s.add_argument("--csv", type=Path, default=None, help="write every measurement to this CSV file")
    s.add_argument("--parquet", type=Path, default=None, help="write every measurement to this Parquet file (needs pyarrow)")
    s.add_argument("--merge", type=store_location, nargs="+", default=None, metavar="STORE",
                   help="merge these stores (made on other hosts) into --into: devices by fingerprint, sub-networks by "
                        "hash, each measured cell once; cells whose medians disagree are reported")
    s.add_argument("--into", type=store_location, default=None,
                   help="the store --merge writes (created if absent): a file or a postgresql:// URL")


def build_parser() -> argparse.ArgumentParser:
    p = make_parser("edgenas", "Hardware-aware sub-network search for Llama-family LLMs.", run_config=False)
    sub = subparsers(p)
    for verb in VERBS:
        s = sub.add_parser(verb.name, help=verb.help, description=verb.help + (
            f" (also the console script `{verb.alias}`)" if verb.alias else ""))
        s.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help="log debug messages")
        add_run_config(s)
        verb.add_args(s)
    return p


def _workspace(args: argparse.Namespace):
    """``evaluate``'s workspace: the base model's, or a super-network's."""
    from training.recovery import open_workspace

    return open_workspace(args.model, args.neuron_step, getattr(args, "text", None), reconstruct=args.reconstruct,
                          supernet=getattr(args, "supernet", None))


def cmd_space(args: argparse.Namespace) -> None:
    from subnets.basemodel import load_base_model

    base = load_base_model(args.model)
    space = base.space(args.neuron_step)
    desc = space.describe()
    if args.json:
        print(json.dumps(desc, indent=1))
        return
    d = space.dims
    t = Table(title=f"search space of {base.base_id}")
    t.add_column("dimension")
    t.add_column("base")
    t.add_column("choices per kept layer")
    t.add_row("layers", str(d.num_layers), desc["layers"])
    t.add_row("KV groups", str(d.num_kv_heads), str(desc["kv_groups"]))
    t.add_row("query heads per group", str(d.heads_per_group), str(desc["heads_per_group"]))
    n = desc["neurons"]
    t.add_row("MLP neurons", str(d.intermediate_size), f"{n[0]}..{n[-1]} step {space.neuron_step} ({len(n)} choices)")
    t.add_row("hidden / head dim / vocab", f"{d.hidden_size} / {d.head_dim} / {d.vocab_size}", "fixed")
    out_console.print(t)
    out_console.print(f"sub-networks: 10^{desc['log10_size_uniform']} uniform, 10^{desc['log10_size_per_layer']} per-layer")


def cmd_sample(args: argparse.Namespace) -> None:
    from subnets.basemodel import load_base_model

    base = load_base_model(args.model)
    ranking = None
    if not args.random_layers:
        from subnets.importance import importance_for

        ranking = importance_for(base).layer_ranking()
    configs = base.space(args.neuron_step).sample(
        args.n, args.seed, granularity=args.granularity, strategy=args.strategy, layer_ranking=ranking
    )
    sys.stdout.write("".join(c.to_json() + "\n" for c in configs))


def cmd_export(args: argparse.Namespace) -> None:
    from export.request import ExportRequest, write_export
    from training.recovery import open_workspace

    request = request_from_args(ExportRequest, args)
    ws = open_workspace(request.model, request.neuron_step, request.text, reconstruct=request.reconstruct,
                        supernet=request.supernet)
    summary = write_export(request, ws)
    print(json.dumps({k: v for k, v in summary.items() if k != "config"}, indent=1))


def cmd_pipeline(args: argparse.Namespace) -> int:
    """Exit 1 when the constraints admit no deployment (the table names the nearest)."""
    from edgenas.pipeline import PipelineRequest, run_pipeline

    result = run_pipeline(request_from_args(PipelineRequest, args), out_console)
    return 0 if result.recommendation.chosen is not None else 1


def _fmt_ppl(p: float) -> str:
    return f"{p:.1f}" if p < 1e5 else f"{p:.2e}"


def cmd_measurements(args: argparse.Namespace) -> int:
    from edgenas.commands.profile import measurements_main

    return measurements_main(args)


def _model_to_evaluate(args: argparse.Namespace) -> tuple[object, object, str]:
    from subnets.basemodel import load_base_model

    if args.model_dir is not None:
        from subnets.basemodel import resolve_model_dir
        from subnets.extract import load_subnet

        folder = args.model_dir / "hf" if (args.model_dir / "hf" / "config.json").is_file() else args.model_dir
        _, folder = resolve_model_dir(folder)  # the same checks and messages as --model
        from transformers import AutoTokenizer

        return load_subnet(folder), AutoTokenizer.from_pretrained(str(folder)), str(folder)
    if args.config is None:
        base = load_base_model(args.model)
        return base.model, base.tokenizer, base.base_id
    config = read_config(args.config, args.index)
    ws = _workspace(args)
    return ws.model(config), ws.base.tokenizer, config.summary()


def cmd_evaluate(args: argparse.Namespace) -> None:
    from subnets.downstream import evaluate_tasks

    model, tokenizer, name = _model_to_evaluate(args)
    results = evaluate_tasks(model, tokenizer, args.tasks, args.include_path, args.limit, args.batch_size)
    if args.json:
        print(json.dumps({"model": name, "results": results}, indent=1))
        return
    t = Table(title=f"lm-eval: {name}")
    for c in ("task", "metric", "value"):
        t.add_column(c)
    for task, metrics in results.items():
        for k, v in metrics.items():
            if "stderr" not in k and k != "sample_len":
                err = metrics.get(k.replace(",", "_stderr,", 1))
                t.add_row(task, k.split(",")[0], f"{v:.4f}" + (f" ± {err:.4f}" if err is not None else ""))
    out_console.print(t)


def cmd_train_supernet(args: argparse.Namespace) -> int:
    from edgenas.commands.training import train_supernet_cmd

    return train_supernet_cmd(args, out_console)


def cmd_finetune(args: argparse.Namespace) -> int:
    from edgenas.commands.training import finetune_cmd

    return finetune_cmd(args, out_console)


COMMANDS = {}  # filled below, from VERBS


def active_configs(args: argparse.Namespace, ws) -> list:
    """``--active N``: the N candidates the device's measurements so far know least about."""
    from predictor.active import select
    from predictor.data import load_measurements
    from profiler.errors import StoreError
    from profiler.store import Store

    if args.configs is not None:
        raise ConfigError("--active chooses the sub-networks itself; it cannot be combined with --configs",
                          "drop --configs, or drop --active")
    if not exists(args.db):
        raise StoreError(f"--active needs earlier measurements of {args.host}, but {args.db} does not exist",
                         f"run a first sweep: profile-device --host {args.host} --samples 20 --db {args.db}")
    phase = args.phases[0]
    store = Store(args.db)
    try:
        # unstable cells still say roughly where a sub-network lies: enough to choose by
        m = load_measurements(store, args.host, phase, ws.space.dims, ws.base.base_id, include_unstable=True)
    finally:
        store.close()
    pool = ws.space.sample(2000, args.seed + 1, granularity=args.granularity, strategy="uniform",
                           layer_ranking=ws.importance.layer_ranking())
    shape = (max(args.seq_len), 0) if phase == "prefill" else (1, max(args.past_len))
    return select(m, pool, args.active, shape[0], shape[1], seed=args.seed, near=args.active_near)


def _profile_args(p: argparse.ArgumentParser) -> None:
    """The profiler's flags, plus ``--active`` (which needs the predictor, a layer above the
    profiler, so it is wired here)."""
    from edgenas.commands.profile import add_profile_args

    add_profile_args(p)
    p.add_argument("--active", type=int, default=None, metavar="N",
                   help="measure the N sub-networks the device's measurements so far predict least certainly")
    p.add_argument("--active-near", type=float, default=None, metavar="SHARE",
                   help="with --active: choose among sub-networks predicted near SHARE x the full model's latency "
                        "(the search's --budget-share), where a latency constraint decides")


def cmd_profile(args: argparse.Namespace) -> int:
    from edgenas.commands.profile import print_summary, sweep
    from profiler.request import SweepRequest

    ws = configs = None
    if args.active_near is not None and args.active is None:
        raise ConfigError("--active-near only steers --active", "add --active N, or drop --active-near")
    if args.active is not None:
        if args.active < 1:
            raise ConfigError(f"--active {args.active} is not positive", "ask for at least 1 sub-network")
        if args.active_near is not None and not 0 < args.active_near <= 1:
            raise ConfigError(f"--active-near {args.active_near} is not a share of the full model's latency",
                              "pass a number in (0, 1], e.g. --active-near 0.85")
        from subnets.workspace import Workspace

        ws = Workspace.open(args.model, neuron_step=args.neuron_step)
        configs = active_configs(args, ws)
    request = request_from_args(SweepRequest, args)
    return print_summary(sweep(request, ws=ws, configs=configs), request.db)


def _lazy(module: str, name: str) -> Callable[..., Any]:
    """A function of another package, imported when first called (the CLI starts fast)."""
    def call(*a: Any) -> Any:
        import importlib

        return getattr(importlib.import_module(module), name)(*a)

    return call


@dataclass(frozen=True)
class Verb:
    """One command: ``edgenas NAME``, and its console script ``alias`` (the same parser)."""

    name: str
    help: str
    add_args: Callable[[argparse.ArgumentParser], None]
    handle: Callable[[argparse.Namespace], int | None]
    alias: str | None = None


VERBS = (
    Verb("pipeline", "the main job: sample, profile, train predictors, search and verify on one base model",
         _pipeline_args, cmd_pipeline),
    Verb("space", "print the search space of a base model", _space_args, cmd_space),
    Verb("sample", "print seeded sub-network configs as JSON lines", _sample_args, cmd_sample),
    Verb("export", "extract a sub-network: HF folder + ONNX graphs + summary JSON", _export_args, cmd_export),
    Verb("profile", "measure sub-networks' latency on a device into the measurement store", _profile_args,
         cmd_profile, "profile-device"),
    Verb("measurements", "summarize or export a measurement store", _measurements_args, cmd_measurements),
    Verb("report", "write a run's self-contained report.html", _report_args, cmd_report),
    Verb("train-predictor", "train per-phase latency predictors for a device from the measurement store",
         _lazy("edgenas.commands.predictor", "add_train_args"), _lazy("edgenas.commands.predictor", "handle_train"), "train-predictor"),
    Verb("evaluate-predictor", "score a saved predictor on another store's measurements",
         _lazy("edgenas.commands.predictor", "add_evaluate_args"), _lazy("edgenas.commands.predictor", "handle_evaluate"), "evaluate-predictor"),
    Verb("predict", "predict latencies of sub-networks with a saved predictor",
         _lazy("edgenas.commands.predictor", "add_predict_args"), _lazy("edgenas.commands.predictor", "handle_predict"), "predict-latency"),
    Verb("search", "search sub-networks for quality and predicted latency under a budget",
         _lazy("edgenas.commands.search", "add_search_args"), _lazy("edgenas.commands.search", "handle"), "search-subnets"),
    Verb("train-supernet", "recovery training: the base model as a weight-sharing super-network",
         _train_supernet_args, cmd_train_supernet),
    Verb("finetune", "fine-tune one sub-network with distillation from the full model", _finetune_args, cmd_finetune),
    Verb("evaluate", "downstream-task accuracy through lm-evaluation-harness (offline)", _evaluate_args, cmd_evaluate),
    Verb("mix", "choose each layer's weight type within a byte budget (per-group sensitivity, mixed-integer allocation)",
         _lazy("edgenas.commands.mix", "add_mix_args"), _lazy("edgenas.commands.mix", "handle")),
)
COMMANDS.update({v.name: v.handle for v in VERBS})


def alias_main(name: str, argv: Sequence[str] | None = None) -> int:
    """A console script: the parser of ``edgenas NAME`` under the script's own name."""
    verb = next(v for v in VERBS if v.name == name)
    p = make_parser(verb.alias or f"edgenas {name}", verb.help[:1].upper() + verb.help[1:] + ".")
    verb.add_args(p)
    return run(p, argv, verb.handle)


def profile_device_main(argv: Sequence[str] | None = None) -> int:
    return alias_main("profile", argv)


def train_predictor_main(argv: Sequence[str] | None = None) -> int:
    return alias_main("train-predictor", argv)


def evaluate_predictor_main(argv: Sequence[str] | None = None) -> int:
    return alias_main("evaluate-predictor", argv)


def predict_latency_main(argv: Sequence[str] | None = None) -> int:
    return alias_main("predict", argv)


def search_subnets_main(argv: Sequence[str] | None = None) -> int:
    return alias_main("search", argv)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    return run(parser, argv, lambda a: COMMANDS[a.command](a))


if __name__ == "__main__":
    raise SystemExit(main())
