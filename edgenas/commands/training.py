"""``edgenas train-supernet`` and ``edgenas finetune``: recovery training from the command line
(one process, or N under ``torchrun`` / ``accelerate launch`` with the same arguments)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from rich.console import Console

from edgenas.clikit import add_reconstruct, progress_bar, request_from_args
from training.request import FinetuneRequest, SupernetRequest, run_finetune, run_supernet
from training.sampler import STRATEGIES, parse_range
from training.settings import PRECISIONS, TrainSettings


def add_optimization_args(p: argparse.ArgumentParser, kd_default: str) -> None:
    from training.objective import KD_MODES

    p.add_argument("--data", nargs="+", default=["stdlib"],
                   help="training text: files (.txt/.md/.py/...), JSONL files with a text field, folders of them, or a "
                        "datasets name you have locally (default 'stdlib': the standard library's calibration-split "
                        "docstrings, disjoint from the held-out perplexity text)")
    p.add_argument("--text-field", default="text", help="the JSONL / dataset field holding the text (default text)")
    p.add_argument("--steps", type=int, required=True, help="optimizer steps")
    p.add_argument("--batch-size", type=int, default=4, help="sequences per micro-batch and process (default 4)")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per sequence (default 256)")
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step (default 1)")
    p.add_argument("--lr", type=float, default=2e-4, help="peak learning rate of AdamW (default 2e-4)")
    p.add_argument("--warmup-steps", type=int, default=None, help="linear warm-up steps (default: 5%% of --steps)")
    p.add_argument("--min-lr-ratio", type=float, default=0.1, help="cosine decay ends at this share of --lr")
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--clip", type=float, default=1.0, help="gradient-norm clipping (0: off)")
    p.add_argument("--kd", choices=KD_MODES, default=kd_default,
                   help="distillation: inplace (the step's largest sub-network teaches the others), teacher (a frozen "
                        f"copy of the original model), none (labels only); default {kd_default}")
    p.add_argument("--ce-weight", type=float, default=0.0, help="a in a*CE + b*T^2*KL (default 0: distillation only)")
    p.add_argument("--kd-weight", type=float, default=1.0, help="b in a*CE + b*T^2*KL (default 1)")
    p.add_argument("--temperature", type=float, default=1.0, help="T of the distillation (default 1)")
    p.add_argument("--train-embeddings", action="store_true", help="also train the (tied) embedding; frozen by default")
    p.add_argument("--precision", choices=PRECISIONS, default="fp32", help="bf16/fp16 autocast (on a GPU); default fp32")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--checkpoint-every", type=int, default=50, help="steps between checkpoints (default 50)")
    p.add_argument("--cpu", action="store_true", help="train on the CPU even where a GPU is present")
    p.add_argument("--out", type=Path, required=True, help="run folder (rerunning the same command resumes it)")


def add_supernet_args(p: argparse.ArgumentParser) -> None:
    add_optimization_args(p, "inplace")
    p.add_argument("--strategy", choices=STRATEGIES, default="sandwich",
                   help="sandwich: largest + smallest + k random per step (default); random: k random; standard: full model")
    p.add_argument("--k", type=int, default=2, help="random sub-networks per step (default 2)")
    p.add_argument("--predictor", type=Path, default=None,
                   help="device predictor folder (prefill/ and decode/): sample by predicted workload latency "
                        "(default: analytic workload MACs)")
    p.add_argument("--device", default=None, help="the device the predictor is for")
    p.add_argument("--workload", default="128,64", help="S,N of the workload whose latency the range is of")
    p.add_argument("--latency-range", default="0.5,1.0",
                   help="train sub-networks between these shares of the full model's latency (default 0.5,1.0)")
    p.add_argument("--bins", type=int, default=8, help="latency bins sampled evenly (default 8)")


def add_finetune_args(p: argparse.ArgumentParser) -> None:
    add_optimization_args(p, "teacher")
    p.add_argument("--configs", dest="config", required=True,
                   help="the sub-network's configs file (JSON or JSON lines; the first unless --index)")
    p.add_argument("--index", type=int, default=0, help="which config of the file (0-based)")
    p.add_argument("--supernet", type=Path, default=None, help="start from a trained super-network's weights")
    add_reconstruct(p)
    p.add_argument("--onnx", action="store_true", help="also export the trained sub-network to ONNX (out/onnx/)")


def settings_from_args(args: argparse.Namespace, strategy: str = "standard") -> TrainSettings:
    warm = args.warmup_steps if args.warmup_steps is not None else max(1, round(0.05 * max(args.steps, 1)))
    lat = parse_range(args.latency_range) if getattr(args, "latency_range", None) else (0.5, 1.0)
    return TrainSettings(
        steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len, grad_accum=args.grad_accum, lr=args.lr,
        min_lr_ratio=args.min_lr_ratio, warmup_steps=warm, weight_decay=args.weight_decay, clip=args.clip,
        strategy=getattr(args, "strategy", strategy), k=getattr(args, "k", 0), kd=args.kd, ce_weight=args.ce_weight,
        kd_weight=args.kd_weight, temperature=args.temperature, latency_range=lat, bins=getattr(args, "bins", 8),
        freeze_embeddings=not args.train_embeddings, precision=args.precision, seed=args.seed,
        checkpoint_every=args.checkpoint_every).validate()


class StepProgress:
    """A rich progress bar with the loss, tokens/s and ETA of a training run."""

    def __init__(self, total: int, title: str) -> None:
        self.progress = progress_bar("loss {task.fields[loss]}", "{task.fields[tps]} tok/s")
        self.task = self.progress.add_task(title, total=total, loss="-", tps="-")

    def __enter__(self) -> StepProgress:
        self.progress.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.progress.__exit__(*exc)

    def start_at(self, step: int) -> None:
        self.progress.update(self.task, completed=step)

    def __call__(self, rec: dict[str, Any]) -> None:
        self.progress.update(self.task, completed=rec["step"] + 1, loss=f"{rec['loss']:.3f}",
                             tps=f"{rec['tokens_per_s']:.0f}")


def supernet_request(args: argparse.Namespace) -> SupernetRequest:
    return request_from_args(SupernetRequest, args, settings=settings_from_args(args))


def finetune_request(args: argparse.Namespace) -> FinetuneRequest:
    return request_from_args(FinetuneRequest, args, settings=settings_from_args(args))


def train_supernet_cmd(args: argparse.Namespace, console: Console) -> int:
    from training.checkpoint import read_state
    from training.trainer import make_accelerator

    request = supernet_request(args)
    acc = make_accelerator(request.settings, cpu=request.cpu)
    state = read_state(request.out)
    with StepProgress(request.settings.steps, f"train-supernet ({request.settings.strategy}, "
                                              f"{acc.num_processes} proc)") as bar:
        if state:
            bar.start_at(state.step)
        res = run_supernet(request, on_step=bar, accelerator=acc)
    _report(console, res, request.settings, request.out, acc)
    return 0


def finetune_cmd(args: argparse.Namespace, console: Console) -> int:
    from training.checkpoint import read_state
    from training.trainer import make_accelerator

    request = finetune_request(args)
    acc = make_accelerator(request.settings, cpu=request.cpu)
    state = read_state(request.out)
    with StepProgress(request.settings.steps, f"finetune {request.subnet().summary()}") as bar:
        if state:
            bar.start_at(state.step)
        res, onnx = run_finetune(request, on_step=bar, accelerator=acc)
    _report(console, res, request.settings, request.out, acc)
    if onnx is not None:
        console.print(f"ONNX (trained weights): {onnx}")
    return 0


def _report(console: Console, res: Any, settings: TrainSettings, out: Path, acc: Any) -> None:
    if not acc.is_main_process:
        return
    last = res.log[-1] if res.log else None
    resumed = f", resumed at step {res.resumed_from}" if res.resumed_from else ""
    console.print(f"trained steps {res.resumed_from}..{res.steps_done} of {settings.steps}{resumed}: "
                  f"{res.seconds:.0f} s, {res.tokens_per_s:.0f} tokens/s over {acc.num_processes} process(es)"
                  + (f", last loss {last['loss']:.4f}" if last else ""))
    if last:
        console.print(json.dumps(last["members"]))
    console.print(f"run folder: {out} (weights in {out / 'checkpoint' / 'model'}, log {out / 'log.jsonl'}, "
                  f"curves {out / 'loss.png'})")
