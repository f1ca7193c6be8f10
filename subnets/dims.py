"""A base decoder's dimensions, read from its HF config: what the search space, the cost
model and the predictor's features are derived from."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class BaseDims:
    """The dimensions of a base decoder that the search space is derived from."""

    model_type: str
    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    tie_word_embeddings: bool
    attention_bias: bool = False
    mlp_bias: bool = False

    @property
    def heads_per_group(self) -> int:
        return self.num_heads // self.num_kv_heads

    @classmethod
    def from_hf_config(cls, cfg: Any) -> BaseDims:
        heads = int(cfg.num_attention_heads)
        kv = int(getattr(cfg, "num_key_value_heads", None) or heads)
        head_dim = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // heads)
        # Qwen2 has q/k/v biases (no o bias); it is modelled as Llama with attention bias.
        attention_bias = bool(getattr(cfg, "attention_bias", False)) or cfg.model_type == "qwen2"
        return cls(
            model_type=str(cfg.model_type),
            num_layers=int(cfg.num_hidden_layers),
            hidden_size=int(cfg.hidden_size),
            num_heads=heads,
            num_kv_heads=kv,
            head_dim=head_dim,
            intermediate_size=int(cfg.intermediate_size),
            vocab_size=int(cfg.vocab_size),
            tie_word_embeddings=bool(getattr(cfg, "tie_word_embeddings", False)),
            attention_bias=attention_bias,
            mlp_bias=bool(getattr(cfg, "mlp_bias", False)),
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> BaseDims:
        return cls(**d)
