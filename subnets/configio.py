"""Reading and writing sub-network configs as JSON / JSON lines."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from subnets.config import SubnetConfig
from subnets.errors import ConfigError, InputFileError


def read_configs(path: str | Path) -> list[SubnetConfig]:
    """Configs from a JSON-lines file (one per line), or a JSON file holding one config or a
    list. A bad line is named by its number."""
    p = Path(path).expanduser()
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise InputFileError(f"configs file {p} does not exist", "write one with `edgenas sample --n N > FILE`") from None
    except (OSError, UnicodeDecodeError) as e:
        raise InputFileError(f"configs file {p} is unreadable: {e}", "give a UTF-8 JSON or JSON-lines file") from None
    stripped = text.strip()
    if not stripped:
        raise InputFileError(f"configs file {p} is empty", "write one with `edgenas sample --n N > FILE`")
    # A whole-file JSON document (object or list), else JSON lines.
    try:
        doc = json.loads(stripped)
    except json.JSONDecodeError:
        doc = None
    if isinstance(doc, list):
        items = list(enumerate(doc, 1))
        unit = "item"
    elif isinstance(doc, dict):
        items, unit = [(1, doc)], "item"
    else:
        items, unit = [], "line"
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                items.append((n, json.loads(line)))
            except json.JSONDecodeError as e:
                raise ConfigError(f"{p}, line {n}: not valid JSON ({e.msg})", "one config object per line") from None
    out = []
    for n, obj in items:
        try:
            out.append(SubnetConfig.from_dict(obj))
        except ConfigError as e:
            raise ConfigError(f"{p}, {unit} {n}: {e.problem}", e.fix) from None
    return out


def read_config(path: str | Path, index: int = 0) -> SubnetConfig:
    """The ``index``-th config of a configs file (``--configs FILE --index N``)."""
    configs = read_configs(path)
    if not 0 <= index < len(configs):
        raise ConfigError(f"--index {index} is out of range: {path} has {len(configs)} configs",
                          f"use --index 0..{len(configs) - 1}")
    return configs[index]


def write_configs(configs: Iterable[SubnetConfig], path: str | Path) -> None:
    Path(path).write_text("".join(c.to_json() + "\n" for c in configs))
