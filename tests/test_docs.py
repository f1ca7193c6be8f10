"""The README and docs/ describe the code as it is: every command and flag they show exists,
every link resolves inside the repository, the command reference is current, and the Python
API example runs."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
ALIASES = {"profile-device": "profile", "train-predictor": "train-predictor", "evaluate-predictor": "evaluate-predictor",
           "predict-latency": "predict", "search-subnets": "search"}


def _verb_options() -> dict[str, set[str]]:
    from edgenas.cli import build_parser

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return {name: {s for a in p._actions for s in a.option_strings} for name, p in sub.choices.items()}


def _commands(text: str) -> list[str]:
    """Command lines shown in a page: code-block lines (continuations joined) and code spans."""
    lines: list[str] = []
    for block in re.findall(r"```[a-z]*\n(.*?)```", text, flags=re.S):
        lines += block.replace("\\\n", " ").splitlines()
    lines += re.findall(r"`([^`\n]+)`", re.sub(r"```.*?```", "", text, flags=re.S))
    return [line for line in lines if "--" in line or "edgenas " in line]


def _benchmark_flags(name: str) -> set[str]:
    return set(re.findall(r"add_argument\(\s*\"(--[a-z0-9-]+)\"", (ROOT / "benchmarks" / name).read_text()))


def test_every_command_and_flag_shown_exists() -> None:
    verbs = _verb_options()
    problems = []
    for page in PAGES:
        for line in _commands(page.read_text()):
            for cmd in re.split(r"[;|]|&&", line):
                m = re.search(r"(?:^|\s|/)(edgenas|" + "|".join(ALIASES) + r")(?:\s+([a-z-]+))?", cmd)
                bench = re.search(r"benchmarks/([a-z_]+\.py)", cmd)
                start = bench.end() if bench else (m.end() if m else 0)
                flags = set(re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]*)", cmd[start:]))  # the command's own flags
                if bench:
                    known = _benchmark_flags(bench.group(1)) | {"--help"}
                elif m and m.group(1) == "edgenas" and m.group(2):
                    if m.group(2) not in verbs:
                        if m.group(2) not in ("pipeline",) and cmd.strip().startswith("edgenas"):
                            problems.append(f"{page.name}: unknown command `edgenas {m.group(2)}` in {cmd!r}")
                        continue
                    known = verbs[m.group(2)] | {"--help"}
                elif m and m.group(1) in ALIASES:
                    known = verbs[ALIASES[m.group(1)]] | {"--help"}
                else:
                    continue
                problems += [f"{page.name}: {f} is not a flag of {cmd.strip()[:60]!r}" for f in sorted(flags - known)]
    assert not problems, "\n".join(problems)


def test_every_link_resolves_inside_the_repository() -> None:
    problems = []
    for page in PAGES:
        text = page.read_text()
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if target.startswith(("http://", "https://", "#", "mailto:")):
                continue
            path = (page.parent / target.split("#")[0]).resolve()
            if not path.exists() or (ROOT not in path.parents and path != ROOT):
                problems.append(f"{page.name}: link {target} does not resolve")
    assert not problems, "\n".join(problems)


def test_the_command_reference_is_current() -> None:
    from edgenas.clidoc import splice

    text = (ROOT / "docs" / "cli.md").read_text()
    assert splice(text) == text, "docs/cli.md is stale: run python -m edgenas.clidoc --write"


def test_the_readme_is_a_front_page() -> None:
    size = len((ROOT / "README.md").read_text().encode())
    assert 6_000 <= size <= 11_000, size


def test_the_api_example_runs(tiny_dir, tmp_path, monkeypatch) -> None:
    text = (ROOT / "docs" / "api.md").read_text()
    code = re.search(r"```python\n(.*?)```", text, flags=re.S).group(1)
    settings = re.search(r"^MODEL, HOST, OUT, WORKLOAD, SAMPLES, EVALS = .*$", code, flags=re.M)
    assert settings, "the example's settings line moved"
    code = code.replace(settings.group(0), f'MODEL, HOST, OUT, WORKLOAD, SAMPLES, EVALS = "{tiny_dir}", "local", '
                                           f'"{tmp_path}", (16, 8), 14, 6')
    # sub-millisecond cells of a tiny model timed for 0.02 s: on a busy machine a third of them can
    # read "unstable" at the default 10% robust CoV, leaving too few to train on
    code = code.replace('"min_time_s": 0.5, "max_time_s": 5.0',
                        '"min_time_s": 0.02, "max_time_s": 0.2, "min_runs": 5, "unstable_cov": 0.5')
    code = code.replace("edgenas.open_model(MODEL)", "edgenas.open_model(MODEL, neuron_step=16, eval_tokens=256)")
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "docs/api.md", "exec"), {})
    assert (tmp_path / "export").is_dir() and (tmp_path / "predictors" / "prefill" / "meta.json").is_file()


@pytest.mark.parametrize("name", ["export", "latency_objective", "measurements", "open_model", "predicted_latency",
                                  "profile", "sample", "search", "train_predictors"])
def test_the_api_is_documented(name: str) -> None:
    import edgenas

    fn = getattr(edgenas, name)
    assert fn.__doc__ and len(fn.__doc__) > 40
    assert f"`{name}(" in (ROOT / "docs" / "api.md").read_text()


LAYERS = ("subnets", "export", "profiler", "predictor", "training", "search", "edgenas")


def _modules() -> dict[str, Path]:
    found = {}
    for pkg in (*LAYERS, "device_agents"):
        for f in sorted((ROOT / pkg).rglob("*.py")):
            if f.name != "__init__.py" and "hf_modeling" not in f.parts:
                found[".".join(f.relative_to(ROOT).with_suffix("").parts)] = f
    return found


def _imports(path: Path) -> set[str]:
    """First-party modules a file imports, at module level or inside functions."""
    import ast

    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
            names |= {f"{node.module}.{a.name}" for a in node.names}
    return {n for n in names if n.split(".")[0] in (*LAYERS, "device_agents")}


def test_the_design_page_lists_every_module() -> None:
    layout = (ROOT / "docs" / "design.md").read_text().split("## Layout", 1)[1]
    missing = [m for m, f in _modules().items() if f.name not in layout]
    assert not missing, f"docs/design.md's layout does not name {missing}"


def test_dependencies_run_one_way_without_circles() -> None:
    """No package imports one above it (device_agents imports no host code and no host code
    imports it), and no two modules import each other, directly or around a circle."""
    modules = _modules()
    graph = {m: {i for i in _imports(f) if i in modules} for m, f in modules.items()}
    for m, deps in graph.items():
        pkg = m.split(".")[0]
        for d in deps:
            other = d.split(".")[0]
            if "device_agents" in (pkg, other):
                assert pkg == other, f"{m} imports {d}: the board program and the host share no code"
            else:
                assert LAYERS.index(other) <= LAYERS.index(pkg), f"{m} imports {d}, a layer above it"
    state: dict[str, int] = {}

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for d in graph[m]:
            assert state.get(d) != 1, f"import circle: {' -> '.join([*path, m, d])}"
            if d not in state:
                visit(d, [*path, m])
        state[m] = 2

    for m in graph:
        if m not in state:
            visit(m, [])


def test_no_library_or_command_function_is_long() -> None:
    """A long function is a concept not yet named: none over 60 lines outside benchmarks/tests."""
    import ast

    long = []
    for m, f in _modules().items():
        if m.startswith("device_agents"):
            continue
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno >= 60:
                long.append(f"{m}.{node.name} ({node.end_lineno - node.lineno + 1} lines)")
    assert not long, long
