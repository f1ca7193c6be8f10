from __future__ import annotations

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
