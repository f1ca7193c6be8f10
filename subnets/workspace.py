"""One place that turns a ``--model`` argument into a loaded base model, its importance and
its search space, so every command resolves them the same way.

A ``Workspace`` is a value: the loaded model and its statistics are shared by every view of
it, and a view for another precision, reconstruction setting or held-out text is derived
explicitly (``at_precision``, ``reconstructing``, ``evaluated_on``) and keeps everything it
does not change."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any, Protocol

from subnets.basemodel import BaseModel, load_base_model
from subnets.config import SubnetConfig
from subnets.extract import SubnetWeights, build_model, slice_weights
from subnets.importance import Importance, importance_for
from subnets.quality import EvalTokens, perplexity, tokenize
from subnets.reconstruct import Grams, grams_for, reconstruct
from subnets.space import SearchSpace
from subnets.textdata import Corpus, read_text_file, stdlib_docstrings


class Arithmetic(Protocol):
    """What a deployed precision computes, for the quality objective: the core does not
    know the precisions (``export.quantize.Precision`` does); it asks for the model."""

    name: str
    block_size: int

    @property
    def identity(self) -> str: ...

    def model(self, weights: SubnetWeights) -> Any: ...


class Statistics:
    """What a workspace computes once and every view of it shares: the held-out tokens (per
    text and budget) and the reconstruction's Gram matrices."""

    def __init__(self, grams: Grams | None = None) -> None:
        self.tokens: dict[tuple[str | None, int], EvalTokens] = {}
        self.grams = grams


@dataclass(frozen=True)
class Workspace:
    base: BaseModel
    importance: Importance
    space: SearchSpace
    eval_text: str | None = None
    eval_budget: int = 4096
    # the arithmetic quality is judged with: a sub-network deployed as int4 is judged by the
    # int4 graph's arithmetic, not by its fp32 weights; None is fp32 as the weights are
    arithmetic: Arithmetic | None = None
    # refit each sub-network's output projections to the full model's outputs (subnets.reconstruct)
    reconstruct: bool = False
    stats: Statistics = field(default_factory=Statistics, compare=False, repr=False)

    @classmethod
    def open(cls, model: str | os.PathLike[str] = "smollm2", neuron_step: int = 64,
             eval_text: str | None = None, eval_budget: int = 4096, reconstruct: bool = False) -> Workspace:
        base = load_base_model(model)
        return cls(base, importance_for(base), base.space(neuron_step), eval_text=eval_text, eval_budget=eval_budget,
                   reconstruct=reconstruct, stats=Statistics(grams_for(base) if reconstruct else None))

    # -- views ------------------------------------------------------------------------
    def at_precision(self, arithmetic: Arithmetic | None) -> Workspace:
        """The same workspace judging quality with ``arithmetic`` (None: fp32)."""
        if arithmetic is not None and arithmetic.name == "fp32":
            arithmetic = None
        return dataclasses.replace(self, arithmetic=arithmetic)

    def reconstructing(self, on: bool = True, grams: Grams | None = None) -> Workspace:
        """The same workspace with the output projections refitted (or not); ``grams``:
        statistics already collected for this base model."""
        if grams is not None:
            self.stats.grams = grams
        return dataclasses.replace(self, reconstruct=on)

    def evaluated_on(self, text: str | None, budget: int) -> Workspace:
        """The same workspace measuring perplexity on ``budget`` tokens of ``text``."""
        return dataclasses.replace(self, eval_text=text, eval_budget=budget)

    # -- what it computes -------------------------------------------------------------
    @property
    def precision(self) -> str:
        return self.arithmetic.name if self.arithmetic is not None else "fp32"

    @property
    def block_size(self) -> int:
        return self.arithmetic.block_size if self.arithmetic is not None else 32

    def grams(self) -> Grams:
        if self.stats.grams is None:
            self.stats.grams = grams_for(self.base)
        return self.stats.grams

    def eval_tokens(self) -> EvalTokens:
        key = (self.eval_text, self.eval_budget)
        if key not in self.stats.tokens:
            corpus: Corpus = read_text_file(self.eval_text) if self.eval_text else stdlib_docstrings("heldout")
            self.stats.tokens[key] = tokenize(corpus, self.base.tokenizer, budget=self.eval_budget, window=512)
        return self.stats.tokens[key]

    def weights(self, config: SubnetConfig) -> SubnetWeights:
        self.space.validate(config)
        sliced = slice_weights(self.base, self.importance, config)
        return reconstruct(sliced, self.base, self.importance, self.grams()) if self.reconstruct else sliced

    def model(self, config: SubnetConfig) -> Any:
        """The sub-network in torch, computing what its deployed graph computes."""
        w = self.weights(config)
        return build_model(w) if self.arithmetic is None else self.arithmetic.model(w)

    def quality_id(self) -> str:
        """What a sub-network's perplexity here depends on: the weights, which units the
        importance keeps, and the held-out tokens (text, tokenizer, count)."""
        import hashlib

        import numpy as np

        h = hashlib.sha256(f"{self.base.base_id}|{self.base.weights_id}".encode())
        if self.arithmetic is not None:  # another precision is another quality question
            h.update(f"|{self.arithmetic.identity}".encode())
        if self.reconstruct:
            h.update(f"|reconstructed|{self.grams().digest()}".encode())
        for a in [*self.importance.neuron_scores, *self.importance.head_scores, self.importance.block_influence]:
            h.update(np.ascontiguousarray(a, dtype=np.float64).tobytes())
        h.update(self.eval_tokens().windows.numpy().tobytes())
        return h.hexdigest()[:16]

    def perplexity(self, config: SubnetConfig) -> float:
        return perplexity(self.model(config), self.eval_tokens())
