"""Training text as packed token windows: text files, JSON-lines files with a text field, a
Hugging Face ``datasets`` name (optional extra, offline), or the default offline corpus.

The default corpus is the docstrings of the standard library's *calibration* modules; the
held-out perplexity text is the docstrings of the other modules (``subnets.textdata``
splits by module name), so training never sees the text its quality is measured on.
Documents are tokenized, joined with the end-of-text token and cut into windows of
``seq_len``; the windows are cached as a ``.npy`` file keyed by the sources' digest and
the tokenizer. Batches depend only on (seed, step, rank): a resumed run reads what the
uninterrupted one would have."""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from subnets.errors import InputFileError
from subnets.paths import cache_dir
from subnets.textdata import stdlib_docstrings

log = logging.getLogger(__name__)

DEFAULT_DATA = "stdlib"
TEXT_SUFFIXES = (".txt", ".md", ".rst", ".py", ".text")


@dataclass(frozen=True)
class Document:
    source: str
    text: str


def _jsonl_documents(path: Path, field: str) -> Iterator[Document]:
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise InputFileError(f"{path}, line {n}: not valid JSON ({e.msg})", "one JSON object per line") from None
        text = obj.get(field) if isinstance(obj, dict) else None
        if not isinstance(text, str):
            raise InputFileError(f"{path}, line {n}: no string field {field!r}",
                                 f"give each line a {field!r} field, or name the field with --text-field")
        yield Document(f"{path.name}:{n}", text)


def _file_documents(path: Path, field: str) -> list[Document]:
    try:
        if path.suffix in (".jsonl", ".json"):
            return list(_jsonl_documents(path, field))
        return [Document(path.name, path.read_text(encoding="utf-8"))]
    except UnicodeDecodeError:
        raise InputFileError(f"training file {path} is not UTF-8 text", "convert it to UTF-8 (e.g. with iconv)") from None
    except OSError as e:
        raise InputFileError(f"training file {path} is unreadable: {e.strerror}", "check its permissions") from None


def _dataset_documents(name: str, split: str, field: str) -> list[Document]:
    try:
        import datasets
    except ImportError:
        raise InputFileError(f"--data {name!r} is neither a file nor a folder, and the `datasets` package is not installed",
                             "pass text or JSONL files, or `pip install datasets` to read a dataset you have locally") from None
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # a run never reaches a hub
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        ds = datasets.load_dataset(name, split=split)
    except Exception as e:  # datasets raises many types; all mean "not available here"
        raise InputFileError(f"dataset {name!r} (split {split!r}) could not be loaded offline: {e}",
                             "pass a local dataset folder or data files; nothing is downloaded at run time") from None
    if field not in ds.column_names:
        raise InputFileError(f"dataset {name!r} has no column {field!r} (it has {ds.column_names})",
                             "name the text column with --text-field")
    return [Document(f"{name}:{i}", t) for i, t in enumerate(ds[field]) if isinstance(t, str)]


def read_documents(sources: Sequence[str], field: str = "text", split: str = "train") -> list[Document]:
    """Documents from each source: ``stdlib`` (the default corpus), a file, a folder (its
    text and JSONL files, recursively, in name order), or a ``datasets`` name."""
    docs: list[Document] = []
    for src in sources:
        if src == DEFAULT_DATA:
            docs.append(Document("stdlib-docstrings:calibration",
                                 stdlib_docstrings("calibration", min_chars=10**9).text))
            continue
        path = Path(src).expanduser()
        if path.is_dir():
            files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in (*TEXT_SUFFIXES, ".jsonl", ".json"))
            if not files:
                raise InputFileError(f"training folder {path} holds no text or JSONL files",
                                     f"put {', '.join(TEXT_SUFFIXES)} or .jsonl files in it")
            for f in files:
                docs.extend(_file_documents(f, field))
        elif path.is_file():
            docs.extend(_file_documents(path, field))
        elif src.startswith((".", "/", "~")) or path.suffix in (*TEXT_SUFFIXES, ".jsonl", ".json"):
            raise InputFileError(f"training data {src} does not exist", "pass an existing file or folder")
        else:
            docs.extend(_dataset_documents(src, split, field))
    docs = [d for d in docs if d.text.strip()]
    if not docs:
        raise InputFileError(f"training data {', '.join(sources)} holds no text", "give files with some text in them")
    return docs


@dataclass
class TokenWindows:
    """Packed token windows [n, seq_len] and where they came from."""

    windows: np.ndarray
    digest: str
    sources: list[str]

    @property
    def num_tokens(self) -> int:
        return int(self.windows.size)

    def batch(self, step: int, micro: int, rank: int, world: int, batch_size: int, accum: int, seed: int) -> torch.Tensor:
        """The windows of one micro-batch: a seeded permutation per epoch, consumed in order
        by (step, micro-batch, rank), so every rank reads its own share."""
        n = len(self.windows)
        per_step = batch_size * accum * world
        start = (step * per_step + (micro * world + rank) * batch_size)
        idx = []
        for i in range(start, start + batch_size):
            epoch, pos = divmod(i, n)
            perm = np.random.default_rng([seed, epoch]).permutation(n)
            idx.append(perm[pos])
        return torch.from_numpy(self.windows[np.asarray(idx)].astype(np.int64))


def _tokenizer_id(tokenizer: Any) -> str:
    vocab = tokenizer.get_vocab()
    return hashlib.sha256(json.dumps(sorted(vocab.items())).encode()).hexdigest()[:16]


def pack(documents: Sequence[Document], tokenizer: Any, seq_len: int, cache: bool = True) -> TokenWindows:
    """Tokenize, join with the end-of-text token, cut into ``seq_len`` windows (cached)."""
    if tokenizer is None:
        raise InputFileError("the base model has no tokenizer, so training text cannot be tokenized",
                             "save the tokenizer into the model folder")
    h = hashlib.sha256(f"{seq_len}|{_tokenizer_id(tokenizer)}".encode())
    for d in documents:
        h.update(hashlib.sha256(d.text.encode()).digest())
    digest = h.hexdigest()[:20]
    path = cache_dir() / "tokens" / f"{digest}.npy"
    sources = sorted({d.source.split(":")[0] for d in documents})
    if cache and path.is_file():
        return TokenWindows(np.load(path, allow_pickle=False), digest, sources)
    sep = tokenizer.eos_token_id
    ids: list[int] = []
    for d in documents:
        ids.extend(tokenizer(d.text, add_special_tokens=False)["input_ids"])
        if sep is not None:
            ids.append(int(sep))
    n = len(ids) // seq_len
    if n == 0:
        raise InputFileError(f"training text has {len(ids)} tokens, fewer than one window of {seq_len}",
                             "give more text, or a smaller --seq-len")
    dtype = np.int32 if max(ids) < 2**31 else np.int64
    windows = np.asarray(ids[: n * seq_len], dtype=dtype).reshape(n, seq_len)
    if cache:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp.npy")  # processes of one run may pack at once
        np.save(tmp, windows)
        tmp.replace(path)
    log.info("training data: %d windows of %d tokens (%d tokens) from %s", n, seq_len, n * seq_len, ", ".join(sources))
    return TokenWindows(windows, digest, sources)
