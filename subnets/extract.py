"""Extraction: a ``SubnetConfig`` becomes real, smaller weights, and from them a real
``transformers`` model that saves and reloads as an ordinary HF folder.

The weights are sliced once (``slice_weights``); both the HF model and the ONNX exporter are
built from the same ``SubnetWeights``, so what is profiled is what is deployed."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from subnets.config import SubnetConfig
from subnets.errors import ModelLoadError
from subnets.importance import Importance

HF_MODELING_DIR = Path(__file__).parent / "hf_modeling"
MODELING_FILES = ("configuration_edgenas_llama.py", "modeling_edgenas_llama.py")


@dataclass
class LayerWeights:
    """One kept layer; linear weights as [out, in] like ``nn.Linear``."""

    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    o: torch.Tensor
    gate: torch.Tensor
    up: torch.Tensor
    down: torch.Tensor
    input_norm: torch.Tensor
    post_norm: torch.Tensor
    q_bias: torch.Tensor | None = None
    k_bias: torch.Tensor | None = None
    v_bias: torch.Tensor | None = None
    o_bias: torch.Tensor | None = None


@dataclass
class SubnetWeights:
    config: SubnetConfig
    hf_config: Any  # the base model's transformers config
    embed: torch.Tensor
    final_norm: torch.Tensor
    lm_head: torch.Tensor | None  # None when tied to ``embed``
    layers: list[LayerWeights]
    inv_freq: torch.Tensor  # RoPE inverse frequencies [head_dim / 2]
    rope_scaling: float
    weights_id: str | None = None  # trained weights' identity (see BaseModel.weights_id)

    @property
    def head_dim(self) -> int:
        return int(self.inv_freq.numel() * 2)

    @property
    def hidden_size(self) -> int:
        return int(self.embed.shape[1])

    @property
    def rms_norm_eps(self) -> float:
        return float(self.hf_config.rms_norm_eps)


def _bias(lin: Any, idx: torch.Tensor | None = None) -> torch.Tensor | None:
    if getattr(lin, "bias", None) is None:
        return None
    b = lin.bias.detach()
    return b if idx is None else b.index_select(0, idx)


def slice_weights(base: Any, importance: Importance, config: SubnetConfig) -> SubnetWeights:
    """Keep, per ``config``, the most important layers' units of ``base`` (a ``BaseModel``)."""
    # Structural check only (any neuron count); the search space's step is the caller's.
    base.space(neuron_step=1).validate(config)
    dims = base.dims
    model = base.model
    hd = dims.head_dim
    out_layers = []
    for lc in config.layers:
        layer = model.model.layers[lc.layer]
        attn, mlp = layer.self_attn, layer.mlp
        groups, heads = importance.kept_heads(lc.layer, lc.kv_groups, lc.heads_per_group, dims.num_kv_heads)
        q_rows = torch.as_tensor((heads[:, None] * hd + torch.arange(hd).numpy()[None, :]).reshape(-1))
        kv_rows = torch.as_tensor((groups[:, None] * hd + torch.arange(hd).numpy()[None, :]).reshape(-1))
        neurons = torch.as_tensor(importance.kept_neurons(lc.layer, lc.neurons))
        o_bias = _bias(attn.o_proj)
        if o_bias is None and dims.attention_bias:
            o_bias = torch.zeros(dims.hidden_size)  # Qwen2: q/k/v biases, none on o
        out_layers.append(
            LayerWeights(
                num_heads=lc.num_heads,
                num_kv_heads=lc.kv_groups,
                intermediate_size=lc.neurons,
                q=attn.q_proj.weight.detach().index_select(0, q_rows),
                k=attn.k_proj.weight.detach().index_select(0, kv_rows),
                v=attn.v_proj.weight.detach().index_select(0, kv_rows),
                o=attn.o_proj.weight.detach().index_select(1, q_rows),
                gate=mlp.gate_proj.weight.detach().index_select(0, neurons),
                up=mlp.up_proj.weight.detach().index_select(0, neurons),
                down=mlp.down_proj.weight.detach().index_select(1, neurons),
                input_norm=layer.input_layernorm.weight.detach(),
                post_norm=layer.post_attention_layernorm.weight.detach(),
                q_bias=_bias(attn.q_proj, q_rows),
                k_bias=_bias(attn.k_proj, kv_rows),
                v_bias=_bias(attn.v_proj, kv_rows),
                o_bias=o_bias,
            )
        )
    rot = model.model.rotary_emb
    embed = model.model.embed_tokens.weight.detach()
    lm = model.lm_head.weight.detach()
    return SubnetWeights(
        config=config,
        hf_config=model.config,
        embed=embed,
        final_norm=model.model.norm.weight.detach(),
        lm_head=None if lm.data_ptr() == embed.data_ptr() else lm,
        layers=out_layers,
        inv_freq=rot.inv_freq.detach().float(),
        rope_scaling=float(getattr(rot, "attention_scaling", 1.0)),
        weights_id=getattr(base, "weights_id", None),
    )


def weights_of_model(model: Any, config: SubnetConfig, weights_id: str | None = None) -> SubnetWeights:
    """The ``SubnetWeights`` of an already extracted (and perhaps fine-tuned) dense model, so
    it exports to ONNX like a fresh slice of the base model."""
    layers = []
    for layer in model.model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        hd = attn.head_dim
        layers.append(LayerWeights(
            num_heads=attn.q_proj.weight.shape[0] // hd, num_kv_heads=attn.k_proj.weight.shape[0] // hd,
            intermediate_size=mlp.gate_proj.weight.shape[0],
            q=attn.q_proj.weight.detach(), k=attn.k_proj.weight.detach(), v=attn.v_proj.weight.detach(),
            o=attn.o_proj.weight.detach(), gate=mlp.gate_proj.weight.detach(), up=mlp.up_proj.weight.detach(),
            down=mlp.down_proj.weight.detach(), input_norm=layer.input_layernorm.weight.detach(),
            post_norm=layer.post_attention_layernorm.weight.detach(),
            q_bias=_bias(attn.q_proj), k_bias=_bias(attn.k_proj), v_bias=_bias(attn.v_proj), o_bias=_bias(attn.o_proj)))
    rot = model.model.rotary_emb
    embed = model.model.embed_tokens.weight.detach()
    lm = model.lm_head.weight.detach()
    return SubnetWeights(config=config, hf_config=model.config, embed=embed, final_norm=model.model.norm.weight.detach(),
                         lm_head=None if lm.data_ptr() == embed.data_ptr() else lm, layers=layers,
                         inv_freq=rot.inv_freq.detach().float(),
                         rope_scaling=float(getattr(rot, "attention_scaling", 1.0)), weights_id=weights_id)


def _hf_config_for(w: SubnetWeights) -> Any:
    from transformers import LlamaConfig

    from subnets.hf_modeling.configuration_edgenas_llama import EdgenasLlamaConfig

    base = w.hf_config
    bias = any(lw.q_bias is not None for lw in w.layers) or bool(getattr(base, "attention_bias", False))
    L = len(w.layers)
    first = w.layers[0]
    common = dict(
        vocab_size=int(base.vocab_size),
        hidden_size=w.hidden_size,
        intermediate_size=first.intermediate_size,
        num_hidden_layers=L,
        num_attention_heads=first.num_heads,
        num_key_value_heads=first.num_kv_heads,
        head_dim=w.head_dim,
        hidden_act=base.hidden_act,
        max_position_embeddings=int(base.max_position_embeddings),
        rms_norm_eps=float(base.rms_norm_eps),
        tie_word_embeddings=w.lm_head is None,
        rope_parameters=dict(base.rope_parameters) if base.rope_parameters else None,
        attention_bias=bias,
        mlp_bias=bool(getattr(base, "mlp_bias", False)),
        bos_token_id=base.bos_token_id,
        eos_token_id=base.eos_token_id,
        pad_token_id=base.pad_token_id,
    )
    uniform = len({(lw.num_heads, lw.num_kv_heads, lw.intermediate_size) for lw in w.layers}) == 1
    if uniform and w.hidden_size % first.num_heads == 0:
        return LlamaConfig(**common)
    # Per-layer sizes (or a head count that does not divide hidden_size, which LlamaConfig
    # refuses) need the heterogeneous-layer config.
    return EdgenasLlamaConfig(
        **common,
        layer_num_attention_heads=[lw.num_heads for lw in w.layers],
        layer_num_key_value_heads=[lw.num_kv_heads for lw in w.layers],
        layer_intermediate_sizes=[lw.intermediate_size for lw in w.layers],
    )


def state_dict_of(w: SubnetWeights) -> dict[str, torch.Tensor]:
    sd: dict[str, torch.Tensor] = {"model.embed_tokens.weight": w.embed, "model.norm.weight": w.final_norm}
    sd["lm_head.weight"] = w.embed if w.lm_head is None else w.lm_head
    for i, lw in enumerate(w.layers):
        p = f"model.layers.{i}."
        for name, t in (("self_attn.q_proj", lw.q), ("self_attn.k_proj", lw.k), ("self_attn.v_proj", lw.v),
                        ("self_attn.o_proj", lw.o), ("mlp.gate_proj", lw.gate), ("mlp.up_proj", lw.up),
                        ("mlp.down_proj", lw.down)):
            sd[p + name + ".weight"] = t
        for name, b in (("self_attn.q_proj", lw.q_bias), ("self_attn.k_proj", lw.k_bias),
                        ("self_attn.v_proj", lw.v_bias), ("self_attn.o_proj", lw.o_bias)):
            if b is not None:
                sd[p + name + ".bias"] = b
        sd[p + "input_layernorm.weight"] = lw.input_norm
        sd[p + "post_attention_layernorm.weight"] = lw.post_norm
    return sd


def build_model(w: SubnetWeights) -> Any:
    """A real ``transformers`` causal LM holding the sliced weights (float32, eval mode)."""
    from transformers import LlamaForCausalLM

    from subnets.hf_modeling.modeling_edgenas_llama import EdgenasLlamaForCausalLM

    cfg = _hf_config_for(w)
    cfg._attn_implementation = "eager"
    cls = EdgenasLlamaForCausalLM if cfg.model_type == "edgenas_llama" else LlamaForCausalLM
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # older transformers
        from transformers.modeling_utils import no_init_weights
    with no_init_weights():  # every weight is overwritten below; random init cost ~1 s
        model = cls(cfg)
    missing, unexpected = model.load_state_dict(state_dict_of(w), strict=False)
    missing = [k for k in missing if not (k == "lm_head.weight" and cfg.tie_word_embeddings)]
    if missing or unexpected:  # a bug in slicing, not a user error
        raise RuntimeError(f"state dict mismatch: missing {missing}, unexpected {unexpected}")
    if cfg.tie_word_embeddings:
        model.tie_weights()
    return model.eval()


def extract(base: Any, importance: Importance, config: SubnetConfig) -> Any:
    return build_model(slice_weights(base, importance, config))


def save_subnet(model: Any, out: Path, config: SubnetConfig, tokenizer: Any | None = None) -> Path:
    """Save as an HF folder: a uniform sub-network is a plain Llama folder; a per-layer one
    carries its modelling code (``trust_remote_code``)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if model.config.model_type == "edgenas_llama":
        model.config.auto_map = {
            "AutoConfig": "configuration_edgenas_llama.EdgenasLlamaConfig",
            "AutoModelForCausalLM": "modeling_edgenas_llama.EdgenasLlamaForCausalLM",
        }
        for f in MODELING_FILES:
            shutil.copy(HF_MODELING_DIR / f, out / f)
    model.save_pretrained(out)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    (out / "edgenas_subnet.json").write_text(json.dumps(config.to_dict(), indent=1))
    return out


def load_subnet(path: Path) -> Any:
    """Load a saved sub-network folder without remote code (the classes are edgenas's own)."""
    import torch
    from transformers import AutoModelForCausalLM

    from subnets.hf_modeling.modeling_edgenas_llama import EdgenasLlamaForCausalLM

    path = Path(path)
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise ModelLoadError(f"{path} is not a saved sub-network (no config.json)", "pass the folder `edgenas export` wrote")
    mtype = json.loads(cfg_file.read_text()).get("model_type")
    if mtype == "edgenas_llama":
        model = EdgenasLlamaForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager")
    else:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager")
    return model.eval()
