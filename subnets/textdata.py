"""Text for calibration and evaluation that every machine has offline: the docstrings of
Python's standard library, split by module into disjoint calibration and held-out sets; or
a user's own text file."""

from __future__ import annotations

import ast
import hashlib
import sysconfig
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from subnets.errors import InputFileError

Split = Literal["calibration", "heldout"]

_SKIP_DIRS = {"test", "tests", "idlelib", "site-packages", "lib2to3", "tkinter", "turtledemo", "__pycache__", "ensurepip"}


def _stdlib_files() -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    files = [p for p in root.rglob("*.py") if not _SKIP_DIRS.intersection(p.relative_to(root).parts)]
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def _split_of(path: Path) -> Split:
    # A stable hash of the module path, not Python's salted hash(): the split is the same in
    # every process.
    return "heldout" if zlib.crc32(path.name.encode()) % 4 == 0 else "calibration"


def _docstrings(path: Path) -> list[str]:
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"))
    except (SyntaxError, UnicodeDecodeError, OSError):
        return []
    out = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node)
            if doc and len(doc) > 40:
                out.append(doc)
    return out


@dataclass(frozen=True)
class Corpus:
    name: str
    text: str

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.text.encode()).hexdigest()


def stdlib_docstrings(split: Split, min_chars: int = 200_000) -> Corpus:
    """At least ``min_chars`` characters (if the stdlib has them) of docstrings from the
    modules in ``split``, in a fixed order."""
    parts: list[str] = []
    total = 0
    for f in _stdlib_files():
        if _split_of(f) != split:
            continue
        for doc in _docstrings(f):
            parts.append(doc)
            total += len(doc) + 2
        if total >= min_chars:
            break
    return Corpus(f"stdlib-docstrings:{split}", "\n\n".join(parts))


def read_text_file(path: str | Path) -> Corpus:
    p = Path(path).expanduser()
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise InputFileError(f"text file {p} does not exist", "pass the path of a UTF-8 text file") from None
    except UnicodeDecodeError:
        raise InputFileError(f"text file {p} is not UTF-8 text", "convert it to UTF-8 (e.g. with iconv)") from None
    except OSError as e:
        raise InputFileError(f"text file {p} is unreadable: {e.strerror}", "check its permissions") from None
    if not text.strip():
        raise InputFileError(f"text file {p} is empty", "give a file with some text in it")
    return Corpus(f"file:{p.name}", text)
