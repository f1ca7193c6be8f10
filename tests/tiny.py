"""Tiny random Llama-family models built in the tests (seconds, no downloads)."""

from __future__ import annotations

from pathlib import Path

import torch


def make_tokenizer(out: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from subnets.textdata import stdlib_docstrings

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    text = stdlib_docstrings("calibration", min_chars=20_000).text
    tok.train_from_iterator([text[i : i + 1000] for i in range(0, len(text), 1000)], trainer=trainer)
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=None, eos_token=None).save_pretrained(out)


def make_tiny_model(
    out: Path,
    model_type: str = "llama",
    layers: int = 4,
    hidden: int = 48,
    heads: int = 6,
    kv_heads: int = 2,
    head_dim: int = 8,
    intermediate: int = 128,
    tie: bool = True,
    seed: int = 0,
) -> Path:
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(seed)
    cfg = AutoConfig.for_model(
        model_type,
        vocab_size=320,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        max_position_embeddings=512,
        tie_word_embeddings=tie,
        rms_norm_eps=1e-5,
    )
    model = AutoModelForCausalLM.from_config(cfg)
    # Random init with std 0.02 gives near-uniform logits; larger weights make the
    # units differ in importance, as in a trained model.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            else:
                p.normal_(0, 0.15)
    model.save_pretrained(out)
    make_tokenizer(out)
    return out
