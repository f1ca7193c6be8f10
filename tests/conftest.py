from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.tiny import make_tiny_model


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    # Tests never write to the user's cache, except the converted SmolLM2 folder that the
    # slow tests share (see smollm2_base).
    monkeypatch.setenv("EDGENAS_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "tiny-llama")


@pytest.fixture(scope="session")
def tiny_base(tiny_dir: Path):
    from subnets.basemodel import load_base_model

    return load_base_model(tiny_dir)


@pytest.fixture(scope="session")
def tiny_importance(tiny_base):
    from subnets.importance import compute_importance
    from subnets.quality import tokenize
    from subnets.textdata import stdlib_docstrings

    tokens = tokenize(stdlib_docstrings("calibration", 20_000), tiny_base.tokenizer, budget=512, window=128)
    return compute_importance(tiny_base, tokens)


_USER_CACHE = None


def _user_cache() -> str:
    global _USER_CACHE
    if _USER_CACHE is None:
        import os

        from subnets.paths import cache_dir

        saved = os.environ.pop("EDGENAS_CACHE", None)
        try:
            _USER_CACHE = str(cache_dir())
        finally:
            if saved is not None:
                os.environ["EDGENAS_CACHE"] = saved
    return _USER_CACHE


_user_cache()  # resolved before any test redirects the cache


@pytest.fixture(scope="session")
def smollm2():
    """The real SmolLM2-135M workspace; its converted folder and importance live in the user
    cache dir, so only the first run anywhere pays the ~20 s conversion."""
    import os
    from unittest import mock

    from subnets.workspace import Workspace

    with mock.patch.dict(os.environ, {"EDGENAS_CACHE": _user_cache()}):
        return Workspace.open("smollm2", eval_budget=1024)


def _unavailable(why: str) -> None:
    """A server fixture that cannot start: skipped on a developer's machine, a failure where
    the run must test everything (EDGENAS_REQUIRE_SERVERS=1, as .ci/run sets): CI must not
    pass quietly on skipped SSH or PostgreSQL tests."""
    if os.environ.get("EDGENAS_REQUIRE_SERVERS") == "1":
        pytest.fail(why, pytrace=False)
    pytest.skip(why)


@pytest.fixture(scope="session")
def sshd(tmp_path_factory: pytest.TempPathFactory):
    from tests.sshd import LoopbackSSHD, ensure_sshd

    if ensure_sshd() is None:
        _unavailable("OpenSSH server not available (install Debian's openssh-server; .ci/run does)")
    server = LoopbackSSHD(tmp_path_factory.mktemp("sshd"))
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def tiny_ws(tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    import os
    from unittest import mock

    from subnets.workspace import Workspace

    with mock.patch.dict(os.environ, {"EDGENAS_CACHE": str(tmp_path_factory.mktemp("wscache"))}):
        return Workspace.open(tiny_dir, neuron_step=16, eval_budget=256)


def measured_as(phase: str, threads: int = 2) -> dict:
    """How a predictor's data was measured, as train-predictor records it: what --verify
    must reproduce (2 threads here, so a test can tell it from the old hard-coded 1)."""
    from export.onnx_graphs import min_ir_version
    from profiler.protocol import Protocol
    from tests.helpers import FAST_TIMING

    p = Protocol(timing=dict(FAST_TIMING), opset=17, ir_version=min_ir_version(17))
    return {"threads": threads, "backend": "ort-cpu", "protocol": p.digest, "protocol_record": p.to_dict()}


@pytest.fixture(scope="session")
def tiny_predictor(tiny_ws, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Prefill and decode predictors for the tiny model on a synthetic device named 'local'."""
    import numpy as np

    from predictor.features import ConfigBatch
    from predictor.model import BoostedCostModel
    from predictor.persist import save_predictor
    from tests.helpers import roofline_latency

    folder = tmp_path_factory.mktemp("pred")
    configs = tiny_ws.space.sample(40, 0)
    batch = ConfigBatch.from_configs(configs, tiny_ws.space.dims.num_layers)
    rng = np.random.default_rng(0)
    for phase in ("prefill", "decode"):
        seq = rng.choice([16, 32, 64], 40).astype(float) if phase == "prefill" else np.ones(40)
        past = np.zeros(40) if phase == "prefill" else rng.choice([16, 48, 96], 40).astype(float)
        y = roofline_latency(configs, tiny_ws.space.dims, phase, seq, past, 0.01, seed=1, peak=1e6, bw=2e6, launch=0.3)
        p = BoostedCostModel(tiny_ws.space.dims, phase).fit(batch, seq, past, y)
        save_predictor(p, folder / phase, "local", "fp-local", tiny_ws.base.base_id, "synthetic", measured_as(phase))
    return folder


@pytest.fixture(scope="session")
def postgres():
    """A real PostgreSQL server (Debian's postgresql) on a loopback port, in a throwaway data
    directory. The server refuses to run as root, so root runs it as 'postgres'."""
    from tests.pgserver import PostgresServer, find_postgres

    bindir = find_postgres()
    if bindir is None:
        _unavailable("PostgreSQL not available (install Debian's postgresql; .ci/run does)")
    server = PostgresServer(bindir)
    server.start()
    yield server
    server.stop()


@pytest.fixture
def pg_store(postgres, request):
    """A fresh database on the session's PostgreSQL server, for a measurement store; its URL."""
    import re

    return postgres.new_database("t_" + re.sub(r"\W", "_", request.node.name.lower())[:50])


@pytest.fixture(scope="session")
def tiny64(tmp_path_factory: pytest.TempPathFactory):
    """A tiny Llama whose rows split into 32-value blocks everywhere (hidden 64): GGUF block
    types and precision mixes quantize every tensor of it."""
    from unittest import mock

    from subnets.workspace import Workspace

    folder = make_tiny_model(tmp_path_factory.mktemp("t64") / "tiny64", hidden=64, heads=4, kv_heads=2, head_dim=16)
    with mock.patch.dict(os.environ, {"EDGENAS_CACHE": str(tmp_path_factory.mktemp("t64cache"))}):
        return Workspace.open(str(folder), neuron_step=32, eval_budget=256)
