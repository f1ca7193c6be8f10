"""Sub-networks as GGUF files for llama.cpp.

A sub-network keeps a different number of query heads, KV heads and MLP neurons in each
layer. llama.cpp's ``llama`` architecture assumes one size for all layers; its ``deci``
architecture (the Llama variant made for NAS-derived models such as Nemotron-51B) reads the
head, KV-head and feed-forward counts as per-layer arrays and is otherwise the Llama graph:
RMSNorm, RoPE (adjacent-pair layout, so Q and K rows are permuted as llama.cpp's own
converter does), SwiGLU. Every sub-network is written as ``deci``; llama.cpp loads it since
build b4350 (December 2024).

Weights are F32, F16, Q8_0 or Q4_0 (quantized in numpy by the ``gguf`` package, the same
block formats llama.cpp's quantizer writes; every 2-D weight at the chosen type, as
``llama-quantize --pure`` does, and 1-D norms in F32). A weight whose rows do not split into
32-value blocks stays F16. The tokenizer is written from the Hugging Face tokenizer the suite
uses for perplexity, so llama.cpp and torch see the same tokens.

Like ONNX exports, a GGUF export can carry no weights (``weights="none"``): then only the
header (metadata and tensor table) is written, and the board fills the tensors with seeded
stand-in values of each tensor's type (a latency does not depend on the values)."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from export.artifact import MANIFEST, ExportedSubnet, TensorRecord
from export.quantize import (  # llama.cpp's names for the weight types written
    GGUF_PRESETS,
    gguf_qtype,
    stored_type,
)
from export.quantize import GGUF_TYPES as GGUF_PRECISIONS
from subnets.errors import ConfigError
from subnets.extract import SubnetWeights
from subnets.paths import sha256_file

log = logging.getLogger(__name__)

GGUF_EXPORTER_VERSION = 1
ARCH = "deci"
GGUF_FILE = "model.gguf"
HEADER_FILE = "header.gguf"


@dataclass
class GgufOptions:
    precision: str = "f16"
    weights: str = "real"  # "real" | "none" (header only; the board fills the tensors)
    # what the sweep's protocol record reads from any export's options
    opset: int | None = None
    ir_version: int | None = None
    # per-tensor types (export.mix.PrecisionMix of runtime llama.cpp); None: every 2-D weight
    # at ``precision``
    mix: Any = None

    def validate(self) -> None:
        if self.mix is not None and self.mix.runtime != "llama.cpp":
            raise ConfigError(f"a GGUF file cannot carry an {self.mix.runtime} precision mix",
                              "give a llama.cpp mix (types f16, q8_0, q5_1, q5_0, q4_1, q4_0)")
        if self.precision in GGUF_PRESETS:
            if self.mix is not None or self.weights != "real":
                raise ConfigError(f"the {self.precision} preset is a whole file written by llama-quantize",
                                  "export it with real weights (--weights real) and no --mix")
        elif self.precision not in GGUF_PRECISIONS:
            raise ConfigError(f"GGUF type {self.precision!r} is not one this exporter writes",
                              f"pass --precision {' or '.join((*GGUF_PRECISIONS, *GGUF_PRESETS))} with --backend llama.cpp")
        if self.weights not in ("real", "none"):
            raise ConfigError(f"weights {self.weights!r} is neither 'real' nor 'none'", "pass --weights real or none")


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """HF's rotate-half RoPE layout to llama.cpp's adjacent pairs (convert_hf_to_gguf's permute)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _f32(t: torch.Tensor) -> np.ndarray:
    return t.detach().to(torch.float32).contiguous().numpy()


def tensor_plan(w: SubnetWeights) -> list[tuple[str, np.ndarray]]:
    """Every tensor of the GGUF file by llama.cpp's name, float32, [out, in] like nn.Linear."""
    if any(b is not None for lw in w.layers for b in (lw.q_bias, lw.k_bias, lw.v_bias)):
        raise ConfigError("this base model has attention biases (Qwen2-style), which llama.cpp's per-layer "
                          "architecture does not read", "profile it with an onnxruntime back-end (--backend ort-cpu)")
    plan = [("token_embd.weight", _f32(w.embed)), ("output_norm.weight", _f32(w.final_norm))]
    if w.lm_head is not None:
        plan.append(("output.weight", _f32(w.lm_head)))
    factors = _rope_factors(w)
    if factors is not None:
        plan.append(("rope_freqs.weight", factors))
    for i, lw in enumerate(w.layers):
        p = f"blk.{i}."
        plan += [(p + "attn_norm.weight", _f32(lw.input_norm)),
                 (p + "attn_q.weight", _permute(_f32(lw.q), lw.num_heads)),
                 (p + "attn_k.weight", _permute(_f32(lw.k), lw.num_kv_heads)),
                 (p + "attn_v.weight", _f32(lw.v)),
                 (p + "attn_output.weight", _f32(lw.o)),
                 (p + "ffn_norm.weight", _f32(lw.post_norm)),
                 (p + "ffn_gate.weight", _f32(lw.gate)),
                 (p + "ffn_up.weight", _f32(lw.up)),
                 (p + "ffn_down.weight", _f32(lw.down))]
        if lw.o_bias is not None:
            plan.append((p + "attn_output.bias", _f32(lw.o_bias)))
    return plan


def _rope_theta(w: SubnetWeights) -> float:
    cfg = w.hf_config
    theta = getattr(cfg, "rope_theta", None)
    if theta is None:  # transformers 5 keeps it in rope_parameters
        theta = (getattr(cfg, "rope_parameters", None) or {}).get("rope_theta", 10000.0)
    return float(theta)


def _rope_factors(w: SubnetWeights) -> np.ndarray | None:
    """llama.cpp's per-frequency divisors (``rope_freqs``) for a scaled RoPE such as Llama 3's;
    None when the inverse frequencies are the plain ones."""
    d = w.head_dim
    plain = 1.0 / (_rope_theta(w) ** (np.arange(0, d, 2, dtype=np.float64) / d))
    factors = plain / w.inv_freq.double().numpy()
    if np.allclose(factors, 1.0, rtol=1e-5):
        return None
    return factors.astype(np.float32)


def _encode(arr: np.ndarray, kind: str) -> np.ndarray:
    import gguf

    if kind == "f32":
        return arr.astype(np.float32)
    if kind == "f16":
        return arr.astype(np.float16)
    return gguf.quants.quantize(arr.astype(np.float32), gguf_qtype(kind))


def _nbytes(shape: tuple[int, ...], kind: str) -> int:
    import gguf

    block, size = gguf.GGML_QUANT_SIZES[gguf_qtype(kind)]
    return int(np.prod(shape[:-1], dtype=np.int64)) * (shape[-1] // block) * size


def _kv(writer: Any, w: SubnetWeights, precision: str, tokenizer_dir: Path | None) -> None:
    import gguf

    cfg = w.hf_config
    writer.add_name(f"edgenas sub-network {w.config.config_hash()}")
    # the file's "mostly" type: informational (llama-bench prints it); a mix names its most common
    writer.add_file_type({"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                          "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0, "q5_1": gguf.LlamaFileType.MOSTLY_Q5_1,
                          "q5_0": gguf.LlamaFileType.MOSTLY_Q5_0, "q4_1": gguf.LlamaFileType.MOSTLY_Q4_1,
                          "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0}[precision])
    writer.add_context_length(int(getattr(cfg, "max_position_embeddings", 2048)))
    writer.add_embedding_length(w.hidden_size)
    writer.add_block_count(len(w.layers))
    writer.add_feed_forward_length([lw.intermediate_size for lw in w.layers])
    writer.add_head_count([lw.num_heads for lw in w.layers])
    writer.add_head_count_kv([lw.num_kv_heads for lw in w.layers])
    writer.add_key_length(w.head_dim)
    writer.add_value_length(w.head_dim)
    writer.add_rope_dimension_count(w.head_dim)
    writer.add_rope_freq_base(_rope_theta(w))
    writer.add_layer_norm_rms_eps(w.rms_norm_eps)
    writer.add_vocab_size(int(w.embed.shape[0]))
    if tokenizer_dir is not None:
        _tokenizer_kv(writer, tokenizer_dir, int(w.embed.shape[0]))


def _tokenizer_kv(writer: Any, folder: Path, vocab_size: int) -> None:
    """The HF tokenizer in ``folder`` as GGUF metadata (byte-level BPE, as Llama-3, SmolLM and
    Qwen use; SentencePiece tokenizers through the gguf package's readers too)."""
    import gguf
    from gguf.vocab import BpeVocab, LlamaHfVocab, SentencePieceVocab, SpecialVocab

    vocab: Any = None
    for cls in (BpeVocab, LlamaHfVocab, SentencePieceVocab):
        try:
            vocab = cls(folder)
            break
        except Exception:  # each reader raises its own kind when the files are not its format
            continue
    if vocab is None:
        raise ConfigError(f"the tokenizer in {folder} is neither byte-level BPE nor SentencePiece",
                          "export with --weights none for latency only (llama-bench needs no tokenizer)")
    tokens, scores, types = [], [], []
    for text, score, ttype in vocab.all_tokens():
        tokens.append(text)
        scores.append(score)
        types.append(ttype)
    for i in range(len(tokens), vocab_size):  # the embedding may be padded past the vocabulary
        tokens.append(f"[PAD{i}]".encode())
        scores.append(-1000.0)
        types.append(gguf.TokenType.UNUSED)
    writer.add_tokenizer_model(vocab.tokenizer_model)
    if vocab.tokenizer_model == "gpt2":
        writer.add_tokenizer_pre(_pre_tokenizer(folder))
    writer.add_token_list(tokens[:vocab_size])
    writer.add_token_scores(scores[:vocab_size])
    writer.add_token_types(types[:vocab_size])
    special = SpecialVocab(folder, load_merges=vocab.tokenizer_model == "gpt2", n_vocab=vocab_size)
    special.add_to_gguf(writer, quiet=True)
    writer.add_add_bos_token(_adds_bos(folder))


def _pre_tokenizer(folder: Path) -> str:
    """llama.cpp's pre-tokenizer name for a byte-level BPE tokenizer: GPT-2's regex split is
    the ByteLevel pre-tokenizer's own; others fall back to llama.cpp's default (it warns)."""
    try:
        pre = json.loads((folder / "tokenizer.json").read_text()).get("pre_tokenizer") or {}
    except (OSError, json.JSONDecodeError):
        return "default"
    if pre.get("type") == "ByteLevel" and pre.get("use_regex", True):
        return "gpt-2"
    log.warning("tokenizer in %s splits text its own way (%s); llama.cpp will use its default split",
                folder, pre.get("type"))
    return "default"


def _adds_bos(folder: Path) -> bool:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(folder))
    ids = tok("a").input_ids
    return bool(tok.bos_token_id is not None and ids and ids[0] == tok.bos_token_id)


# llama.cpp tensor name suffix -> the mix's tensor group
_GROUPS = {"attn_q": "q", "attn_k": "k", "attn_v": "v", "attn_output": "o", "ffn_gate": "gate", "ffn_up": "up",
           "ffn_down": "down"}


def tensor_type(name: str, arr: np.ndarray, options: GgufOptions) -> str:
    """The GGUF type tensor ``name`` is written as: the mix's type of its group (the
    embedding / LM head, or a layer's attention or MLP), else ``options.precision``; 1-D
    tensors F32, and a block type falls back to F16 where rows do not split into blocks."""
    mix = options.mix
    if mix is None or arr.ndim == 1:
        return stored_type(name, arr, options.precision)
    if name.startswith(("token_embd.", "output.")):
        return stored_type(name, arr, mix.head)
    parts = name.split(".")  # blk.<i>.<group>.weight
    return stored_type(name, arr, mix.layer_type(int(parts[1]), _GROUPS[parts[2]]))


def file_type(options: GgufOptions) -> str:
    if options.mix is None:
        return options.precision
    from collections import Counter

    return Counter((*options.mix.mlp, *options.mix.attention)).most_common(1)[0][0]


def gguf_key(w: SubnetWeights, options: GgufOptions) -> str:
    ident = {"gguf_exporter": GGUF_EXPORTER_VERSION, "config": w.config.to_dict(), "precision": options.precision,
             "weights": options.weights}
    if options.precision in GGUF_PRESETS:  # upstream's quantizer decides the file
        from export.llama_cpp_tools import LLAMA_CPP_BUILD

        ident["llama.cpp"] = LLAMA_CPP_BUILD
    if options.mix is not None:
        ident["mix"] = options.mix.to_dict()
    if w.weights_id is not None and options.weights == "real":
        ident["weights_id"] = w.weights_id
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:20]


def _write(w: SubnetWeights, options: GgufOptions, path: Path, tokenizer_dir: Path | None) -> list[TensorRecord]:
    """Write the GGUF file (or only its header when weights are "none"); the tensors' records
    with their absolute offsets in the complete file."""
    writer_log = logging.getLogger("gguf.gguf_writer")  # it announces every file at INFO: one per sub-network
    level = writer_log.level
    writer_log.setLevel(logging.WARNING)
    try:
        return _write_file(w, options, path, tokenizer_dir)
    finally:
        writer_log.setLevel(level)


def _write_file(w: SubnetWeights, options: GgufOptions, path: Path, tokenizer_dir: Path | None) -> list[TensorRecord]:
    import gguf

    plan = tensor_plan(w)
    writer = gguf.GGUFWriter(path, ARCH)
    _kv(writer, w, file_type(options), tokenizer_dir)
    if options.mix is not None:
        options.mix.check_layers(len(w.layers))
    records, offset = [], 0
    for name, arr in plan:
        kind = tensor_type(name, arr, options)
        nbytes = _nbytes(arr.shape, kind)
        if options.weights == "real":
            writer.add_tensor(name, _encode(arr, kind), raw_dtype=gguf_qtype(kind))
        else:
            writer.add_tensor_info(name, arr.shape, np.dtype(np.float32 if kind == "f32" else np.float16),
                                   nbytes, raw_dtype=gguf_qtype(kind))
        records.append(TensorRecord(name, list(arr.shape), offset, nbytes, "norm" if arr.ndim == 1 else "linear", kind))
        offset += nbytes + (-nbytes) % writer.data_alignment
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    if options.weights == "real":
        writer.write_tensors_to_file()  # the tensor table, then the data
    else:
        writer.write_ti_data_to_file()
    writer.close()
    size = path.stat().st_size
    if options.weights == "none":  # the padding before the data section belongs to the header
        with path.open("ab") as f:
            f.write(b"\0" * ((-size) % writer.data_alignment))
        size = path.stat().st_size
    # the data section is every tensor padded to the alignment, the last one too
    start = size if options.weights == "none" else size - offset
    for r in records:
        r.offset += start
    return records



def write_preset(w: SubnetWeights, preset: str, path: Path, tokenizer_dir: Path | None = None) -> Path:
    """``w`` at llama.cpp's ``preset`` (Q4_K_M, ...) in ``path``, as a llama.cpp user writes it:
    the F32 file (in a scratch folder beside ``path``) through upstream ``llama-quantize``."""
    from export.llama_cpp_tools import run_tool

    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=".f32-") as tmp:
        f32 = Path(tmp) / GGUF_FILE
        _write(w, GgufOptions("f32", weights="real"), f32, tokenizer_dir)
        run_tool("llama-quantize", [str(f32), str(path), preset.upper()], f"the {preset} preset")
    return path


def _write_preset(w: SubnetWeights, preset: str, path: Path, tokenizer_dir: Path | None) -> list[TensorRecord]:
    """``write_preset``, and its tensors' records."""
    import gguf

    write_preset(w, preset, path, tokenizer_dir)
    return [TensorRecord(t.name, [int(x) for x in reversed(t.shape.tolist())], int(t.data_offset), int(t.n_bytes),
                         "norm" if len(t.shape) == 1 else "linear", t.tensor_type.name.lower())
            for t in gguf.GGUFReader(str(path)).tensors]


def export_gguf(w: SubnetWeights, root: Path, options: GgufOptions | None = None,
                tokenizer_dir: Path | None = None) -> ExportedSubnet:
    """Export ``w`` as ``root/<key>/model.gguf`` (or its header) unless done; return the export,
    described as an ONNX export is (one file serves both phases)."""
    options = options or GgufOptions()
    options.validate()
    key = gguf_key(w, options)
    folder = Path(root) / key
    if (folder / MANIFEST).is_file():
        done = ExportedSubnet.from_dict(json.loads((folder / MANIFEST).read_text()))
        done.folder = folder
        return done
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=".tmp-"))
    try:
        fname = GGUF_FILE if options.weights == "real" else HEADER_FILE
        # the header carries the tokenizer too: llama-bench draws its tokens from the vocabulary
        if options.precision in GGUF_PRESETS:
            records = _write_preset(w, options.precision, tmp / fname, tokenizer_dir)
        else:
            records = _write(w, options, tmp / fname, tokenizer_dir)
        sha = sha256_file(tmp / fname)
        total = records[-1].offset + records[-1].length
        done = ExportedSubnet(key, folder, {"prefill": fname, "decode": fname}, {"prefill": sha, "decode": sha},
                              GGUF_FILE, total, sha if options.weights == "real" else None,
                              {"format": "gguf", "arch": ARCH, "precision": options.precision,
                               **({} if options.mix is None else {"mix": options.mix.to_dict()}),
                               "weights": options.weights, "exporter": GGUF_EXPORTER_VERSION,
                               "header_file": HEADER_FILE if options.weights == "none" else None}, records)
        rec = done.to_dict()
        rec["config"] = w.config.to_dict()
        (tmp / MANIFEST).write_text(json.dumps(rec, indent=1))
        try:
            os.replace(tmp, folder)
        except OSError:
            if not (folder / MANIFEST).is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return done
