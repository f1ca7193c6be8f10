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
