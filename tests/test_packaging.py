"""What the package declares matches what its code imports."""

from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("subnets", "export", "profiler", "predictor", "training", "search", "edgenas")
# import name -> distribution name, where they differ
DISTRIBUTION = {"sklearn": "scikit-learn", "huggingface_hub": "huggingface-hub", "lm_eval": "lm-eval"}


def _pyproject() -> dict:
    try:
        import tomllib
    except ImportError:  # Python 3.10
        import tomli as tomllib

    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def _third_party_imports() -> dict[str, set[str]]:
    found: dict[str, set[str]] = {}
    for pkg in PACKAGES:
        for f in (ROOT / pkg).rglob("*.py"):
            for node in ast.walk(ast.parse(f.read_text())):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                    [node.module] if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module else []
                for name in names:
                    top = name.split(".")[0]
                    if top not in sys.stdlib_module_names and top not in (*PACKAGES, "device_agents", "tomli"):
                        found.setdefault(top, set()).add(str(f.relative_to(ROOT)))
    return found


def _names(specs: list[str]) -> dict[str, str]:
    return {re.split(r"[<>=!~;\[ ]", s, maxsplit=1)[0].lower(): s for s in specs}


def test_every_imported_distribution_is_declared() -> None:
    project = _pyproject()["project"]
    declared = _names(project["dependencies"])
    extras = {name for specs in project["optional-dependencies"].values() for name in _names(specs)}
    missing = {m: sorted(files) for m, files in _third_party_imports().items()
               if DISTRIBUTION.get(m, m).lower() not in declared and DISTRIBUTION.get(m, m).lower() not in extras}
    assert not missing, f"imported but not declared in pyproject.toml: {missing}"


def test_declared_dependencies_are_used_and_minimums_hold() -> None:
    declared = _names(_pyproject()["project"]["dependencies"])
    imported = {DISTRIBUTION.get(m, m).lower() for m in _third_party_imports()}
    # needed at run time without an import of their own: the agent's runtime and GGUF reading
    indirect = {"onnxruntime", "gguf", "tomli"}
    assert not set(declared) - imported - indirect, "declared but never imported"
    assert re.search(r"optuna>=([5-9]|\d\d)", declared["optuna"]), "Trial.set_constraint needs Optuna 5"
    import optuna

    assert hasattr(optuna.trial.Trial, "set_constraint")


def test_every_package_of_the_tree_is_installed() -> None:
    """A package left out of setuptools' list imports from a checkout but not once installed."""
    include = _pyproject()["tool"]["setuptools"]["packages"]["find"]["include"]
    packages = {d.name for d in ROOT.iterdir() if (d / "__init__.py").is_file()} - {"tests", "benchmarks"}
    assert packages == {*PACKAGES, "device_agents"}
    assert sorted(f"{p}*" for p in packages) == sorted(include)
