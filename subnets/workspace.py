"""One place that turns a ``--model`` argument into a loaded base model, its importance and
its search space, so every command resolves them the same way."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from subnets.basemodel import BaseModel, load_base_model
from subnets.config import SubnetConfig
from subnets.extract import SubnetWeights, build_model, slice_weights
from subnets.importance import Importance, importance_for
from subnets.quality import EvalTokens, perplexity, tokenize
from subnets.reconstruct import Grams, grams_for, reconstruct
from subnets.space import SearchSpace
from subnets.textdata import Corpus, read_text_file, stdlib_docstrings


@dataclass
class Workspace:
    base: BaseModel
    importance: Importance
    space: SearchSpace
    _eval: EvalTokens | None = None
    eval_text: str | None = None
    eval_budget: int = 4096
    # the weight precision quality is measured at: a sub-network deployed as int4 is judged by
    # the int4 graph's arithmetic (subnets.quantize), not by its fp32 weights
    precision: str = "fp32"
    block_size: int = 32
    # refit each sub-network's output projections to the full model's outputs (subnets.reconstruct)
    reconstruct: bool = False
    _grams: Grams | None = None

    @classmethod
    def open(cls, model: str | os.PathLike[str] = "smollm2", neuron_step: int = 64,
             eval_text: str | None = None, eval_budget: int = 4096, reconstruct: bool = False) -> Workspace:
        base = load_base_model(model)
        # the statistics loaded now, so the workspace's copies (one per precision) share them
        return cls(base, importance_for(base), base.space(neuron_step), eval_text=eval_text, eval_budget=eval_budget,
                   reconstruct=reconstruct, _grams=grams_for(base) if reconstruct else None)

    def grams(self) -> Grams:
        if self._grams is None:
            self._grams = grams_for(self.base)
        return self._grams

    def eval_tokens(self) -> EvalTokens:
        if self._eval is None:
            corpus: Corpus = read_text_file(self.eval_text) if self.eval_text else stdlib_docstrings("heldout")
            self._eval = tokenize(corpus, self.base.tokenizer, budget=self.eval_budget, window=512)
        return self._eval

    def weights(self, config: SubnetConfig) -> SubnetWeights:
        self.space.validate(config)
        sliced = slice_weights(self.base, self.importance, config)
        return reconstruct(sliced, self.base, self.importance, self.grams()) if self.reconstruct else sliced

    def model(self, config: SubnetConfig) -> Any:
        """The sub-network in torch, computing what its graph at ``precision`` computes."""
        if self.precision == "fp32":
            return build_model(self.weights(config))
        from subnets.quantize import dequantized, emulate

        return emulate(build_model(dequantized(self.weights(config), self.precision, self.block_size)), self.precision)

    def quality_id(self) -> str:
        """What a sub-network's perplexity here depends on: the weights, which units the
        importance keeps, and the held-out tokens (text, tokenizer, count)."""
        import hashlib

        import numpy as np

        h = hashlib.sha256(f"{self.base.base_id}|{self.base.weights_id}".encode())
        if self.precision != "fp32":  # another precision is another quality question
            h.update(f"|{self.precision}|{self.block_size}".encode())
        if self.reconstruct:
            h.update(f"|reconstructed|{self.grams().digest()}".encode())
        for a in [*self.importance.neuron_scores, *self.importance.head_scores, self.importance.block_influence]:
            h.update(np.ascontiguousarray(a, dtype=np.float64).tobytes())
        h.update(self.eval_tokens().windows.numpy().tobytes())
        return h.hexdigest()[:16]

    def perplexity(self, config: SubnetConfig) -> float:
        return perplexity(self.model(config), self.eval_tokens())
