"""Where edgenas keeps its caches (converted base models, importance, exports), and the
content hash files are known by."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path


def cache_dir() -> Path:
    """The user cache folder: ``$EDGENAS_CACHE``, else ``$XDG_CACHE_HOME/edgenas``, else
    ``~/.cache/edgenas``."""
    env = os.environ.get("EDGENAS_CACHE")
    if env:
        root = Path(env)
    else:
        xdg = os.environ.get("XDG_CACHE_HOME")
        root = (Path(xdg) if xdg else Path.home() / ".cache") / "edgenas"
    root.mkdir(parents=True, exist_ok=True)
    return root


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with Path(path).open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
