"""Quality beyond perplexity: downstream-task accuracy through lm-evaluation-harness
(``pip install 'edgenas[eval]'``), offline.

Tasks are lm-eval task names whose data the user has locally, task YAML files in an
``--include-path`` folder, or a JSON-lines file of multiple-choice items
(``{"question": ..., "choices": [...], "answer": index}``), turned into an lm-eval task on the
fly. Nothing is downloaded: the datasets library runs offline."""

from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any

from subnets.errors import InputFileError

MC_TEMPLATE = """task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {path}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}\\nAnswer:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""


def _require_lm_eval() -> Any:
    try:
        import lm_eval
    except ImportError:
        raise InputFileError("downstream tasks need lm-evaluation-harness, which is not installed",
                             "pip install 'edgenas[eval]' (lm-eval and datasets)") from None
    return lm_eval


def _check_mc_file(path: Path) -> None:
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as e:
            raise InputFileError(f"{path}, line {n}: not valid JSON ({e.msg})", "one item per line") from None
        ok = (isinstance(item, dict) and isinstance(item.get("question"), str) and isinstance(item.get("choices"), list)
              and isinstance(item.get("answer"), int) and 0 <= item["answer"] < len(item["choices"]))
        if not ok:
            raise InputFileError(f"{path}, line {n}: not a multiple-choice item",
                                 'write {"question": "...", "choices": ["...", "..."], "answer": 0}')


def task_specs(tasks: list[str], workdir: Path) -> tuple[list[str], list[str]]:
    """(task names, include paths): JSONL files become generated multiple-choice tasks."""
    names, includes = [], []
    for t in tasks:
        p = Path(t).expanduser()
        if p.suffix == ".jsonl":
            if not p.is_file():
                raise InputFileError(f"task file {p} does not exist", "pass a JSON-lines file of multiple-choice items")
            _check_mc_file(p)
            name = "edgenas_" + re.sub(r"[^A-Za-z0-9_]", "_", p.stem)
            (workdir / f"{name}.yaml").write_text(MC_TEMPLATE.format(name=name, path=str(p.resolve())))
            names.append(name)
            if str(workdir) not in includes:
                includes.append(str(workdir))
        else:
            names.append(t)
    return names, includes


def evaluate_tasks(model: Any, tokenizer: Any, tasks: list[str], include_path: str | None = None,
                   limit: int | None = None, batch_size: int = 4) -> dict[str, dict[str, float]]:
    """Task metrics of a loaded causal LM (any HF model, a sub-network included)."""
    lm_eval = _require_lm_eval()
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    with tempfile.TemporaryDirectory(prefix="edgenas-tasks-") as tmp:
        names, includes = task_specs(tasks, Path(tmp))
        if include_path:
            includes.append(str(Path(include_path).expanduser()))
        # indexing lm-eval's own thousands of task files takes seconds: only when named
        own = all(n.startswith("edgenas_") for n in names) and not include_path
        manager = TaskManager(include_path=includes or None, include_defaults=not own)
        unknown = [n for n in names if n not in manager.all_tasks]
        if unknown:
            raise InputFileError(f"unknown lm-eval task(s): {', '.join(unknown)}",
                                 "name tasks lm-eval knows, pass a .jsonl file of multiple-choice items, or add "
                                 "--include-path with your task YAML files")
        kw = {}
        if tokenizer.bos_token_id is None and tokenizer.eos_token_id is None:
            # lm-eval needs a prefix token for context-free requests; a tokenizer without BOS
            # and EOS (a test model) gets token 0, which multiple-choice scoring never uses
            kw["prefix_token_id"] = 0
        lm = HFLM(pretrained=model.eval(), tokenizer=tokenizer, batch_size=batch_size, **kw)
        out = lm_eval.simple_evaluate(model=lm, tasks=names, task_manager=manager, limit=limit,
                                      log_samples=False)
    results: dict[str, dict[str, float]] = {}
    for task, metrics in out["results"].items():
        results[task] = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and k != "alias"}
    return results
