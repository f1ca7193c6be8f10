"""The command reference in docs/cli.md, written from the parsers themselves (so it cannot
drift from them: tests/test_docs.py regenerates it and compares)."""

from __future__ import annotations

import argparse

BEGIN = "<!-- BEGIN GENERATED REFERENCE (python -m edgenas.clidoc --write) -->"
END = "<!-- END GENERATED REFERENCE -->"


def _flag_row(a: argparse.Action) -> str:
    names = ", ".join(f"`{s}`" for s in a.option_strings)
    if a.choices:
        names += " " + "\\|".join(str(c) for c in a.choices)
    elif a.nargs != 0:
        names += f" {a.metavar or a.dest.upper()}"
    default = a.default
    text = (a.help or "").replace("|", "\\|").replace("%%", "%")
    hidden = default is None or default is False or default == argparse.SUPPRESS or a.required or "default" in text
    shown = "" if hidden else f" (default {','.join(map(str, default)) if isinstance(default, (list, tuple)) else default})"
    req = " **required**" if a.required else ""
    return f"| {names} | {text}{shown}{req} |"


def reference() -> str:
    from edgenas.cli import VERBS, build_parser

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    out = [BEGIN, ""]
    for verb in VERBS:
        p = sub.choices[verb.name]
        alias = f" (console script: `{verb.alias}`)" if verb.alias else ""
        out += [f"### edgenas {verb.name}", "", f"{verb.help[:1].upper()}{verb.help[1:]}{alias}.", "",
                "| flag | meaning |", "| --- | --- |"]
        out += [_flag_row(a) for a in p._actions if a.option_strings and a.dest not in ("help", "verbose")]
        out.append("")
    out.append(END)
    return "\n".join(out)


def splice(text: str) -> str:
    """``text`` (docs/cli.md) with its generated part replaced by the current reference."""
    head, _, rest = text.partition(BEGIN)
    _, _, tail = rest.partition(END)
    return head + reference() + tail


if __name__ == "__main__":
    import sys
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "docs" / "cli.md"
    if "--write" in sys.argv:
        path.write_text(splice(path.read_text()))
    else:
        print(reference())
