from __future__ import annotations

import json
import subprocess
import sys

import pytest

from edgenas.cli import main


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_space_sample_export(tiny_dir, tmp_path, capsys) -> None:
    code, out, _ = run_cli(capsys, "space", "--model", str(tiny_dir), "--json", "--neuron-step", "16")
    assert code == 0
    desc = json.loads(out)
    assert desc["dims"]["num_layers"] == 4 and desc["neurons"][0] == 16
    code, out, _ = run_cli(capsys, "sample", "--model", str(tiny_dir), "--n", "5", "--seed", "7", "--neuron-step", "16")
    assert code == 0
    lines = out.strip().splitlines()
    assert len(lines) == 5
    _, again, _ = run_cli(capsys, "sample", "--model", str(tiny_dir), "--n", "5", "--seed", "7", "--neuron-step", "16")
    assert again == out
    cfg = tmp_path / "c.jsonl"
    cfg.write_text(out)
    code, out, _ = run_cli(capsys, "export", "--model", str(tiny_dir), "--neuron-step", "16", "--config", str(cfg),
                           "--index", "2", "--out", str(tmp_path / "x"))
    assert code == 0
    summary = json.loads((tmp_path / "x" / "summary.json").read_text())
    assert summary["config"] == json.loads(lines[2])
    assert summary["perplexity"] > 1 and summary["params"] > 0
    assert (tmp_path / "x" / "hf" / "config.json").is_file()
    for phase in ("prefill", "decode"):
        assert any((tmp_path / "x" / "onnx").glob(f"*/{phase}.onnx"))
    code, _, _ = run_cli(capsys, "export", "--model", str(tiny_dir), "--neuron-step", "16", "--config", str(cfg),
                         "--index", "2", "--out", str(tmp_path / "r"), "--reconstruct")
    refitted = json.loads((tmp_path / "r" / "summary.json").read_text())
    assert code == 0 and refitted["reconstructed"] and not summary["reconstructed"]
    assert refitted["params"] == summary["params"] and refitted["perplexity"] != summary["perplexity"]


def test_console_script_prints_no_traceback(tmp_path) -> None:
    proc = subprocess.run([sys.executable, "-m", "edgenas", "space", "--model", str(tmp_path / "missing")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "not found" in proc.stderr and "Traceback" not in proc.stderr


def test_export_writes_a_precision_mix_as_the_file_its_runtime_loads(tiny_dir, tmp_path, capsys) -> None:
    """--mix: a llama.cpp mix becomes one GGUF with per-tensor types, an onnxruntime mix the
    ONNX graphs with each layer's MatMuls at its type; perplexity is the mix's own."""
    import gguf

    from export.mix import PrecisionMix

    cfg = tmp_path / "c.jsonl"
    from subnets.basemodel import load_base_model

    cfg.write_text(load_base_model(tiny_dir).space(16).full().to_json() + "\n")
    plain = tmp_path / "plain"
    assert run_cli(capsys, "export", "--model", str(tiny_dir), "--neuron-step", "16", "--configs", str(cfg),
                   "--out", str(plain))[0] == 0
    for mix in (PrecisionMix("llama.cpp", "q8_0", ("f16", "q8_0", "f16", "q8_0"), ("q4_0", "q8_0", "q5_0", "q4_1")),
                PrecisionMix("onnxruntime", "fp32", ("int4", "fp32", "int8", "fp32"), ("int8", "int4", "int4", "fp32"))):
        spec, out = tmp_path / f"{mix.runtime}.json", tmp_path / mix.runtime
        spec.write_text(mix.to_json())
        code, _, err = run_cli(capsys, "export", "--model", str(tiny_dir), "--neuron-step", "16", "--configs", str(cfg),
                               "--out", str(out), "--mix", str(spec))
        assert code == 0, err
        summary = json.loads((out / "summary.json").read_text())
        assert summary["mix"] == mix.to_dict()
        assert summary["perplexity"] != json.loads((plain / "summary.json").read_text())["perplexity"]
        if mix.runtime == "llama.cpp":
            types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(summary["gguf_mix"]).tensors}
            assert [types[f"blk.{i}.ffn_down.weight"] for i in range(4)] == [k.upper() for k in mix.mlp]
        else:
            assert json.loads(next((out / "onnx").glob("*/export.json")).read_text())["options"]["mix"] == mix.to_dict()
    bad = tmp_path / "bad.json"
    bad.write_text(PrecisionMix.uniform("llama.cpp", "q8_0", 2).to_json())
    code, _, err = run_cli(capsys, "export", "--model", str(tiny_dir), "--neuron-step", "16", "--configs", str(cfg),
                           "--out", str(tmp_path / "b"), "--mix", str(bad))
    assert code == 2 and "the precision mix is for 2 layers, the sub-network keeps 4" in err
