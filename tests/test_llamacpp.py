"""The llama.cpp back-end: GGUF export of sub-networks, llama.cpp's own tools on them.

The tests that run llama.cpp use a real build from source (scripts/build_llama_cpp.sh, the
llama.cpp tree vendored in llama-cpp-python's PyPI source distribution), made once and kept
in the user cache; .ci/run builds it before the tests."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from device_agents import AGENT_DIR
from export.gguf_file import GgufOptions, export_gguf
from tests.conftest import _user_cache

sys.path.insert(0, str(AGENT_DIR))
import agent_llamacpp  # the agent's modules import each other by file name

REPO = Path(__file__).resolve().parent.parent
DATA = Path(__file__).parent / "data"
BUILD_COMMIT = "0c1e57098"  # the llama.cpp commit llama-cpp-python 0.3.36 vendors


@pytest.fixture(scope="session")
def llama_cpp() -> Path:
    """The folder of the built llama.cpp tools (built on first use, ~10 min on 2 cores)."""
    prefix = Path(_user_cache()) / "llama.cpp" / "0.3.36"
    if not (prefix / "BUILD_OK").is_file() or not (prefix / "python" / "llama_cpp").is_dir():
        res = subprocess.run(["bash", str(REPO / "scripts" / "build_llama_cpp.sh"), str(prefix)],
                             capture_output=True, text=True, env={"PYTHON": sys.executable, "PATH": "/usr/bin:/bin"})
        assert res.returncode == 0, res.stderr[-3000:]
    return prefix / "bin"


def per_layer(ws, seed: int = 3):
    return ws.space.sample(4, seed, granularity="per-layer", layer_ranking=ws.importance.layer_ranking())[-1]


def _gguf_table(path: Path) -> dict[str, tuple[str, list[int], int]]:
    import gguf

    r = gguf.GGUFReader(path)
    return {t.name: (t.tensor_type.name, [int(x) for x in t.shape], int(t.data_offset)) for t in r.tensors}


# --- export -------------------------------------------------------------------------------
def test_a_header_only_export_becomes_the_same_gguf_on_the_board(tiny_ws, tmp_path) -> None:
    cfg = per_layer(tiny_ws)
    real = export_gguf(tiny_ws.weights(cfg), tmp_path, GgufOptions("q8_0", "real"), tokenizer_dir=tiny_ws.base.path)
    head = export_gguf(tiny_ws.weights(cfg), tmp_path, GgufOptions("q8_0", "none"), tokenizer_dir=tiny_ws.base.path)
    assert head.key != real.key and head.weights_sha256 is None and head.graphs == {"prefill": "header.gguf",
                                                                                     "decode": "header.gguf"}
    assert (head.folder / "header.gguf").stat().st_size < real.weights_bytes / 10
    manifest = json.loads((head.folder / "export.json").read_text())
    filled = tmp_path / "filled.gguf"
    agent_llamacpp.materialize_gguf(np, np.random.default_rng(0), str(head.folder), manifest, str(filled))
    assert filled.stat().st_size == real.weights_bytes == head.weights_bytes
    assert _gguf_table(filled) == _gguf_table(real.folder / "model.gguf")
    # per-layer sizes as llama.cpp's per-layer ('deci') architecture reads them
    import gguf

    fields = gguf.GGUFReader(filled).fields
    heads = [int(x) for x in fields["deci.attention.head_count"].contents()]
    assert heads == [lc.kv_groups * lc.heads_per_group for lc in cfg.layers]
    assert [int(x) for x in fields["deci.feed_forward_length"].contents()] == [lc.neurons for lc in cfg.layers]


def test_quantized_gguf_weights_are_the_sliced_weights(tiny_ws, tmp_path) -> None:
    import gguf

    cfg = tiny_ws.space.full()
    w = tiny_ws.weights(cfg)
    errs = {}
    for prec in ("f32", "q8_0", "q4_0"):
        e = export_gguf(w, tmp_path / prec, GgufOptions(prec), tokenizer_dir=tiny_ws.base.path)
        r = gguf.GGUFReader(e.folder / "model.gguf")
        t = {x.name: x for x in r.tensors}
        down = t["blk.0.ffn_down.weight"]  # rows of 128 neurons: quantized; hidden 48 is not a multiple of 32
        assert down.tensor_type.name == prec.upper()
        assert t["blk.0.ffn_gate.weight"].tensor_type.name == ("F32" if prec == "f32" else "F16")
        assert t["blk.0.attn_norm.weight"].tensor_type.name == "F32"
        got = gguf.quants.dequantize(down.data, down.tensor_type).reshape(w.layers[0].down.shape)
        ref = w.layers[0].down.numpy()
        errs[prec] = float(np.abs(got - ref).max() / np.abs(ref).max())
        # Q rows permuted to llama.cpp's adjacent-pair RoPE layout, undone here
        q = t["blk.0.attn_q.weight"].data.reshape(w.layers[0].q.shape).astype(np.float32)
        n = w.layers[0].num_heads
        unperm = q.reshape(n, w.head_dim // 2, 2, -1).swapaxes(1, 2).reshape(q.shape)
        assert np.allclose(unperm, w.layers[0].q.numpy(), atol=1e-3)
    assert errs["f32"] == 0 and errs["q8_0"] < 0.01 and errs["q4_0"] < 0.1


def test_gguf_precision_is_checked() -> None:
    from subnets.errors import ConfigError

    with pytest.raises(ConfigError, match="q3_k"):
        GgufOptions("q3_k").validate()


# --- the agent's side, on captured llama-bench output -----------------------------------------
def test_llama_bench_command_lines() -> None:
    pre = agent_llamacpp.bench_command("lb", "m.gguf", "prefill", 128, 0, 1, 10)
    dec = agent_llamacpp.bench_command("lb", "m.gguf", "decode", 1, 512, 4, 20, gpu_layers=99)
    assert pre == ["lb", "-m", "m.gguf", "-o", "json", "-r", "10", "-t", "1", "-ngl", "0", "-d", "0", "-p", "128", "-n", "0"]
    assert dec[-6:] == ["-d", "512", "-p", "0", "-n", "1"] and dec[dec.index("-ngl") + 1] == "99"


def test_llama_bench_json_is_read_per_token() -> None:
    rec, secs = agent_llamacpp.parse_bench_json((DATA / "llama_bench_decode.json").read_text())
    assert rec["n_gen"] == 1 and rec["n_depth"] == 128 and rec["build_commit"]
    assert len(secs) == len(rec["samples_ns"]) and secs[0] == pytest.approx(rec["samples_ns"][0] / 1e9)
    rec, secs = agent_llamacpp.parse_bench_json((DATA / "llama_bench_prefill.json").read_text())
    assert rec["n_prompt"] == 128 and secs[0] == pytest.approx(rec["samples_ns"][0] / 1e9)


def test_llama_bench_failures_are_classified() -> None:
    cls, msg = agent_llamacpp.classify_failure((DATA / "llama_bench_unknown_arch.txt").read_text())
    assert cls == "compile_error" and "update llama.cpp" in msg and "architecture" in msg
    cls, msg = agent_llamacpp.classify_failure((DATA / "llama_bench_bad_type.txt").read_text())
    assert cls == "compile_error" and "weight type" in msg
    assert agent_llamacpp.parse_devices("Available devices:\n  CUDA0: Orin (30000 MiB, 28000 MiB free)\n") == ["CUDA0", "CPU"]


def test_the_build_and_back_ends_are_read_from_the_tools() -> None:
    """``--version`` as builds print it now and before 2025; back-ends from the device list."""
    now = agent_llamacpp.parse_version("version: 0.5.0-dev (build 1, commit 0c1e57098)\n"
                                       "built with GNU 12.2.0 for Linux x86_64\n")
    assert now == {"version": "0.5.0-dev", "build": 1, "commit": "0c1e57098", "compiler": "GNU 12.2.0",
                   "target": "Linux x86_64"}
    old = agent_llamacpp.parse_version("version: 4350 (5f0db95)\nbuilt with cc (Ubuntu 11.4.0) for aarch64-linux-gnu")
    assert old["build"] == 4350 and old["commit"] == "5f0db95" and old["target"] == "aarch64-linux-gnu"
    assert agent_llamacpp.parse_version("no version here") is None
    assert agent_llamacpp.backends_of(["CUDA0", "CUDA1", "CPU"]) == ["CPU", "CUDA"]
    assert agent_llamacpp.backends_of(["Vulkan0", "CPU"]) == ["CPU", "Vulkan"] and agent_llamacpp.backends_of(None) == ["CPU"]


def test_a_board_without_the_runner_asked_for_is_told_the_fix() -> None:
    from profiler.errors import HostError
    from profiler.sweep import SweepSpec, board_gguf_options

    bench_only = {"llama_cpp": {"llama_bench": "/x/llama-bench", "devices": ["CPU"], "binding": None}}
    with pytest.raises(HostError, match="no llama-cpp-python") as e:
        board_gguf_options(bench_only, SweepSpec(backend="llama.cpp-py", precision="q4_0"))
    assert "pip install llama-cpp-python" in e.value.fix
    binding_only = {"llama_cpp": {"llama_bench": None, "binding": {"version": "0.3.36", "gpu_offload": False}}}
    with pytest.raises(HostError, match=r"llama\.cpp-py times through that"):
        board_gguf_options(binding_only, SweepSpec(backend="llama.cpp", precision="q4_0"))
    with pytest.raises(HostError, match="without GPU offload"):
        board_gguf_options(binding_only, SweepSpec(backend="llama.cpp-py", precision="q4_0", gpu_layers=99))
    assert board_gguf_options(binding_only, SweepSpec(backend="llama.cpp-py", precision="q4_0")).precision == "q4_0"


# --- real llama.cpp ---------------------------------------------------------------------------
def _greedy_torch(model, ids: list[int], n: int, eos: set[int]) -> list[int]:
    out = list(ids)
    with torch.no_grad():
        for _ in range(n):
            nxt = int(model(torch.tensor([out])).logits[0, -1].argmax())
            if nxt in eos:
                break
            out.append(nxt)
    return out[len(ids):]


def _token_bytes(tokenizer, ids: list[int]) -> bytes:
    from gguf.vocab import bytes_to_unicode

    inv = {v: k for k, v in bytes_to_unicode().items()}
    return b"".join(bytes(inv[c] for c in tokenizer.convert_ids_to_tokens(i)) for i in ids)


def _parity(ws, cfg, precision: str, prompt: str, llama_cpp: Path, tmp_path: Path, n: int = 12, mix=None) -> None:
    """llama.cpp's greedy continuation of ``prompt`` equals torch's, torch computing what
    llama.cpp computes at ``precision`` (Workspace.precision), or for a precision ``mix``."""
    from export.arithmetic import at_precision
    from export.quantize import MixArithmetic

    tok = ws.base.tokenizer
    e = export_gguf(ws.weights(cfg), tmp_path, GgufOptions(precision, mix=mix), tokenizer_dir=ws.base.path)
    ids = tok(prompt).input_ids
    eos = {i for i in (tok.eos_token_id,) if i is not None}
    judged = at_precision(ws, precision) if mix is None else ws.at_precision(MixArithmetic(mix))
    want = _greedy_torch(judged.model(cfg).eval(), ids, n, eos)
    res = subprocess.run([str(llama_cpp / "llama-simple"), "-m", str(e.folder / "model.gguf"), "-n", str(n), prompt],
                         capture_output=True, timeout=300)
    assert res.returncode == 0, res.stderr.decode(errors="replace")[-2000:]
    assert res.stdout == _token_bytes(tok, ids) + _token_bytes(tok, want) + b"\n", (res.stdout, want)


def test_a_tiny_per_layer_gguf_generates_the_tokens_torch_does(tiny_ws, llama_cpp, tmp_path) -> None:
    _parity(tiny_ws, per_layer(tiny_ws), "f32", "The module returns", llama_cpp, tmp_path)


def test_a_per_layer_smollm2_gguf_generates_the_tokens_torch_does(smollm2, llama_cpp, tmp_path) -> None:
    space = smollm2.space
    cfg = space.sample(3, 5, granularity="per-layer", layer_ranking=smollm2.importance.layer_ranking())[-1]
    assert len({lc.neurons for lc in cfg.layers}) > 1 and len(cfg.layers) < space.dims.num_layers
    _parity(smollm2, cfg, "f32", "The capital of France is", llama_cpp, tmp_path)


def test_a_q8_0_smollm2_gguf_generates_the_tokens_of_its_torch_emulation(smollm2, llama_cpp, tmp_path) -> None:
    import dataclasses

    # lightly cut (a heavily cut one repeats a token with near-ties between the candidates)
    full = smollm2.space.full()
    cfg = dataclasses.replace(full, layers=tuple(dataclasses.replace(lc, neurons=lc.neurons - 64 * (i % 3))
                                                 for i, lc in enumerate(full.layers) if i != 20))
    _parity(smollm2, cfg, "q8_0", "The capital of France is", llama_cpp, tmp_path)


def test_a_mixed_precision_smollm2_gguf_generates_the_tokens_of_its_torch_emulation(smollm2, llama_cpp,
                                                                                   tmp_path) -> None:
    """Per-layer types in one GGUF (the head at Q8_0; attention and MLP types varying by
    layer, F16 to Q4_0): llama.cpp's greedy tokens are those of the same mix in torch."""
    from export.mix import PrecisionMix

    cfg = smollm2.space.full()
    L = len(cfg.layers)
    attention = tuple(("q8_0", "f16", "q5_1", "q8_0", "q5_0")[i % 5] for i in range(L))
    mlp = tuple(("q8_0", "q5_0", "q8_0", "q4_1", "q8_0", "q5_1")[i % 6] for i in range(L))
    mix = PrecisionMix("llama.cpp", "q8_0", attention, mlp)
    _parity(smollm2, cfg, "f16", "The capital of France is", llama_cpp, tmp_path, mix=mix)


def _perplexity_as_llama_cpp(model, ids: list[int], n_ctx: int, chunks: int) -> float:
    """llama-perplexity's protocol in torch: chunks of ``n_ctx`` tokens (no BOS where the
    vocabulary adds none), each scoring the tokens of its second half."""
    import math

    nll, count = 0.0, 0
    for c in range(chunks):
        chunk = ids[c * n_ctx:(c + 1) * n_ctx]
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([chunk])).logits[0].double(), -1)
        for j in range(n_ctx // 2, n_ctx - 1):
            nll -= float(logp[j, chunk[j + 1]])
            count += 1
    return math.exp(nll / count)


def test_a_mixed_gguf_scores_in_llama_perplexity_what_its_emulation_scores(smollm2, llama_cpp, tmp_path) -> None:
    """The quality objective of a mix is what llama.cpp itself measures: llama-perplexity on
    the exported GGUF against the torch emulation of the same mix, on the same held-out text."""
    import re

    from export.mix import PrecisionMix
    from export.quantize import MixArithmetic
    from subnets.textdata import stdlib_docstrings

    cfg = smollm2.space.full()
    L = len(cfg.layers)
    mix = PrecisionMix("llama.cpp", "q8_0", tuple(("q8_0", "q4_0")[i % 2] for i in range(L)),
                       tuple(("q4_0", "q8_0", "q5_0")[i % 3] for i in range(L)))
    text = tmp_path / "heldout.txt"
    text.write_text(stdlib_docstrings("heldout").text[:30_000])
    e = export_gguf(smollm2.weights(cfg), tmp_path, GgufOptions("f16", mix=mix), tokenizer_dir=smollm2.base.path)
    res = subprocess.run([str(llama_cpp / "llama-perplexity"), "-m", str(e.folder / "model.gguf"), "-f", str(text),
                          "-c", "256", "--chunks", "4", "-t", "2"], capture_output=True, text=True, timeout=600)
    found = re.search(r"Final estimate: PPL = ([0-9.]+)", res.stdout + res.stderr)
    assert found, (res.stdout + res.stderr)[-2000:]
    tok = smollm2.base.tokenizer
    ids = tok(text.read_text(), add_special_tokens=False).input_ids
    want = _perplexity_as_llama_cpp(smollm2.at_precision(MixArithmetic(mix)).model(cfg).eval(), ids, 256, 4)
    assert float(found.group(1)) == pytest.approx(want, rel=0.005)
    plain = _perplexity_as_llama_cpp(smollm2.model(cfg).eval(), ids, 256, 4)
    assert abs(want / plain - 1) > 0.01  # the mix's own quantization error, not the fp32 model's


def test_a_preset_scores_in_llama_perplexity_what_its_emulation_scores(smollm2, llama_cpp, tmp_path,
                                                                       monkeypatch) -> None:
    """Q4_K_M as upstream's llama-quantize writes it (K-quant, legacy fallback and Q8_0 tensors
    in one file): llama-perplexity on it against the torch emulation of the same file's values
    with llama.cpp's activation rounding per tensor type (Q8_K for K-quants)."""
    import re

    import gguf

    from export.gguf_file import write_preset
    from export.gguf_presets import PresetArithmetic
    from subnets.textdata import stdlib_docstrings

    monkeypatch.setenv("EDGENAS_LLAMA_CPP", str(llama_cpp))
    cfg = smollm2.space.full()
    text = tmp_path / "heldout.txt"
    text.write_text(stdlib_docstrings("heldout").text[:30_000])
    path = write_preset(smollm2.weights(cfg), "q4_k_m", tmp_path / "q" / "model.gguf", tokenizer_dir=smollm2.base.path)
    kinds = {t.tensor_type.name for t in gguf.GGUFReader(str(path)).tensors}
    assert {"Q4_K", "Q6_K", "Q5_0", "Q8_0"} <= kinds  # a per-tensor mix of llama.cpp's own making
    res = subprocess.run([str(llama_cpp / "llama-perplexity"), "-m", str(path), "-f", str(text), "-c", "256",
                          "--chunks", "4", "-t", "2"], capture_output=True, text=True, timeout=600)
    found = re.search(r"Final estimate: PPL = ([0-9.]+)", res.stdout + res.stderr)
    assert found, (res.stdout + res.stderr)[-2000:]
    ids = smollm2.base.tokenizer(text.read_text(), add_special_tokens=False).input_ids
    want = _perplexity_as_llama_cpp(smollm2.at_precision(PresetArithmetic("q4_k_m")).model(cfg).eval(), ids, 256, 4)
    assert float(found.group(1)) == pytest.approx(want, rel=0.006)


def test_a_preset_without_llama_quantize_names_the_fix(tiny_ws, tmp_path, monkeypatch) -> None:
    from export.arithmetic import at_precision
    from export.gguf_file import GgufOptions
    from subnets.errors import ConfigError

    monkeypatch.setenv("EDGENAS_LLAMA_CPP", str(tmp_path / "no-tools"))
    with pytest.raises(ConfigError, match=r"needs llama\.cpp's llama-quantize") as e:
        at_precision(tiny_ws, "q4_k_m").perplexity(tiny_ws.space.full())
    assert "build_llama_cpp.sh" in e.value.fix
    with pytest.raises(ConfigError, match="written by llama-quantize"):
        GgufOptions("q4_k_m", weights="none").validate()


def test_a_mixed_gguf_holds_each_group_at_its_type_as_the_quality_emulation_does(tiny64, tmp_path) -> None:
    import gguf

    from export.mix import PrecisionMix
    from export.quantize import mixed_weights

    cfg = tiny64.space.full()
    mix = PrecisionMix("llama.cpp", "q5_1", ("q8_0", "f16", "q4_1", "q5_0"), ("q4_0", "q5_1", "f16", "q8_0"))
    w = tiny64.weights(cfg)
    e = export_gguf(w, tmp_path, GgufOptions("f16", mix=mix), tokenizer_dir=tiny64.base.path)
    t = {x.name: x for x in gguf.GGUFReader(e.folder / "model.gguf").tensors}
    assert t["token_embd.weight"].tensor_type.name == "Q5_1" and t["output_norm.weight"].tensor_type.name == "F32"
    emulated = mixed_weights(w, mix)
    for i in range(4):
        assert t[f"blk.{i}.attn_k.weight"].tensor_type.name == mix.attention[i].upper()
        assert t[f"blk.{i}.ffn_up.weight"].tensor_type.name == mix.mlp[i].upper()
        for name, part in (("attn_v", "v"), ("attn_output", "o"), ("ffn_down", "down"), ("ffn_gate", "gate")):
            x = t[f"blk.{i}.{name}.weight"]
            got = gguf.quants.dequantize(x.data, x.tensor_type).reshape(getattr(w.layers[i], part).shape)
            np.testing.assert_array_equal(got, getattr(emulated.layers[i], part).numpy())
    other = export_gguf(w, tmp_path, GgufOptions("f16", mix=PrecisionMix.uniform("llama.cpp", "q8_0", 4)),
                        tokenizer_dir=tiny64.base.path)
    assert other.key != e.key and e.options["mix"] == mix.to_dict()


def test_a_weightless_mixed_gguf_runs_in_llama_cpp_once_the_board_fills_it(tiny64, llama_cpp, tmp_path) -> None:
    """Latency profiling ships a mix's header only; the board fills each tensor with stand-in
    blocks of its own type, and llama.cpp loads and runs the result."""
    from export.mix import PrecisionMix

    cfg = tiny64.space.full()
    mix = PrecisionMix("llama.cpp", "q4_1", ("q8_0", "f16", "q4_1", "q5_0"), ("q4_0", "q5_1", "f16", "q8_0"))
    w = tiny64.weights(cfg)
    real = export_gguf(w, tmp_path, GgufOptions("f16", "real", mix=mix), tokenizer_dir=tiny64.base.path)
    head = export_gguf(w, tmp_path, GgufOptions("f16", "none", mix=mix), tokenizer_dir=tiny64.base.path)
    manifest = json.loads((head.folder / "export.json").read_text())
    filled = tmp_path / "filled.gguf"
    agent_llamacpp.materialize_gguf(np, np.random.default_rng(0), str(head.folder), manifest, str(filled))
    assert _gguf_table(filled) == _gguf_table(real.folder / "model.gguf")
    res = subprocess.run([str(llama_cpp / "llama-simple"), "-m", str(filled), "-n", "4", "The module"],
                         capture_output=True, timeout=300)
    assert res.returncode == 0, res.stderr.decode(errors="replace")[-2000:]


def _run_bench(llama_cpp: Path, model: Path) -> tuple[str, str]:
    import agent_runtime

    try:
        agent_llamacpp.run_bench(agent_llamacpp.bench_command(str(llama_cpp / "llama-bench"), str(model), "prefill",
                                                              8, 0, 1, 1), 120)
    except agent_runtime.AgentError as err:
        return err.error_class, err.message
    return "ok", ""


def test_a_gguf_llama_cpp_cannot_load_fails_with_the_fix(tiny_ws, llama_cpp, tmp_path, monkeypatch) -> None:
    import export.gguf_file as ge

    monkeypatch.setattr(ge, "ARCH", "edgenas-future")  # an architecture this build does not know
    e = export_gguf(tiny_ws.weights(tiny_ws.space.full()), tmp_path / "arch", GgufOptions("f32"),
                    tokenizer_dir=tiny_ws.base.path)
    cls, msg = _run_bench(llama_cpp, e.folder / "model.gguf")
    assert cls == "compile_error" and "'edgenas-future' architecture" in msg and "update llama.cpp" in msg
    monkeypatch.undo()
    e = export_gguf(tiny_ws.weights(tiny_ws.space.full()), tmp_path / "type", GgufOptions("f32"),
                    tokenizer_dir=tiny_ws.base.path)
    bad = tmp_path / "bad-type.gguf"
    data = bytearray((e.folder / "model.gguf").read_bytes())
    name = b"output_norm.weight"  # its tensor-table entry: name, n_dims (u32), dims (u64 each), type (u32)
    at = data.index(name) + len(name)
    data[at + 4 + 8: at + 4 + 8 + 4] = (99).to_bytes(4, "little")  # a 1-D tensor's type -> an unknown type id
    bad.write_bytes(bytes(data))
    cls, msg = _run_bench(llama_cpp, bad)
    assert cls == "compile_error" and "weight type" in msg, msg


def test_the_binding_names_a_gguf_it_cannot_load(tiny_ws, llama_cpp, tmp_path, monkeypatch) -> None:
    import agent_runtime
    import agent_timing

    import export.gguf_file as ge

    monkeypatch.setattr(ge, "ARCH", "edgenas-future")
    e = export_gguf(tiny_ws.weights(tiny_ws.space.full()), tmp_path, GgufOptions("f32"), tokenizer_dir=tiny_ws.base.path)
    with pytest.raises(agent_runtime.AgentError) as err:
        agent_llamacpp.time_binding_cell(str(e.folder / "model.gguf"), "decode", 1, 4, 1, agent_timing.TimingPolicy(),
                                         hint=str(llama_cpp))
    assert err.value.error_class == "compile_error" and "'edgenas-future' architecture" in err.value.message


def test_llama_cpp_sweep_over_ssh(tiny_ws, sshd, llama_cpp, tmp_path) -> None:
    from profiler.store import Store
    from tests.helpers import sweep

    inv = sshd.inventory(tmp_path / "inv.toml", sys.executable, tmp_path / "board", llama_cpp=str(llama_cpp))
    configs = tiny_ws.space.sample(2, 0, layer_ranking=tiny_ws.importance.layer_ranking())
    db = tmp_path / "m.db"
    s = sweep(tiny_ws, "board", db, configs, inv, sshd.ssh_config, backend="llama.cpp", precision="q8_0",
              keep_models=True)
    assert s.measured == 4 and not s.failed, s.failed
    store = Store(db)
    rows = list(store.measurement_rows())
    assert {r["backend"] for r in rows} == {"llama.cpp:q8_0"}
    assert {(r["phase"], r["seq_len"], r["past_len"]) for r in rows} == {("prefill", 16, 0), ("decode", 1, 16)}
    for r in rows:
        assert r["median_ms"] > 0 and r["n"] >= 5 and len(json.loads(r["raw_ms"])) == r["n"]
    hello = json.loads(store.devices()[0]["info"])["hello"]
    assert hello["llama_cpp"]["llama_bench"].startswith(str(llama_cpp)) and "CPU" in hello["llama_cpp"]["devices"]
    assert hello["llama_cpp"]["build"]["commit"] == BUILD_COMMIT and hello["llama_cpp"]["backends"] == ["CPU"]
    assert hello["llama_cpp"]["binding"]["version"] == "0.3.36" and "CPU" in hello["llama_cpp"]["binding"]["system_info"]
    store.close()
    assert s.bytes_uploaded < 200_000  # headers only: the board filled in the weights
    models = list((tmp_path / "board" / "models").iterdir())
    assert models and all((m / "model.gguf").is_file() and (m / "header.gguf").is_file() for m in models)
    assert all(json.loads(r["versions"])["llama_cpp"].startswith(BUILD_COMMIT[:9]) for r in rows)
    assert all(json.loads(r["settings"])["threads"] == 1 for r in rows)


def test_the_python_binding_is_a_back_end_of_its_own(tiny_ws, sshd, llama_cpp, tmp_path) -> None:
    """--backend llama.cpp-py: the same GGUF files through the board's llama-cpp-python, timed
    by the agent's protocol (warm-up, runs until the median's interval narrows), stored
    apart from llama-bench's numbers."""
    from profiler.store import Store
    from tests.helpers import FAST_TIMING, sweep

    inv = sshd.inventory(tmp_path / "inv.toml", sys.executable, tmp_path / "board", llama_cpp=str(llama_cpp))
    configs = tiny_ws.space.sample(2, 1, layer_ranking=tiny_ws.importance.layer_ranking())
    db = tmp_path / "m.db"
    s = sweep(tiny_ws, "board", db, configs, inv, sshd.ssh_config, backend="llama.cpp-py", precision="q4_0")
    assert s.measured == 4 and not s.failed, s.failed
    store = Store(db)
    rows = list(store.measurement_rows())
    store.close()
    assert {r["backend"] for r in rows} == {"llama.cpp-py:q4_0"}
    for r in rows:
        assert r["median_ms"] > 0 and r["n"] >= FAST_TIMING["min_runs"] and r["stop_reason"] in ("converged", "time_cap")
        assert json.loads(r["versions"])["llama_cpp_python"] == "0.3.36"
        assert json.loads(r["settings"])["n_ctx"] >= r["past_len"] + r["seq_len"]


def test_the_main_job_searches_llama_cpp_beside_onnxruntime_where_its_tools_are(tiny_dir, llama_cpp, tmp_path,
                                                                                monkeypatch, capsys) -> None:
    """``--precision auto`` on a machine with llama.cpp's tools: Q8_0 and Q4_0 are profiled,
    predicted (transferred from fp32) and searched beside onnxruntime's precisions, and the
    recommendation is measured and exported for whichever runtime it is on."""
    from edgenas.cli import main as edgenas

    monkeypatch.setenv("EDGENAS_LLAMA_CPP", str(llama_cpp))
    out = tmp_path / "run"
    code = edgenas(["pipeline", "--model", str(tiny_dir), "--neuron-step", "16", "--n", "12", "--workload", "16,8",
                    "--evals", "10", "--budget-share", "0.95", "--verify", "2", "--quality-tokens", "256",
                    "--min-time", "0.05", "--out", str(out)])
    text = capsys.readouterr().out
    assert code == 0, text[-3000:]
    rec = json.loads((out / "recommendation.json").read_text())
    chosen = rec["chosen"]
    assert chosen["meets_budget"]
    shown = {a["precision"] for a in rec["alternatives"]} | {chosen["precision"]}
    assert {"fp32", "int8", "int4", "q8_0", "q4_0"} <= shown
    # llama.cpp's own presets, written by llama-quantize, measured on the device as they are
    presets = [a for a in [*rec["alternatives"], chosen] if a["precision"] in ("q6_k", "q5_k_m", "q4_k_m")]
    assert {a["precision"] for a in presets} == {"q6_k", "q5_k_m", "q4_k_m"}
    assert all(a["family"] == "full model" and a["measured_ms"] == a["upper_ms"] > 0 for a in presets)
    for p in ("q8_0", "q4_0"):
        assert (out / "predictors" / f"local-{p}" / "prefill" / "meta.json").is_file()
    summary = json.loads((out / "ship" / "summary.json").read_text())
    if chosen["precision"] in ("q6_k", "q5_k_m", "q4_k_m"):
        assert Path(summary["gguf"]).is_file()
    elif chosen["runtime"] == "llama.cpp":
        assert Path(summary["gguf_mix"]).is_file()


def test_a_precision_mix_is_swept_as_a_back_end_of_its_own(tiny64, sshd, llama_cpp, tmp_path) -> None:
    """A mix of Q8_0 and Q4_0 groups is profiled on the board from its header (the board fills
    each tensor at its own type) and stored as llama.cpp:mix-<digest>, beside the uniform
    types of the same sub-network; a different mix is a different back-end."""
    from export.mix import PrecisionMix
    from profiler.store import Store
    from tests.helpers import sweep

    inv = sshd.inventory(tmp_path / "inv.toml", sys.executable, tmp_path / "board", llama_cpp=str(llama_cpp))
    cfg = tiny64.space.full()
    L = len(cfg.layers)
    mixes = [PrecisionMix("llama.cpp", "q8_0", ("q8_0",) * L, ("q4_0",) * L),
             PrecisionMix("llama.cpp", "q4_0", ("q4_0",) * L, ("q8_0",) * L)]
    db = tmp_path / "m.db"
    for mix in mixes:
        s = sweep(tiny64, "board", db, [cfg], inv, sshd.ssh_config, backend="llama.cpp", mix=mix)
        assert s.measured == 2 and not s.failed, s.failed
    sweep(tiny64, "board", db, [cfg], inv, sshd.ssh_config, backend="llama.cpp", precision="q4_0")
    store = Store(db)
    rows = list(store.measurement_rows())
    store.close()
    want = {f"llama.cpp:mix-{m.digest()}" for m in mixes} | {"llama.cpp:q4_0"}
    assert {r["backend"] for r in rows} == want and all(r["median_ms"] > 0 for r in rows)
    assert s.bytes_uploaded < 200_000  # the mix's header only
