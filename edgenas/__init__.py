"""edgenas: hardware-aware latency profiling, prediction and sub-network search for
compressing Llama-family LLMs. The Python API (``edgenas.api``) is importable from here; the
command line is ``edgenas <verb>`` (``edgenas.cli``)."""

from __future__ import annotations

from typing import Any

__all__ = ["export", "latency_objective", "measurements", "open_model", "predicted_latency", "profile", "run",
           "sample", "search", "train_predictors"]


def __getattr__(name: str) -> Any:
    # imported on first use: `import edgenas` stays cheap (torch loads only when needed)
    if name in __all__:
        from edgenas import api

        return getattr(api, name)
    raise AttributeError(f"module 'edgenas' has no attribute {name!r}")
