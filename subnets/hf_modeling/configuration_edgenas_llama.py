"""Config of a Llama decoder whose layers differ in heads, KV heads and MLP width
(written by edgenas; it needs only transformers)."""

from __future__ import annotations

import copy

from huggingface_hub.dataclasses import strict
from transformers import LlamaConfig


@strict
class EdgenasLlamaConfig(LlamaConfig):
    model_type = "edgenas_llama"
    layer_num_attention_heads: list[int] | None = None
    layer_num_key_value_heads: list[int] | None = None
    layer_intermediate_sizes: list[int] | None = None

    def validate_architecture(self):
        # Query heads need not divide hidden_size: head_dim is set explicitly.
        lists = (self.layer_num_attention_heads, self.layer_num_key_value_heads, self.layer_intermediate_sizes)
        for lst in lists:
            if lst is not None and len(lst) != self.num_hidden_layers:
                raise ValueError(
                    f"per-layer list has {len(lst)} entries for {self.num_hidden_layers} layers"
                )
        if self.layer_num_attention_heads and self.layer_num_key_value_heads:
            for i, (h, g) in enumerate(zip(self.layer_num_attention_heads, self.layer_num_key_value_heads)):
                if h % g:
                    raise ValueError(f"layer {i}: {h} query heads is not a multiple of {g} KV heads")

    def layer_config(self, i: int) -> LlamaConfig:
        """A config with layer ``i``'s sizes, for building that layer's modules."""
        c = copy.deepcopy(self)
        if self.layer_num_attention_heads:
            c.num_attention_heads = self.layer_num_attention_heads[i]
        if self.layer_num_key_value_heads:
            c.num_key_value_heads = self.layer_num_key_value_heads[i]
        if self.layer_intermediate_sizes:
            c.intermediate_size = self.layer_intermediate_sizes[i]
        return c
