"""A deployed precision as the quality objective sees it: the workspace view that judges a
sub-network at that precision (onnxruntime's and the numpy-written GGUF types by
``export.quantize``, llama.cpp's presets by ``export.gguf_presets``)."""

from __future__ import annotations

from typing import Any

from export.quantize import GGUF_PRESETS, Precision


def at_precision(ws: Any, precision: str, block_size: int = 32) -> Any:
    """``ws`` judging quality at ``precision`` (a view: it shares the loaded model)."""
    if precision in GGUF_PRESETS:
        from export.gguf_presets import PresetArithmetic

        return ws.at_precision(PresetArithmetic(precision))
    return ws.at_precision(None if precision == "fp32" else Precision(precision, block_size))
