"""``edgenas mix``: the precision mix of least measured sensitivity within a byte budget. The
parser builds a ``MixRequest``; the table compares the chosen mix with the uniform types."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from rich.console import Console
from rich.table import Table

from edgenas.clikit import progress_bar, request_from_args
from export.mix import MENUS
from search.mix_allocation import MixChoice, MixRequest, choose_mix

out_console = Console(width=None if sys.stdout.isatty() else 150)


def add_mix_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="smollm2", help="base model: 'smollm2', a local HF folder, or a .gguf file")
    p.add_argument("--neuron-step", type=int, default=64)
    p.add_argument("--runtime", choices=sorted(MENUS), default="llama.cpp", help="whose weight types (default llama.cpp)")
    p.add_argument("--high", default="q8_0", help="the type every group keeps unless the budget needs it lower (default q8_0)")
    p.add_argument("--lows", default="q4_0", help="lower types a group may take, comma-separated (default q4_0)")
    p.add_argument("--budget-mb", type=float, default=None, help="the weights' budget in MB (what a decode step reads)")
    p.add_argument("--budget-share", type=float, default=0.75,
                   help="without --budget-mb: the budget as a share of the weights at --high (default 0.75)")
    p.add_argument("--configs", dest="config", type=Path, default=None,
                   help="a sub-network's configs file (default: the full model)")
    p.add_argument("--index", type=int, default=0, help="which config of the file (0-based)")
    p.add_argument("--quality-tokens", type=int, default=2048, help="held-out tokens per perplexity (default 2048)")
    p.add_argument("--text", default=None, help="held-out text file (default: stdlib docstrings)")
    p.add_argument("--block-size", type=int, default=32, choices=[16, 32, 64, 128], help="onnxruntime int4: inputs per scale")
    p.add_argument("--out", type=Path, default=Path("runs/mix.json"), help="where the mix's JSON goes (edgenas export --mix)")


def render(choice: MixChoice, console: Console = out_console) -> None:
    t = Table(title=f"{choice.request.runtime} precision mix within {choice.budget_mb:.1f} MB of weights")
    for c in ("deployment", "MB", "perplexity"):
        t.add_column(c, justify="left" if c == "deployment" else "right")
    t.add_row(f"mix: {choice.mix.summary()}", f"{choice.mb:.1f}", f"{choice.perplexity:.2f}")
    for kind, (mb, ppl) in sorted(choice.uniform.items(), key=lambda kv: kv[1][0]):
        t.add_row(f"uniform {kind}", f"{mb:.1f}", f"{ppl:.2f}")
    console.print(t)
    console.print(f"sensitivity of {choice.sensitivity_groups} tensor groups (cached); mix written to "
                  f"{choice.request.out} (edgenas export --mix {choice.request.out})")


def handle(args: argparse.Namespace) -> int:
    request = request_from_args(MixRequest, args)
    with progress_bar() as prog:
        task = prog.add_task("sensitivity", total=None)
        choice = choose_mix(request, lambda n, total: prog.update(task, completed=n, total=total))
    render(choice)
    return 0
