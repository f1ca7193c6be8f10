"""Recovery training: the importance-sorted base model trained as a weight-sharing
super-network (sandwich rule + distillation), and fine-tuning of chosen sub-networks.
Above the core (``subnets``) and the predictor (for latency-aware sampling), below the
search."""

from __future__ import annotations
