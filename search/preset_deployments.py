"""llama.cpp's own presets (Q6_K, Q5_K_M, Q4_K_M) as obvious deployments: the full model as
a llama.cpp user would ship it without this suite, written by upstream ``llama-quantize``
(``export.gguf_presets``), judged as llama.cpp computes it and measured on the device (no
predictor: one measurement of one file, under the protocol of the llama.cpp predictors)."""

from __future__ import annotations

import logging
from typing import Any

from export.arithmetic import at_precision
from export.gguf_file import GgufOptions, export_gguf
from export.quantize import GGUF_TYPES
from search.recommendation import FULL, Choice

log = logging.getLogger(__name__)

# what a llama.cpp user picks besides Q8_0 and Q4_0 (those have predictors of their own)
OBVIOUS_PRESETS = ("q6_k", "q5_k_m", "q4_k_m")


def preset_choices(deps: dict[str, Any], host: str, db: Any, budget_ms: float,
                   presets: tuple[str, ...] = OBVIOUS_PRESETS) -> list[Choice]:
    """The full model at each preset not searched already, a ``Choice`` each with its measured
    workload latency as prediction and bound; none without a llama.cpp deployment (its
    predictor says how llama.cpp is measured here) or when a preset cannot be measured."""
    from profiler.sweep import export_root
    from search.verify import measure_variant

    ref = next((d for p, d in deps.items() if p in GGUF_TYPES), None)
    if ref is None:
        return []
    ws, full = ref.ws, ref.ws.space.full()
    out = []
    for preset in presets:
        if preset in deps:
            continue
        ms = measure_variant(ws, ref.objective, full, host, db, precision=preset, weights="real")
        if ms is None:
            log.warning("the full model at %s could not be measured on %s: left out", preset, host)
            continue
        exported = export_gguf(ws.weights(full), export_root(ws) / "gguf", GgufOptions(preset, weights="real"),
                               tokenizer_dir=ws.base.path)
        ppl = at_precision(ws, preset).perplexity(full)
        out.append(Choice(FULL, full.summary(), preset, full.to_dict(), ppl, ms, ms, exported.weights_bytes / 1e6,
                          measured_ms=ms, meets_budget=ms <= budget_ms))
    return out
