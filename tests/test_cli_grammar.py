"""One command-line grammar: `edgenas <verb>` for everything, the console scripts as aliases
of the same parsers, one name per concept, and `--config run.toml`."""

from __future__ import annotations

import argparse
import json

import pytest

from edgenas.cli import VERBS, build_parser, main


def _options(p: argparse.ArgumentParser) -> set[str]:
    return {s for a in p._actions for s in a.option_strings if s not in ("-h", "--help")}


def _verb_parser(name: str) -> argparse.ArgumentParser:
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices[name]


def _help_options(text: str) -> set[str]:
    """The option strings an argparse --help lists (its option lines, not its prose)."""
    import re

    found = set()
    for line in text.splitlines():
        if re.match(r"^\s{2,}-", line):
            found |= set(re.findall(r"(?<![\w-])--?[A-Za-z][\w-]*", line.strip().split("  ")[0]))
    return found - {"-h", "--help"}


@pytest.mark.parametrize("verb", [v for v in VERBS if v.alias], ids=lambda v: v.alias)
def test_each_console_script_is_the_same_parser_as_its_verb(verb) -> None:
    """The installed entry point, run as a user runs it, offers exactly the verb's flags."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    script = Path(sys.executable).parent / verb.alias
    assert script.is_file(), f"console script {verb.alias} is not installed next to {sys.executable}"
    res = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "COLUMNS": "250"})
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith(f"usage: {verb.alias}")
    assert _help_options(res.stdout) == _options(_verb_parser(verb.name))


# each command's typed request, and the fields its command sets from several flags at once
REQUESTS = {
    "pipeline": ("edgenas.pipeline", "PipelineRequest", set()),
    "profile": ("profiler.request", "SweepRequest", {"sweep_spec"}),
    "train-predictor": ("predictor.fitting", "PredictorRequest", set()),
    "search": ("search.request", "SearchRequest", set()),
    "export": ("export.request", "ExportRequest", set()),
    "train-supernet": ("training.request", "SupernetRequest", {"settings"}),
    "finetune": ("training.request", "FinetuneRequest", {"settings"}),
    "mix": ("search.mix_allocation", "MixRequest", set()),
}


@pytest.mark.parametrize("verb", sorted(REQUESTS))
def test_each_request_field_is_a_flag_of_its_command_with_the_same_default(verb) -> None:
    """The parser and the request cannot drift: every field is a flag (its dest), and a flag
    left out means what the request's default means."""
    import dataclasses
    import importlib
    from pathlib import Path

    module, name, derived = REQUESTS[verb]
    cls = getattr(importlib.import_module(module), name)
    actions = {a.dest: a for a in _verb_parser(verb)._actions}
    for f in dataclasses.fields(cls):
        if f.name in derived:
            continue
        assert f.name in actions, f"{name}.{f.name} has no flag in `edgenas {verb}`"
        if f.default is dataclasses.MISSING or actions[f.name].required:
            continue

        def norm(v):
            return tuple(v) if isinstance(v, list) else Path(v) if isinstance(v, Path) else v

        assert norm(actions[f.name].default) == norm(f.default), f"{verb} --{f.name}: parser and request defaults differ"


def test_one_name_per_concept_across_commands() -> None:
    from subnets.space import DEFAULT_GRANULARITY, GRANULARITIES

    for name in ("sample", "profile", "search", "pipeline"):
        action = next(a for a in _verb_parser(name)._actions if "--granularity" in a.option_strings)
        assert tuple(action.choices) == GRANULARITIES and action.default == DEFAULT_GRANULARITY == "tapered"
    for name in ("sample", "profile", "pipeline"):
        assert "--samples" in _options(_verb_parser(name))
    for name in ("export", "finetune", "evaluate", "profile", "predict"):
        assert "--configs" in _options(_verb_parser(name))
    assert "--phases" in _options(_verb_parser("train-predictor")) and "--phases" in _options(_verb_parser("profile"))
    for name in ("search", "train-predictor"):
        assert "--device" in _options(_verb_parser(name))
    for name in ("profile", "pipeline"):
        assert "--host" in _options(_verb_parser(name))
    assert all("--config" in _options(_verb_parser(v.name)) for v in VERBS)


def test_old_spellings_still_work(tiny_dir, tmp_path, capsys) -> None:
    assert main(["sample", "--model", str(tiny_dir), "--neuron-step", "16", "--n", "2"]) == 0
    old = capsys.readouterr().out
    assert main(["sample", "--model", str(tiny_dir), "--neuron-step", "16", "--samples", "2"]) == 0
    assert capsys.readouterr().out == old
    cfg = tmp_path / "c.jsonl"
    cfg.write_text(old)
    assert main(["export", "--model", str(tiny_dir), "--neuron-step", "16", "--config", str(cfg), "--out",
                 str(tmp_path / "o"), "--no-perplexity"]) == 0
    assert "now --configs" in capsys.readouterr().err.replace("\n", " ") and (tmp_path / "o" / "summary.json").is_file()


def test_a_run_file_holds_the_flags_and_the_command_line_overrides_it(tiny_dir, tmp_path, capsys) -> None:
    run = tmp_path / "run.toml"
    run.write_text(f'model = "{tiny_dir}"\nneuron_step = 16\nseed = 3\n[sample]\nsamples = 3\n'
                   '[search]\nevals = 9\n')
    assert main(["sample", "--config", str(run)]) == 0
    from_file = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert main(["sample", "--model", str(tiny_dir), "--neuron-step", "16", "--seed", "3", "--samples", "3"]) == 0
    assert [json.loads(line) for line in capsys.readouterr().out.splitlines()] == from_file and len(from_file) == 3
    assert main(["sample", "--config", str(run), "--samples", "1"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 1


@pytest.mark.parametrize(("text", "needle"), [
    ("sampels = 3\n", "'sampels' is not a setting of edgenas sample"),
    ("samples = [3\n", "is not valid TOML"),
    ("random_layers = 3\n", "is a switch"),
])
def test_a_bad_run_file_is_named(text, needle, tmp_path, capsys) -> None:
    run = tmp_path / "run.toml"
    run.write_text(text)
    assert main(["sample", "--config", str(run)]) == 2
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err


def test_tapered_sampling_matches_the_searched_genome(tiny_ws) -> None:
    import random

    from search.encoding import Encoding

    ranking = tiny_ws.importance.layer_ranking()
    configs = tiny_ws.space.sample(20, 4, granularity="tapered", layer_ranking=ranking)
    enc = Encoding(tiny_ws.space, ranking, "tapered")
    for c in configs:
        tiny_ws.space.validate(c)
        assert sorted(lc.layer for lc in c.layers) == sorted(ranking[: len(c.layers)])
        assert len({(lc.kv_groups, lc.heads_per_group) for lc in c.layers}) == 1
    rng = random.Random(0)
    for _ in range(20):
        k, g, h = rng.randint(1, 4), rng.randint(1, 2), rng.randint(1, 3)
        n, t = rng.randrange(len(tiny_ws.space.neuron_choices())), rng.randint(-2, 2)
        params = {"layers": k, "g0": g, "h0": h, "n0": n, "taper": t}
        assert enc.decode(params) == tiny_ws.space.tapered(ranking, k, g, h, n, t)
