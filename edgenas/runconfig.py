"""``--config run.toml``: a long command's flags kept in a file.

Keys are the command's flags without the leading dashes (``latency-budget-ms = 900`` or
``latency_budget_ms = 900``); a ``[search]`` (or ``[profile]``, ...) table holds the flags of
that command only, so one file can carry a whole project's settings. Values: strings,
numbers, booleans (a true switch is given, a false one left out) and lists (comma-joined, as
the command line writes them, or repeated for flags that take several values). Flags on the
command line override the file."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

from subnets.errors import InputFileError

log = logging.getLogger(__name__)


def _load(path: Path) -> dict[str, Any]:
    try:
        import tomllib
    except ImportError:  # Python 3.10
        import tomli as tomllib
    if not path.is_file():
        raise InputFileError(f"run settings file {path} does not exist", "pass --config with a TOML file of flags")
    try:
        return tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise InputFileError(f"{path} is not valid TOML ({e})", "write flags as `name = value`, one per line") from None


def _options(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {s: a for a in parser._actions for s in a.option_strings if s.startswith("--")}


def _tokens(path: Path, table: dict[str, Any], parser: argparse.ArgumentParser, verb: str | None) -> list[str]:
    options = _options(parser)
    out: list[str] = []
    for key, value in table.items():
        if isinstance(value, dict):
            continue  # another command's table
        flag = "--" + key.replace("_", "-")
        action = options.get(flag)
        if action is None or flag == "--config":
            known = sorted(s[2:] for s in options if s not in ("--help", "--config"))
            raise InputFileError(f"{path}: {key!r} is not a setting of {'edgenas ' + verb if verb else parser.prog}",
                                 f"use one of its flags: {', '.join(known)}")
        if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
            if not isinstance(value, bool):
                raise InputFileError(f"{path}: {key} is a switch; give true or false", f"{key} = true")
            out += [flag] if value else []
        elif isinstance(value, list) and action.nargs in ("+", "*"):
            out += [flag, *(str(v) for v in value)]
        elif isinstance(value, list):
            out += [flag, ",".join(str(v) for v in value)]
        else:
            out += [flag, str(value).lower() if isinstance(value, bool) else str(value)]
    return out


def expand(argv: list[str], parser: argparse.ArgumentParser) -> list[str]:
    """``argv`` with ``--config FILE.toml`` replaced by the file's flags (ahead of the command
    line's own, which so override them). ``--config FILE`` naming a configs file (its old
    meaning) becomes ``--configs FILE``."""
    sub = next((a for a in parser._actions if isinstance(a, argparse._SubParsersAction)), None)
    verb = argv[0] if sub is not None and argv and argv[0] in sub.choices else None
    target = sub.choices[verb] if verb is not None and sub is not None else parser
    head = [verb] if verb is not None else []
    rest = argv[len(head):]
    settings: list[str] = []
    out: list[str] = []
    i = 0
    while i < len(rest):
        arg = rest[i]
        name, eq, val = arg.partition("=")
        if name != "--config":
            out.append(arg)
            i += 1
            continue
        value = val if eq else (rest[i + 1] if i + 1 < len(rest) else "")
        i += 1 if eq else 2
        if value.endswith(".toml"):
            table = _load(Path(value))
            section = table.get(verb, {}) if verb is not None else {}
            settings += _tokens(Path(value), table, target, verb)
            settings += _tokens(Path(value), section if isinstance(section, dict) else {}, target, verb)
        elif "--configs" in _options(target):
            log.warning("--config %s: sub-network files are now --configs (--config takes a TOML file of flags)", value)
            out += ["--configs", value]
        else:
            raise InputFileError(f"--config {value!r} is not a TOML file of flags",
                                 "pass --config run.toml (flags as `name = value`)")
    return head + settings + out
