"""What every edgenas command line shares: logging through rich, and one way of turning a
user error into a message and exit status 2 (never a traceback)."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from rich.console import Console
from rich.logging import RichHandler
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from subnets.errors import EdgenasError

console = Console(stderr=True)
R = TypeVar("R")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # argparse's own errors exit 2 too, without usage spam
        self.print_usage(sys.stderr)
        console.print(f"[bold red]error:[/] {escape(message)}", soft_wrap=True, highlight=False)
        raise SystemExit(2)


def progress_bar(*fields: str) -> Progress:
    """The progress bar every long command shows on stderr: count, elapsed time and ETA, plus
    a column per format string in ``fields`` (e.g. ``"loss {task.fields[loss]}"``)."""
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                    *(TextColumn(f) for f in fields), TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(),
                    console=Console(stderr=True), transient=True)


def make_parser(prog: str, description: str, run_config: bool = True) -> argparse.ArgumentParser:
    p = _Parser(prog=prog, description=description)
    p.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    if run_config:
        add_run_config(p)
    return p


def add_run_config(p: argparse.ArgumentParser) -> None:
    """``--config run.toml``, read before parsing (edgenas.runconfig); listed for --help."""
    p.add_argument("--config", metavar="RUN.toml", dest="run_config", default=None,
                   help="read this command's flags from a TOML file; flags given here override it")


def subparsers(p: argparse.ArgumentParser) -> argparse._SubParsersAction:
    return p.add_subparsers(dest="command", required=True, parser_class=_Parser)


def add_granularity(p: argparse.ArgumentParser, what: str) -> None:
    """The one granularity vocabulary of every command, with one default."""
    from subnets.space import DEFAULT_GRANULARITY, GRANULARITIES

    p.add_argument("--granularity", choices=GRANULARITIES, default=DEFAULT_GRANULARITY,
                   help=f"{what}: tapered (default; top-k layers by influence, one KV-group/head/width triple and a width "
                        "taper along influence), uniform (no taper) or per-layer (a triple per layer)")


def run(parser: argparse.ArgumentParser, argv: Sequence[str] | None, handler: Callable[[argparse.Namespace], int | None]) -> int:
    from edgenas.runconfig import expand

    try:
        args = parser.parse_args(expand(list(sys.argv[1:] if argv is None else argv), parser))
    except SystemExit as e:  # --help, or a usage error (exit status 2): return it, as main() does
        return int(e.code or 0)
    except EdgenasError as e:  # an unreadable --config run.toml
        console.print(f"[bold red]error:[/] {escape(e.problem)}", soft_wrap=True, highlight=False)
        if e.fix:
            console.print(f"[bold]fix:[/] {escape(e.fix)}", soft_wrap=True, highlight=False)
        return e.exit_code
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(message)s",
        handlers=[RichHandler(console=console, show_path=False, show_time=False)],
        force=True,
    )
    for noisy in ("transformers", "urllib3", "paramiko", "matplotlib", "PIL", "optuna"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
    except ImportError:
        pass
    try:
        return int(handler(args) or 0)
    except EdgenasError as e:
        console.print(f"[bold red]error:[/] {escape(e.problem)}", soft_wrap=True, highlight=False)
        if e.fix:
            console.print(f"[bold]fix:[/] {escape(e.fix)}", soft_wrap=True, highlight=False)
        return e.exit_code
    except KeyboardInterrupt:
        console.print("[yellow]interrupted[/]")
        return 130


def add_reconstruct(p: argparse.ArgumentParser, default: bool = False) -> None:
    """``--reconstruct``: sub-networks' output projections refitted (``subnets.reconstruct``);
    where it is on by default, ``--no-reconstruct`` turns it off."""
    p.add_argument("--reconstruct", action=argparse.BooleanOptionalAction if default else "store_true", default=default,
                   help="refit each sub-network's attention and MLP output projections by least squares to what the "
                        "full model's layers computed on calibration text (training-free; statistics collected once "
                        "per base model and cached)" + ("; on by default, --no-reconstruct turns it off" if default else ""))


def add_graph(p: argparse.ArgumentParser, what: str) -> None:
    """``--graph``: which ONNX decoder graph (``onnx_export.GRAPHS``)."""
    from export.onnx_graphs import GRAPHS

    p.add_argument("--graph", choices=GRAPHS, default="plain",
                   help=f"{what}: attention in standard operators (plain, default); onnxruntime's fused decoder operators "
                        "as onnxruntime-genai deploys (fused: GroupQueryAttention, SkipSimplifiedLayerNormalization); "
                        "those with its in-place KV buffer, past and present bound to one preallocated buffer "
                        "(fused-shared)")


def request_from_args(cls: type[R], args: argparse.Namespace, **overrides: Any) -> R:
    """The typed request a command's parsed flags spell: each field of ``cls`` from the flag
    of the same name (a field the parser does not define keeps its default). Requests, not
    ``Namespace`` objects, cross into the library."""
    import dataclasses

    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    values = {k: v for k, v in vars(args).items() if k in names}
    values.update(overrides)
    return cls(**values)
