"""TensorRT back-ends: what can be checked without a GPU (command lines, profiles, parsing
of trtexec's real output formats, precision fall-back detection)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from device_agents.agent_tensorrt import (
    engine_key,
    fp32_fallback,
    layer_precisions,
    parse_trtexec_summary,
    parse_trtexec_times,
    profile_shapes,
    run_shapes,
    trtexec_build_command,
    trtexec_run_command,
)

FIX = Path(__file__).parent / "fixtures"
DECODE_INPUTS = [("input_ids", ["batch", 1]), ("past_key_values.0.key", ["batch", 3, "past_sequence", 64]),
                 ("past_key_values.0.value", ["batch", 3, "past_sequence", 64])]


def test_profile_covers_the_sweep_grid() -> None:
    p = profile_shapes([("input_ids", ["batch", "sequence"])], 1, [64, 256, 128], [0])
    assert p == {"input_ids": {"min": [1, 64], "opt": [1, 256], "max": [1, 256]}}
    d = profile_shapes(DECODE_INPUTS, 2, [1], [128, 512])
    assert d["past_key_values.0.key"] == {"min": [2, 3, 128, 64], "opt": [2, 3, 512, 64], "max": [2, 3, 512, 64]}
    assert d["input_ids"] == {"min": [2, 1], "opt": [2, 1], "max": [2, 1]}
    assert run_shapes(DECODE_INPUTS, 1, 1, 300)["past_key_values.0.value"] == [1, 3, 300, 64]
    with pytest.raises(ValueError, match="unknown dynamic axis"):
        profile_shapes([("x", ["weird"])], 1, [1], [0])


def test_trtexec_command_lines() -> None:
    profile = profile_shapes(DECODE_INPUTS, 1, [1], [128, 512])
    build = trtexec_build_command("/usr/src/tensorrt/bin/trtexec", "/m/decode.onnx", "/e/k.engine", profile, True, "/e/k.layers.json")
    assert build[:4] == ["/usr/src/tensorrt/bin/trtexec", "--onnx=/m/decode.onnx", "--saveEngine=/e/k.engine", "--skipInference"]
    assert "--minShapes=input_ids:1x1,past_key_values.0.key:1x3x128x64,past_key_values.0.value:1x3x128x64" in build
    assert "--maxShapes=input_ids:1x1,past_key_values.0.key:1x3x512x64,past_key_values.0.value:1x3x512x64" in build
    assert "--fp16" in build and "--profilingVerbosity=detailed" in build and "--exportLayerInfo=/e/k.layers.json" in build
    assert "--fp16" not in trtexec_build_command("trtexec", "a.onnx", "b.engine", profile, False)
    run = trtexec_run_command("trtexec", "/e/k.engine", run_shapes(DECODE_INPUTS, 1, 1, 256), "/e/t.json", 500, 3)
    assert "--shapes=input_ids:1x1,past_key_values.0.key:1x3x256x64,past_key_values.0.value:1x3x256x64" in run
    for flag in ("--noDataTransfers", "--useSpinWait", "--useCudaGraph", "--exportTimes=/e/t.json", "--warmUp=500",
                 "--duration=3", "--avgRuns=1"):
        assert flag in run
    assert "--useCudaGraph" not in trtexec_run_command("trtexec", "e", {}, "t", cuda_graph=False)


def test_parse_trtexec_summary_and_times() -> None:
    s = parse_trtexec_summary((FIX / "trtexec_run.log").read_text())
    assert s["passed"] and s["trt_version_code"] == 100300
    assert s["throughput_qps"] == 302.043
    g = s["gpu_compute_time"]
    assert g["median"] == 3.29736 and g["p90"] == 3.32568 and g["p99"] == 3.5874 and g["min"] == 3.25537
    assert s["h2d_latency"]["mean"] == 0.0  # --noDataTransfers
    assert s["total_gpu_compute_s"] == 3.00208
    assert any("coefficient of variance = 2.31%" in w for w in s["warnings"])
    times = parse_trtexec_times((FIX / "trtexec_times.json").read_text())
    assert times == [3.297, 3.302, 3.255, 3.903]
    assert parse_trtexec_times(json.dumps([{"latencyMs": 1.5}])) == [1.5]


def test_agent_statistics_from_trtexec_times() -> None:
    from device_agents.agent_timing import summarize

    times = parse_trtexec_times((FIX / "trtexec_times.json").read_text())
    stats = summarize([t / 1000 for t in times])
    assert stats["n"] == 4 and abs(stats["median_ms"] - 3.2995) < 1e-9


def test_precision_fallback_detection() -> None:
    counts = layer_precisions((FIX / "trtexec_layers_fp16.json").read_text())
    assert counts == {"FP16": 3, "FP32": 1}
    assert not fp32_fallback("fp16", counts)
    assert fp32_fallback("fp16", {"FP16": 1, "FP32": 9})
    assert fp32_fallback("fp16", {}, engine_bytes=530_000_000, weights_bytes=540_000_000)
    assert not fp32_fallback("fp16", {}, engine_bytes=280_000_000, weights_bytes=540_000_000)
    assert not fp32_fallback("fp32", {"FP32": 10})


def test_engine_cache_key() -> None:
    p = profile_shapes(DECODE_INPUTS, 1, [1], [128, 512])
    k = engine_key("abc", "10.3.0", "fp16", p)
    assert k == engine_key("abc", "10.3.0", "fp16", p)
    assert k != engine_key("abc", "10.3.0", "fp32", p)
    assert k != engine_key("abc", "10.4.0", "fp16", p)
    assert k != engine_key("abc", "10.3.0", "fp16", profile_shapes(DECODE_INPUTS, 1, [1], [128, 1024]))


def test_gpu_backends_fail_cleanly_on_a_board_without_them(tiny_ws, tmp_path) -> None:
    """Asking for CUDA or TensorRT where they are absent is a compile_error job, not a crash."""
    from tests.helpers import sweep

    for backend in ("ort-cuda", "trt", "trtexec"):
        s = sweep(tiny_ws, "local", tmp_path / f"{backend}.db", tiny_ws.space.sample(1, 0), phases=("prefill",),
                  backend=backend, max_attempts=1)
        assert s.measured == 0 and len(s.failed) == 1
        assert s.failed[0]["error_class"] == "compile_error", s.failed[0]
