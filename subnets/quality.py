"""Quality of a (sub-)network: deterministic perplexity on a fixed token budget."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from subnets.errors import InputFileError
from subnets.textdata import Corpus


@dataclass(frozen=True)
class EvalTokens:
    """The token windows a perplexity is computed on, and where they came from."""

    corpus: str
    corpus_sha256: str
    windows: torch.Tensor  # [n_windows, window] int64

    @property
    def num_tokens(self) -> int:
        return int(self.windows.numel())


def tokenize(corpus: Corpus, tokenizer: Any, budget: int = 4096, window: int = 512) -> EvalTokens:
    """The first ``budget`` tokens of ``corpus`` in non-overlapping windows of ``window``."""
    if tokenizer is None:
        raise InputFileError(
            "the base model has no tokenizer, so text cannot be turned into tokens",
            "save the tokenizer into the model folder (tokenizer.save_pretrained(folder))",
        )
    ids = tokenizer(corpus.text, add_special_tokens=False)["input_ids"]
    window = min(window, budget)
    n = min(budget, len(ids)) // window
    if n == 0:
        raise InputFileError(
            f"{corpus.name} has {len(ids)} tokens, fewer than one window of {window}",
            "give a longer text, or a smaller --window",
        )
    t = torch.tensor(ids[: n * window], dtype=torch.int64).view(n, window)
    return EvalTokens(corpus.name, corpus.sha256, t)


@torch.inference_mode()
def perplexity(model: Any, tokens: EvalTokens, batch_size: int = 4) -> float:
    """exp(mean next-token negative log-likelihood) over all windows; each window is scored
    independently (no context carried across windows), in a fixed order."""
    model.eval()
    total_nll = 0.0
    count = 0
    for i in range(0, tokens.windows.shape[0], batch_size):
        batch = tokens.windows[i : i + batch_size]
        logits = model(input_ids=batch, use_cache=False).logits.float()
        nll = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="sum"
        )
        total_nll += float(nll)
        count += batch[:, 1:].numel()
    return math.exp(total_nll / count)
