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


BAD_CONFIG = '{"base_id":"%s","layers":[{"layer":99,"kv_groups":1,"heads_per_group":1,"neurons":64}]}'


@pytest.mark.parametrize(
    ("case", "needle"),
    [
        ("missing-model", "not found: no such file or folder"),
        ("non-llama", "edgenas prunes Llama-family decoders only"),
        ("no-weights", "no weights"),
        ("layer-out-of-range", "out of range"),
        ("bad-json-line", "line 2: not valid JSON"),
        ("other-base", "is for base model"),
        ("missing-config", "does not exist"),
        ("bad-text", "not UTF-8"),
        ("bad-opset", "opset 5 is not supported"),
        ("bad-index", "--index 3 is out of range"),
    ],
)
def test_bad_input_exits_2_with_a_clear_message(case: str, needle: str, tiny_dir, tiny_base, tmp_path, capsys) -> None:
    good = tiny_base.space(16).full().to_json()
    cfg = tmp_path / "c.jsonl"
    cfg.write_text(good + "\n")
    model = str(tiny_dir)
    extra: list[str] = []
    if case == "missing-model":
        model = str(tmp_path / "nowhere")
    elif case == "non-llama":
        (tmp_path / "bert").mkdir()
        (tmp_path / "bert" / "config.json").write_text('{"model_type": "bert"}')
        model = str(tmp_path / "bert")
    elif case == "no-weights":
        (tmp_path / "empty").mkdir()
        (tmp_path / "empty" / "config.json").write_text('{"model_type": "llama"}')
        model = str(tmp_path / "empty")
    elif case == "layer-out-of-range":
        cfg.write_text(BAD_CONFIG % tiny_base.base_id + "\n")
    elif case == "bad-json-line":
        cfg.write_text(good + "\n{not json\n")
    elif case == "other-base":
        cfg.write_text(good.replace(tiny_base.base_id, "someone-else@000") + "\n")
    elif case == "missing-config":
        cfg = tmp_path / "absent.jsonl"
    elif case == "bad-text":
        (tmp_path / "t.txt").write_bytes(b"\xff\xfe\xfa")
        extra = ["--text", str(tmp_path / "t.txt")]
    elif case == "bad-opset":
        extra = ["--opset", "5"]
    elif case == "bad-index":
        extra = ["--index", "3"]
    code, _, err = run_cli(capsys, "export", "--model", model, "--neuron-step", "16", "--config", str(cfg),
                           "--out", str(tmp_path / "o"), *extra)
    assert code == 2, err
    assert needle in err
    assert "Traceback" not in err
    assert "fix:" in err


def test_console_script_prints_no_traceback(tmp_path) -> None:
    proc = subprocess.run([sys.executable, "-m", "edgenas", "space", "--model", str(tmp_path / "missing")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "not found" in proc.stderr and "Traceback" not in proc.stderr
