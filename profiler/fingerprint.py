"""A device's identity: the hardware and runtime that decide its latency.

The back-end a sweep uses (onnxruntime's CPU or CUDA provider, TensorRT) is not part of it:
one board measured through two back-ends is one device whose measurements differ in a
column, so a CUDA sweep never hides the same board's CPU measurements."""

from __future__ import annotations

import hashlib
import json
from typing import Any


def device_fingerprint(hello: dict[str, Any]) -> str:
    """Board, CPU, memory, runtime version and the providers it offers, from the agent's hello."""
    b = hello.get("board", {})
    o = hello.get("onnxruntime") or {}
    ident = {"kind": b.get("kind"), "model": b.get("model"), "cpu": b.get("cpu_model"), "cores": b.get("cpu_count"),
             "memory_gb": round((b.get("memory_mb") or 0) / 1024), "machine": b.get("machine"),
             "ort": o.get("version"), "providers": sorted(o.get("providers") or []),
             "tegra": b.get("tegra_release")}
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]
