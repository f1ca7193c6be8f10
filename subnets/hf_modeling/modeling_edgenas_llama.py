"""A Llama decoder whose layers differ in heads, KV heads and MLP width
(written by edgenas; it needs only transformers)."""

from __future__ import annotations

from transformers import LlamaForCausalLM
from transformers.models.llama.modeling_llama import LlamaDecoderLayer

from .configuration_edgenas_llama import EdgenasLlamaConfig


class EdgenasLlamaForCausalLM(LlamaForCausalLM):
    config_class = EdgenasLlamaConfig

    def __init__(self, config: EdgenasLlamaConfig):
        super().__init__(config)
        # Each layer is built from a copy of the config carrying that layer's sizes; the
        # layer index stays the position in this model, which is what the KV cache uses.
        for i in range(config.num_hidden_layers):
            self.model.layers[i] = LlamaDecoderLayer(config.layer_config(i), i)
        self.post_init()


__all__ = ["EdgenasLlamaForCausalLM"]
