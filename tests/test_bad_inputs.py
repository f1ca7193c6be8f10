"""Every bad input in docs/troubleshooting.md's table, through the real command lines: one clear message
naming the problem, exit status 2, no traceback."""

from __future__ import annotations

import json
import sqlite3
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from edgenas.cli import main as edgenas
from edgenas.commands.predictor import evaluate_main, predict_main, train_main
from edgenas.commands.profile import main as profile_device
from edgenas.commands.search import main as search_subnets

Case = Callable[[dict], tuple[Callable[[list[str]], int], list[str]]]


@pytest.fixture
def env(tiny_dir, tiny_base, tiny_predictor, sshd, tmp_path) -> dict:
    good = tiny_base.space(16).full().to_json()
    cfg = tmp_path / "c.jsonl"
    cfg.write_text(good + "\n")
    inv = sshd.inventory(tmp_path / "inv.toml", sys.executable, tmp_path / "remote")
    return {"model": str(tiny_dir), "good": good, "cfg": cfg, "tmp": tmp_path, "inv": inv, "sshd": sshd,
            "pred": tiny_predictor, "base_id": tiny_base.base_id}


def write(path: Path, text: str | bytes) -> Path:
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text)
    return path


def export(e: dict, *extra: str) -> list[str]:
    return ["export", "--model", e["model"], "--neuron-step", "16", "--config", str(e["cfg"]), "--out", str(e["tmp"] / "o"),
            *extra]


def profile(e: dict, *extra: str, ssh_config: Path | None = None, inventory: Path | None = None) -> list[str]:
    return ["--host", "board", "--inventory", str(inventory or e["inv"]), "--ssh-config", str(ssh_config or e["sshd"].ssh_config),
            "--model", e["model"], "--neuron-step", "16", "--samples", "1", "--db", str(e["tmp"] / "m.db"),
            "--min-time", "0.02", "--max-time", "0.2", *extra]


def ssh_variant(e: dict, old: str, new: str) -> Path:
    return write(e["tmp"] / "ssh_config2", e["sshd"].ssh_config.read_text().replace(old, new))


def search(e: dict, *extra: str, predictor: Path | None = None) -> list[str]:
    return ["--device", "local", "--predictor", str(predictor or e["pred"]), "--latency-budget-ms", "1000", "--model", e["model"],
            "--neuron-step", "16", "--evals", "2", "--out", str(e["tmp"] / "s"), "--quality-tokens", "256", *extra]


def study_made_elsewhere(e: dict) -> list[str]:
    """A search whose --study-name already holds a study of another budget."""
    assert search_subnets(search(e, "--study-name", "mine", "--no-baselines")) == 0
    return search(e, "--study-name", "mine", "--latency-budget-ms", "900")


def grouped_inventory(e: dict) -> Path:
    return write(e["tmp"] / "groups.toml", Path(e["inv"]).read_text() + '[groups]\npair = ["board"]\n')


def train(e: dict, *extra: str, out: str = "t") -> list[str]:
    data = e["tmp"] / "train.txt"
    if not data.exists():
        from subnets.textdata import stdlib_docstrings

        data.write_text(stdlib_docstrings("calibration", 20_000).text)
    argv = ["train-supernet", "--model", e["model"], "--neuron-step", "16", "--steps", "1", "--batch-size", "2",
            "--seq-len", "32", "--data", str(data), "--out", str(e["tmp"] / out), *extra]
    # the last --data wins in argparse for nargs="+": drop the default file when a case gives its own
    if extra.count("--data"):
        i = argv.index("--data")
        del argv[i : i + 2]
    return argv


def foreign_supernet(e: dict) -> Path:
    from training.recovery import RunInfo
    from training.settings import TrainSettings

    folder = e["tmp"] / "foreign"
    RunInfo("supernet", "other-model@123456789abc", "other", TrainSettings(), [0.1] * 4, "activation").write(folder)
    return folder


def changed_resume(e: dict) -> list[str]:
    assert edgenas(train(e, out="r")) == 0
    return train(e, "--lr", "1e-3", out="r")


def edited_predictor(e: dict) -> Path:
    import shutil

    dst = e["tmp"] / "pred"
    shutil.copytree(e["pred"], dst)
    meta = dst / "prefill" / "meta.json"
    d = json.loads(meta.read_text())
    d["scores"] = [0.0 for _ in d["scores"]]  # someone "tightening" the bound by hand
    meta.write_text(json.dumps(d))
    return dst / "prefill"


def bare_predictor(e: dict) -> Path:
    """The test predictors, saved without the record of how their data was measured."""
    from predictor.persist import load_predictor, save_predictor

    for phase in ("prefill", "decode"):
        p, meta = load_predictor(e["pred"] / phase)
        save_predictor(p, e["tmp"] / "bare" / phase, meta["device_name"], meta["device_fingerprint"], meta["base_id"], "x")
    return e["tmp"] / "bare"


def small_store(e: dict) -> Path:
    """A store with 3 measurements of device 'local': too few to train on."""
    from subnets.workspace import Workspace
    from tests.helpers import sweep

    ws = Workspace.open(e["model"], neuron_step=16, eval_budget=256)
    db = e["tmp"] / "small.db"
    sweep(ws, "local", db, ws.space.sample(3, 1), phases=("prefill",))
    return db


def bad_store(e: dict) -> Path:
    from profiler.store import Store

    db = e["tmp"] / "old.db"
    Store(db).close()
    with sqlite3.connect(db) as c:
        c.execute("UPDATE meta SET value='99' WHERE key='schema_version'")
    return db


# (id, needle, build(env) -> (cli, argv))
CASES: list[tuple[str, str, Case]] = [
    ("model folder missing", "not found: no such file or folder",
     lambda e: (edgenas, [*export(e)[:2], str(e["tmp"] / "nowhere"), *export(e)[3:]])),
    ("model is not Llama-family", "Llama-family decoders only",
     lambda e: (edgenas, ["space", "--model", str(write(e["tmp"] / "config.json", '{"model_type": "bert"}').parent)])),
    ("layer index out of range", "out of range 0..3",
     lambda e: (edgenas, export(e, "--config", str(write(e["tmp"] / "b.jsonl", e["good"].replace('"layer":3', '"layer":7')))))),
    ("heads break GQA", "breaks GQA",
     lambda e: (edgenas, export(e, "--config", str(write(e["tmp"] / "b.jsonl", e["good"].replace('"kv_groups":2', '"kv_groups":5')))))),
    ("neurons off the step", "off the step",
     lambda e: (edgenas, export(e, "--config", str(write(e["tmp"] / "b.jsonl", e["good"].replace('"neurons":128', '"neurons":100')))))),
    ("config for another base model", "is for base model",
     lambda e: (edgenas, export(e, "--config", str(write(e["tmp"] / "b.jsonl", e["good"].replace(e["base_id"], "x@1")))))),
    ("configs file: invalid line", "line 2: not valid JSON",
     lambda e: (edgenas, export(e, "--config", str(write(e["tmp"] / "b.jsonl", e["good"] + "\n{oops\n"))))),
    ("text file not UTF-8", "not UTF-8",
     lambda e: (edgenas, export(e, "--text", str(write(e["tmp"] / "t.txt", b"\xff\xfe\xfa"))))),
    ("unsupported opset", "opset 5 is not supported", lambda e: (edgenas, export(e, "--opset", "5"))),
    ("model folder without weights", "no weights",
     lambda e: (edgenas, ["space", "--model", str(write(e["tmp"] / "config.json", '{"model_type": "llama"}').parent)])),
    ("configs file missing", "does not exist", lambda e: (edgenas, export(e, "--config", str(e["tmp"] / "absent.jsonl")))),
    ("export index out of range", "--index 3 is out of range", lambda e: (edgenas, export(e, "--index", "3"))),
    ("session count below 1", "is not a session count", lambda e: (profile_device, profile(e, "--decode-sessions", "0"))),
    ("a single interleaved round", "is not a range of rounds", lambda e: (profile_device, profile(e, "--rounds", "1"))),
    ("interleaved rounds with paired timing", "two answers to one problem",
     lambda e: (profile_device, profile(e, "--rounds", "3", "--paired"))),
    ("unknown host alias", "unknown host 'jetson'",
     lambda e: (profile_device, [a if a != "board" else "jetson" for a in profile(e)])),
    ("inventory not TOML", "is not valid TOML",
     lambda e: (profile_device, profile(e, inventory=write(e["tmp"] / "bad.toml", "[hosts.board\n")))),
    ("unreachable host", "cannot reach",
     lambda e: (profile_device, profile(e, ssh_config=ssh_variant(e, f"Port {e['sshd'].port}", "Port 1")))),
    ("unknown host key", "not in known_hosts",
     lambda e: (profile_device, profile(e, ssh_config=ssh_variant(e, str(e["sshd"].known_hosts),
                                                                  str(write(e["tmp"] / "kh", "")))))),
    ("refused authentication", "authentication refused",
     lambda e: (profile_device, profile(e, ssh_config=ssh_variant(e, str(e["sshd"].user_key), str(e["sshd"].host_key))))),
    ("board without onnxruntime", "pip install",
     lambda e: (profile_device, profile(e, inventory=e["sshd"].inventory(e["tmp"] / "i2.toml", "/usr/bin/python3", e["tmp"] / "r2")))),
    ("board without Python", "has no Python",
     lambda e: (profile_device, profile(e, inventory=e["sshd"].inventory(e["tmp"] / "i3.toml", "/nonexistent/python3", e["tmp"] / "r3")))),
    ("store of an incompatible version", "incompatible edgenas",
     lambda e: (profile_device, [*profile(e), "--db", str(bad_store(e))])),
    ("precision the back-end does not run", "does not run int4",
     lambda e: (profile_device, profile(e, "--backend", "trt", "--precision", "int4"))),
    ("llama.cpp precision that is not a GGUF type", "does not run int4",
     lambda e: (profile_device, profile(e, "--backend", "llama.cpp", "--precision", "int4"))),
    ("llama.cpp with paired timing", "llama-bench times one sequence at a time",
     lambda e: (profile_device, profile(e, "--backend", "llama.cpp", "--paired"))),
    ("board without llama-bench", "the board has no llama.cpp llama-bench",
     lambda e: (profile_device, profile(e, "--backend", "llama.cpp", inventory=e["sshd"].inventory(
         e["tmp"] / "i4.toml", sys.executable, e["tmp"] / "r4", llama_cpp="/nonexistent/llama.cpp/bin")))),
    ("board without the llama.cpp Python binding", "it has no llama-cpp-python",
     lambda e: (profile_device, profile(e, "--backend", "llama.cpp-py", inventory=e["sshd"].inventory(
         e["tmp"] / "i5.toml", sys.executable, e["tmp"] / "r5", llama_cpp="/nonexistent/llama.cpp/bin")))),
    ("unknown board group", "nor is it one of the inventory's groups (pair)",
     lambda e: (profile_device, profile(e, "--host", "orin", inventory=grouped_inventory(e)))),
    ("measurement store server that does not answer", "does not answer",
     lambda e: (profile_device, [*profile(e), "--db", "postgresql://nobody@127.0.0.1:1/db"])),
    ("measurement store URL of another kind", "is not a store a sweep can share",
     lambda e: (profile_device, [*profile(e), "--db", "mysql://nobody@127.0.0.1/db"])),
    ("store merge without a target", "--merge needs --into",
     lambda e: (edgenas, ["measurements", "--merge", str(e["tmp"] / "a.db")])),
    ("store merge of a missing store", "does not exist",
     lambda e: (edgenas, ["measurements", "--merge", str(e["tmp"] / "absent.db"), "--into", str(e["tmp"] / "m.db")])),
    ("fused graph with llama.cpp", "is an onnxruntime graph variant",
     lambda e: (profile_device, profile(e, "--backend", "llama.cpp", "--graph", "fused"))),
    ("bad shape list", "not a comma-separated list", lambda e: (profile_device, profile(e, "--seq-len", "abc"))),
    ("measurement store missing", "does not exist",
     lambda e: (train_main, ["--device", "local", "--db", str(e["tmp"] / "none.db"), "--model", e["model"]])),
    ("too few measurements to train", "at least 10 are needed",
     lambda e: (train_main, ["--device", "local", "--db", str(small_store(e)), "--model", e["model"], "--phase", "prefill"])),
    ("back-end not in the store", "no prefill measurements of back-end ort-cuda",
     lambda e: (train_main, ["--device", "local", "--db", str(small_store(e)), "--model", e["model"], "--phase", "prefill",
                             "--backend", "ort-cuda"])),
    ("device not in the store", "no device 'rpi'",
     lambda e: (train_main, ["--device", "rpi", "--db", str(small_store(e)), "--model", e["model"]])),
    ("predictor file edited", "modified after training",
     lambda e: (predict_main, ["--predictor", str(edited_predictor(e)), "--configs", str(e["cfg"])])),
    ("not a predictor folder", "not a predictor folder",
     lambda e: (evaluate_main, ["--predictor", str(e["tmp"]), "--db", str(e["tmp"] / "m.db")])),
    ("configs for another base model (predictor)", "the predictor is for",
     lambda e: (predict_main, ["--predictor", str(e["pred"] / "prefill"), "--configs",
                               str(write(e["tmp"] / "o.jsonl", e["good"].replace(e["base_id"], "x@1") + "\n"))])),
    ("budget below the smallest sub-network", "below the smallest sub-network",
     lambda e: (search_subnets, search(e, "--latency-budget-ms", "0.0001"))),
    ("predictor for another device", "predicts device 'local', not 'jetson'",
     lambda e: (search_subnets, [*search(e), "--device", "jetson"])),
    ("study storage whose driver is missing", "needs the database driver 'MySQLdb'",
     lambda e: (search_subnets, search(e, "--storage", "mysql://user@127.0.0.1/db"))),
    ("study storage server that does not answer", "does not answer",
     lambda e: (search_subnets, search(e, "--storage", "postgresql://nobody@127.0.0.1:1/db"))),
    ("study name that exists with other settings", "was made with other settings (budget_ms differ)",
     lambda e: (search_subnets, study_made_elsewhere(e))),
    ("main job budget that is not a share", "--budget-share 0.0 is not a share",
     lambda e: (edgenas, ["pipeline", "--model", e["model"], "--budget-share", "0", "--out", str(e["tmp"] / "run")])),
    ("main job with too few samples for its predictors", "--samples 3 is too few",
     lambda e: (edgenas, ["pipeline", "--model", e["model"], "--samples", "3", "--out", str(e["tmp"] / "run")])),
    ("main job at a precision no runtime here has", "give distinct precisions from",
     lambda e: (edgenas, ["pipeline", "--model", e["model"], "--precision", "fp32,q5_k", "--out", str(e["tmp"] / "run")])),
    ("a weight type the runtime lacks in a mix", "onnxruntime has no weight type q4_0",
     lambda e: (edgenas, ["mix", "--model", e["model"], "--neuron-step", "16", "--runtime", "onnxruntime", "--high",
                          "fp32", "--lows", "q4_0", "--out", str(e["tmp"] / "m.json")])),
    ("a K-quant type in a mix", "llama.cpp has no weight type q4_k",
     lambda e: (edgenas, ["mix", "--model", e["model"], "--neuron-step", "16", "--lows", "q4_k",
                          "--out", str(e["tmp"] / "m.json")])),
    ("unknown search algorithm", "invalid choice: 'annealing'", lambda e: (search_subnets, search(e, "--algorithm", "annealing"))),
    ("malformed workload", "is not 'S,N'", lambda e: (search_subnets, search(e, "--workload", "128"))),
    ("searching at a GGUF type with an onnxruntime predictor", "the search asks for q4_0",
     lambda e: (search_subnets, search(e, "--precision", "q4_0"))),
    ("searching at a precision the predictor was not trained on", "the search asks for int4",
     lambda e: (search_subnets, search(e, "--precision", "int4"))),
    ("verifying with a predictor that does not say how it was measured", "does not record how its data was measured",
     lambda e: (search_subnets, search(e, "--verify", "1", predictor=bare_predictor(e)))),
    ("training data missing", "does not exist", lambda e: (edgenas, train(e, "--data", str(e["tmp"] / "none.txt")))),
    ("training data empty", "holds no text",
     lambda e: (edgenas, train(e, "--data", str(write(e["tmp"] / "empty.txt", "  \n"))))),
    ("training steps not positive", "--steps 0 is not positive", lambda e: (edgenas, train(e, "--steps", "0"))),
    ("latency range outside (0, 1]", "outside (0, 1]", lambda e: (edgenas, train(e, "--latency-range", "0.5,1.5"))),
    ("super-network of another base model", "was trained from base model",
     lambda e: (edgenas, [*export(e), "--supernet", str(foreign_supernet(e))])),
    ("resuming training with changed settings", "cannot be resumed", lambda e: (edgenas, changed_resume(e))),
]


@pytest.mark.parametrize(("case", "needle", "build"), CASES, ids=[c[0] for c in CASES])
def test_bad_input(case: str, needle: str, build: Case, env: dict, capsys: pytest.CaptureFixture[str]) -> None:
    if case == "board without onnxruntime":
        import subprocess

        if not Path("/usr/bin/python3").exists() or subprocess.run(["/usr/bin/python3", "-c", "import onnxruntime"],
                                                                   capture_output=True).returncode == 0:
            pytest.skip("needs a system python3 without onnxruntime")
    cli, argv = build(env)
    capsys.readouterr()
    code = cli(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    assert needle in err, err
    assert "Traceback" not in err


def test_the_troubleshooting_page_lists_every_case() -> None:
    readme = (Path(__file__).parent.parent / "docs" / "troubleshooting.md").read_text()
    missing = [c[0] for c in CASES if f"| {c[0]} |" not in readme]
    assert not missing, f"docs/troubleshooting.md's bad-input table lacks: {missing}"
    assert len(CASES) >= 20
