"""What an export is asked: one frozen ``ExportRequest`` (field names are ``edgenas export``'s
flags) and ``write_export(request, ws)``: the sub-network as an HF folder, its ONNX graphs,
optionally a GGUF file, and ``summary.json``, from whichever weights the workspace holds (the
base model's, refitted or not, or a trained super-network's)."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from export.gguf_file import GGUF_PRECISIONS
from export.mix import PrecisionMix
from export.onnx_graphs import GRAPHS, ExportOptions
from export.quantize import GGUF_PRESETS
from subnets.config import SubnetConfig
from subnets.cost import cost
from subnets.errors import ConfigError


@dataclass(frozen=True)
class ExportRequest:
    config: Path
    out: Path
    index: int = 0
    model: str = "smollm2"
    neuron_step: int = 64
    reconstruct: bool = False
    supernet: Path | None = None
    no_perplexity: bool = False
    text: str | None = None
    opset: int = 17
    ir_version: int | None = None
    graph: str = "plain"
    gguf: str | None = None
    mix: Path | None = None  # a PrecisionMix JSON file

    def __post_init__(self) -> None:
        object.__setattr__(self, "out", Path(self.out))
        self.options().validate()
        if self.graph not in GRAPHS:
            raise ConfigError(f"--graph {self.graph!r} is not a graph edgenas writes", f"use one of {', '.join(GRAPHS)}")
        if self.gguf is not None and self.gguf not in (*GGUF_PRECISIONS, *GGUF_PRESETS):
            raise ConfigError(f"--gguf {self.gguf!r} is not a GGUF type this exporter writes",
                              f"use one of {', '.join((*GGUF_PRECISIONS, *GGUF_PRESETS))} (presets by llama-quantize)")
        config = self.subnet()
        mix = self.precision_mix()
        if mix is not None:
            mix.check_layers(len(config.layers))
            if mix.runtime == "onnxruntime" and self.graph != "plain":
                raise ConfigError("an onnxruntime precision mix is written as plain graphs", "drop --graph with --mix")

    def precision_mix(self) -> PrecisionMix | None:
        if self.mix is None:
            return None
        try:
            return PrecisionMix.from_dict(json.loads(Path(self.mix).read_text()))
        except FileNotFoundError:
            raise ConfigError(f"precision mix {self.mix} does not exist", "pass the JSON file of a mix") from None
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
            raise ConfigError(f"{self.mix} is not a precision mix ({type(e).__name__}: {e})",
                              'write {"runtime": "llama.cpp", "head": "q8_0", "attention": [...], "mlp": [...]}') from None

    def options(self) -> ExportOptions:
        mix = self.precision_mix()
        onnx_mix = mix if mix is not None and mix.runtime == "onnxruntime" else None
        return ExportOptions(opset=self.opset, ir_version=self.ir_version, graph=self.graph, mix=onnx_mix)

    def subnet(self) -> SubnetConfig:
        from subnets.configio import read_config

        return read_config(self.config, self.index)


def summarize(ws: Any, config: SubnetConfig, exported: Any, ppl: float | None, seq_len: int = 128,
              past_len: int = 128) -> dict[str, Any]:
    pre = cost(config, ws.space.dims, "prefill", seq_len=seq_len)
    dec = cost(config, ws.space.dims, "decode", past_len=past_len)
    return {
        "config_hash": config.config_hash(),
        "summary": config.summary(),
        "params": pre.params,
        f"prefill_gflops_s{seq_len}": round(pre.flops / 1e9, 3),
        f"decode_gflops_p{past_len}": round(dec.flops / 1e9, 4),
        "perplexity": ppl,
        "onnx": {ph: str(exported.path(ph)) for ph in exported.graphs} if exported else None,
        "onnx_sha256": exported.graph_sha256 if exported else None,
        "weights_sha256": exported.weights_sha256 if exported else None,
    }


def _gguf_file(ws: Any, w: Any, precision: str, out: Path, mix: PrecisionMix | None = None) -> Path:
    from export.gguf_file import GGUF_FILE, GgufOptions, export_gguf

    done = export_gguf(w, out / ".gguf", GgufOptions(precision if mix is None else "f16", mix=mix, weights="real"),
                       tokenizer_dir=ws.base.path)
    target = out / f"model.{'mix' if mix is not None else precision}.gguf"
    (done.folder / GGUF_FILE).replace(target)
    shutil.rmtree(out / ".gguf", ignore_errors=True)
    return target


def write_export(request: ExportRequest, ws: Any) -> dict[str, Any]:
    """Write the request's sub-network of ``ws`` under ``request.out``; returns the summary
    (also ``out/summary.json``)."""
    from export.onnx_graphs import export_subnet
    from export.quantize import MixArithmetic
    from subnets.extract import build_model, save_subnet
    from subnets.quality import perplexity

    config = ws.space.validate(request.subnet())
    mix = request.precision_mix()
    w = ws.weights(config)
    model = build_model(w)
    save_subnet(model, request.out / "hf", config, ws.base.tokenizer)
    exported = export_subnet(w, request.out / "onnx", request.options())
    judged = model if mix is None else MixArithmetic(mix).model(w)
    ppl = None if request.no_perplexity else perplexity(judged, ws.eval_tokens())
    summary = summarize(ws, config, exported, ppl)
    summary["hf_folder"] = str(request.out / "hf")
    summary["reconstructed"] = ws.reconstruct
    if mix is not None:
        summary["mix"] = mix.to_dict()
    if request.gguf:
        summary["gguf"] = str(_gguf_file(ws, w, request.gguf, request.out))
    if mix is not None and mix.runtime == "llama.cpp":
        summary["gguf_mix"] = str(_gguf_file(ws, w, "f16", request.out, mix))
    summary["config"] = config.to_dict()
    (request.out / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary
