"""Shared core of edgenas: search space, sub-network configs, importance, extraction,
ONNX export and perplexity. Every other edgenas package builds on this one; it imports none
of them."""

from __future__ import annotations

__version__ = "0.1.0"
