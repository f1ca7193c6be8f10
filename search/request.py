"""What a search is asked: one frozen request, validated before any model loads. The command
line, the main job, the Python API and the search workers build it and call
``search.run.search`` with it."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from export.quantize import BLOCK_SIZES, LLAMA_CPP_PRECISIONS
from export.quantize import PRECISIONS as ONNX_PRECISIONS
from profiler.database import Location
from subnets.errors import EdgenasError
from subnets.space import DEFAULT_GRANULARITY, GRANULARITIES

ALGORITHMS = ("nsga2", "random", "local")
PRECISIONS = (*ONNX_PRECISIONS, *LLAMA_CPP_PRECISIONS)


class SearchError(EdgenasError):
    """A search that cannot run as asked."""


def _positive(name: str, value: float, fix: str) -> None:
    if not value > 0:
        raise SearchError(f"{name} {value} is not positive", fix)


def parse_ceiling(text: str | None, full_ppl: float) -> float:
    """``--max-perplexity``: a perplexity, or ``Rx`` for R times the full model's."""
    if text is None:
        return math.inf
    t = str(text).strip().lower()
    try:
        value = float(t[:-1]) * full_ppl if t.endswith("x") else float(t)
    except ValueError:
        raise SearchError(f"--max-perplexity {text!r} is neither a perplexity nor a multiple like 3x",
                          "e.g. --max-perplexity 60, or --max-perplexity 3x (three times the full model's)") from None
    if not value > 0:
        raise SearchError(f"--max-perplexity {text!r} is not positive", "e.g. --max-perplexity 3x")
    return value


def check_precisions(text: str) -> tuple[str, ...]:
    """``--precision``: distinct known precisions, comma-separated."""
    names = tuple(str(text).split(","))
    bad = [p for p in names if p not in PRECISIONS]
    if bad or len(set(names)) != len(names):
        raise SearchError(f"--precision {text!r}: give distinct precisions from {', '.join(PRECISIONS)}, "
                          "comma-separated", "e.g. --precision int4, or --precision q8_0,q4_0")
    return names


@dataclass(frozen=True)
class SearchRequest:
    """A latency-constrained search: perplexity x predicted workload latency under a budget
    on the predictor's upper bound. Field names are the command's flags."""

    device: str
    predictor: tuple[Path, ...]
    latency_budget_ms: float
    workload: str = "128,64"
    algorithm: str = "nsga2"
    evals: int = 100
    granularity: str = DEFAULT_GRANULARITY
    reconstruct: bool = False
    max_params: float | None = None
    max_perplexity: str | None = None
    verify: int = 0
    host: str | None = None
    db: Location = Path("runs/measurements.db")
    out: Path = Path("runs/search")
    storage: str | None = None
    study_name: str | None = None
    workers: int = 1
    model: str = "smollm2"
    neuron_step: int = 64
    seed: int = 0
    quality_tokens: int = 1024
    text: str | None = None
    supernet: Path | None = None
    precision: str = "fp32"
    block_size: int = 32
    no_baselines: bool = False
    override: bool = False

    def __post_init__(self) -> None:
        from predictor.workload import Workload

        preds = (self.predictor,) if isinstance(self.predictor, (str, Path)) else tuple(self.predictor)
        object.__setattr__(self, "predictor", tuple(Path(p) for p in preds))
        object.__setattr__(self, "out", Path(self.out))
        Workload.parse(self.workload)
        _positive("--evals", self.evals, "ask for at least 1 evaluation")
        _positive("--latency-budget-ms", self.latency_budget_ms, "give a budget in milliseconds")
        _positive("--workers", self.workers, "pass --workers 1 or more")
        _positive("--quality-tokens", self.quality_tokens, "pass --quality-tokens 256 or more")
        if self.verify < 0:
            raise SearchError(f"--verify {self.verify} is negative", "pass --verify 0 (none) or more")
        if self.algorithm not in ALGORITHMS:
            raise SearchError(f"unknown algorithm {self.algorithm!r}", f"use one of {', '.join(ALGORITHMS)}")
        if self.granularity not in GRANULARITIES:
            raise SearchError(f"unknown granularity {self.granularity!r}", f"use one of {', '.join(GRANULARITIES)}")
        if self.block_size not in BLOCK_SIZES:
            raise SearchError(f"--block-size {self.block_size} is not one MatMulNBits takes",
                              f"use one of {', '.join(map(str, BLOCK_SIZES))}")
        if self.max_params is not None:
            _positive("--max-params", self.max_params, "give a parameter count, or leave --max-params out")
        check_precisions(self.precision)
        parse_ceiling(self.max_perplexity, 1.0)  # its syntax, before the model loads

    @property
    def precisions(self) -> tuple[str, ...]:
        return tuple(self.precision.split(","))

    @property
    def verify_host(self) -> str:
        return self.host or self.device

    @property
    def params_limit(self) -> float:
        return self.max_params if self.max_params else math.inf
