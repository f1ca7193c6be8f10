"""Where edgenas keeps its caches (converted base models, importance, exports)."""

from __future__ import annotations

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
