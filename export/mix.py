"""A precision mix: which weight type each part of a sub-network is deployed at.

A deployment is an architecture (``SubnetConfig``), a runtime, and a precision per tensor
group: the token embedding / LM head (tied in Llama-family models: one tensor), and for each
kept layer its attention projections (q, k, v, o) and its MLP (gate, up, down). Norms stay
F32. llama.cpp's own K-quant presets are hand-made mixes of this kind; here any mix is a
value that hashes stably, so its quality and latency are cached and searched like an
architecture.

The menus are the weight types each runtime runs on a CPU and this suite writes exactly:
llama.cpp GGUF types in numpy by the ``gguf`` package (the block formats llama.cpp's
quantizer writes), onnxruntime fp32 / int8 (MatMulInteger) / int4 (MatMulNBits) per MatMul."""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from dataclasses import dataclass
from typing import Any

from subnets.errors import ConfigError

RUNTIMES = ("llama.cpp", "onnxruntime")
MENUS: dict[str, tuple[str, ...]] = {
    "llama.cpp": ("f32", "f16", "q8_0", "q5_1", "q5_0", "q4_1", "q4_0"),
    "onnxruntime": ("fp32", "int8", "int4"),
}
# the embedding / LM head: llama.cpp stores the tied tensor once at its type; onnxruntime
# gathers the embedding from fp32 and, at int8 or int4, multiplies by a quantized copy of it as
# the LM head: at 576 x 49152 it is a fifth of SmolLM2's weights, and in fp32 it was 63% of the
# bytes an int4 decode step read
HEAD_MENUS: dict[str, tuple[str, ...]] = {"llama.cpp": MENUS["llama.cpp"], "onnxruntime": MENUS["onnxruntime"]}
# onnxruntime's int4 keeps an int8 head: on this CPU (1 thread, benchmarks/lm_head.py) an int8
# head decoded as fast as an int4 one (11.4 vs 11.3 ms at P=128; fp32 head 15.2 ms) for a
# perplexity of 33.2 against 35.5 (fp32 head 32.5)
_DEFAULT_HEADS = {("onnxruntime", "int4"): "int8"}


def default_head(runtime: str, kind: str) -> str:
    """The head's type in a uniform deployment at ``kind``."""
    heads = HEAD_MENUS.get(runtime, ())
    return _DEFAULT_HEADS.get((runtime, kind)) or (kind if kind in heads else heads[0] if heads else kind)
# bytes per weight as stored (block scales included): what a decode step reads
BYTES_PER_WEIGHT = {"f32": 4.0, "fp32": 4.0, "f16": 2.0, "fp16": 2.0, "q8_0": 34 / 32, "q5_1": 24 / 32,
                    "q5_0": 22 / 32, "q4_1": 20 / 32, "q4_0": 18 / 32, "int8": 1.0,
                    # llama.cpp's presets, nominally (their K type's bytes): the file's own size is
                    # reported wherever one was written (fallback and upgraded tensors differ)
                    "q6_k": 210 / 256, "q5_k_m": 176 / 256, "q4_k_m": 144 / 256, "q3_k_m": 110 / 256}
ATTENTION = ("q", "k", "v", "o")
MLP = ("gate", "up", "down")


def int4_bytes(block_size: int) -> float:
    """MatMulNBits: half a byte a weight plus one fp32 scale per block."""
    return 0.5 + 4.0 / block_size


@dataclass(frozen=True)
class PrecisionMix:
    """Weight types of one deployment on ``runtime``; ``attention[i]`` and ``mlp[i]`` are the
    types of the i-th kept layer's projections, ``head`` the embedding / LM head's."""

    runtime: str
    head: str
    attention: tuple[str, ...]
    mlp: tuple[str, ...]
    block_size: int = 32  # onnxruntime int4: inputs per scale

    def __post_init__(self) -> None:
        object.__setattr__(self, "attention", tuple(self.attention))
        object.__setattr__(self, "mlp", tuple(self.mlp))
        if self.runtime not in RUNTIMES:
            raise ConfigError(f"runtime {self.runtime!r} has no precision menu here", f"use one of {', '.join(RUNTIMES)}")
        if len(self.attention) != len(self.mlp):
            raise ConfigError(f"the mix names {len(self.attention)} attention and {len(self.mlp)} MLP types",
                              "give one of each per kept layer")
        menu = MENUS[self.runtime]
        bad = sorted({t for t in (*self.attention, *self.mlp) if t not in menu})
        if bad:
            raise ConfigError(f"{self.runtime} has no weight type {', '.join(bad)} in this suite's menu",
                              f"choose each layer's type from {', '.join(menu)}")
        if self.head not in HEAD_MENUS[self.runtime]:
            raise ConfigError(f"the embedding / LM head cannot be {self.head} on {self.runtime}",
                              f"use one of {', '.join(HEAD_MENUS[self.runtime])} for the head")

    @classmethod
    def uniform(cls, runtime: str, kind: str, num_layers: int, head: str | None = None,
                block_size: int = 32) -> PrecisionMix:
        """Every layer at ``kind``; the head at ``head`` (default: ``default_head``)."""
        return cls(runtime, head or default_head(runtime, kind), (kind,) * num_layers, (kind,) * num_layers, block_size)

    @property
    def num_layers(self) -> int:
        return len(self.mlp)

    def uniform_type(self) -> str | None:
        """The one type of every layer and the head, or None for a real mix."""
        kinds = {self.head, *self.attention, *self.mlp}
        return kinds.pop() if len(kinds) == 1 else None

    def layer_type(self, i: int, part: str) -> str:
        """The type of kept layer ``i``'s projection ``part`` (q, k, v, o, gate, up, down)."""
        if part in ATTENTION:
            return self.attention[i]
        if part in MLP:
            return self.mlp[i]
        raise KeyError(part)

    def check_layers(self, num_layers: int) -> None:
        if self.num_layers != num_layers:
            raise ConfigError(f"the precision mix is for {self.num_layers} layers, the sub-network keeps {num_layers}",
                              "give one attention and one MLP type per kept layer")

    def to_dict(self) -> dict[str, Any]:
        return {"runtime": self.runtime, "head": self.head, "attention": list(self.attention), "mlp": list(self.mlp),
                "block_size": self.block_size}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PrecisionMix:
        return cls(d["runtime"], d["head"], tuple(d["attention"]), tuple(d["mlp"]), int(d.get("block_size", 32)))

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))

    def digest(self) -> str:
        return hashlib.sha256(self.to_json().encode()).hexdigest()[:12]

    def summary(self) -> str:
        """``q4_0`` for a uniform mix; else the head and the count of each type per part."""
        one = self.uniform_type()
        if one is not None:
            return one

        def counts(kinds: tuple[str, ...]) -> str:
            return "+".join(f"{n}x{k}" for k, n in sorted(Counter(kinds).items(), key=lambda kv: -kv[1]))

        return f"head {self.head}, attn {counts(self.attention)}, mlp {counts(self.mlp)}"

    def bytes_per_weight(self, kind: str) -> float:
        return int4_bytes(self.block_size) if kind == "int4" else BYTES_PER_WEIGHT[kind]
