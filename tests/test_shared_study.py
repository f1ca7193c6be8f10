"""Search workers sharing one Optuna study: a journal file, a real PostgreSQL server, the
perplexities claimed so no candidate is evaluated twice."""

from __future__ import annotations

import json
from pathlib import Path

import optuna
import pytest
from rich.console import Console

from search.storage import StorageError, StudyStorage, parse_storage
from search.study import SearchError
from tests.test_search import search, search_args


def _shared_search(tiny_dir, tiny_predictor, tmp_path: Path, storage: str, **kw):
    kw = {"storage": storage, "workers": 2, "study_name": None, "algorithm": "random", "evals": 10,
          "no_baselines": True, **kw}
    args = search_args(tiny_dir, tiny_predictor, tmp_path, **kw)
    return search(args, Console(file=open(tmp_path / "log", "w")))


def _check_shared(res: dict, storage: StudyStorage) -> list:
    trials = optuna.load_study(study_name=res["study"], storage=storage.optuna()).get_trials(
        states=(optuna.trial.TrialState.COMPLETE,))
    evaluated = [t for t in trials if t.user_attrs["evaluated"]]
    assert 10 <= len(evaluated) <= 11  # the workers' trials add up (one may overshoot by its last)
    assert {t.user_attrs["worker"] for t in trials} == {0, 1}  # both workers searched
    return evaluated


def test_two_workers_share_a_journal_study(tiny_dir, tiny_predictor, tmp_path) -> None:
    journal = tmp_path / "shared" / "study.journal"
    res = _shared_search(tiny_dir, tiny_predictor, tmp_path, f"journal:{journal}")
    storage = parse_storage(f"journal:{journal}", tmp_path / "unused.db")
    _check_shared(res, storage)
    values = list(Path(str(journal) + ".perplexity").glob("*/*.json"))
    # every evaluation wrote one value, and no sub-network has two: none was evaluated twice
    assert len(values) == res["ppl_evaluations"] == len({v.name for v in values})
    assert json.loads((tmp_path / "search" / "search.json").read_text())["workers"] == 2


def test_two_workers_share_a_postgresql_study(tiny_dir, tiny_predictor, tmp_path, postgres) -> None:
    import sqlalchemy as sa

    postgres = postgres.url
    res = _shared_search(tiny_dir, tiny_predictor, tmp_path, postgres)
    _check_shared(res, parse_storage(postgres, tmp_path / "unused.db"))
    engine = sa.create_engine(postgres)
    with engine.connect() as c:
        rows = c.execute(sa.text("SELECT config_hash, perplexity FROM edgenas_perplexity")).fetchall()
    engine.dispose()
    assert len(rows) == res["ppl_evaluations"] and all(v is not None for _, v in rows)
    # resuming with more evaluations joins the same study
    again = _shared_search(tiny_dir, tiny_predictor, tmp_path, postgres, evals=14)
    assert again["study"] == res["study"]


def test_a_storage_that_cannot_be_used_is_named(tmp_path) -> None:
    with pytest.raises(StorageError, match="driver 'MySQLdb'") as e:
        parse_storage("mysql://user@127.0.0.1/db", tmp_path / "s.db")
    assert "pip install" in e.value.fix
    with pytest.raises(StorageError, match="does not answer"):
        parse_storage("postgresql://nobody@127.0.0.1:1/db", tmp_path / "s.db")
    with pytest.raises(StorageError, match="neither a database URL nor a journal file"):
        parse_storage("studies", tmp_path / "s.db")


def test_a_study_name_made_with_other_settings_is_refused(tiny_ws, tiny_predictor, tmp_path) -> None:
    from predictor.workload import LatencyObjective, Workload
    from search.study import run_search

    obj = LatencyObjective.load(tiny_predictor, Workload(16, 8), "local", tiny_ws.base.base_id)
    storage = parse_storage(None, tmp_path / "s.db")
    run_search(tiny_ws, obj, "random", 3, 1e9, storage, seed=1, study_name="mine")
    with pytest.raises(SearchError, match=r"study 'mine' .* was made with other settings \(budget_ms differ\)"):
        run_search(tiny_ws, obj, "random", 3, 1e8, storage, seed=1, study_name="mine")
    assert len(run_search(tiny_ws, obj, "random", 5, 1e9, storage, seed=1, study_name="mine").points) == 5


def test_a_stopped_workers_running_trial_is_failed_and_its_candidate_queued_again(tiny_ws, tiny_predictor,
                                                                                  tmp_path) -> None:
    """A worker killed mid-trial leaves it RUNNING: the next worker to start fails it and
    queues its candidate again, so none is lost; a live worker's running trial is left alone."""
    import subprocess

    from predictor.workload import LatencyObjective, Workload
    from profiler.owner import owner_id
    from search.encoding import Encoding
    from search.study import run_search

    obj = LatencyObjective.load(tiny_predictor, Workload(16, 8), "local", tiny_ws.base.base_id)
    storage = parse_storage(f"journal:{tmp_path / 's.journal'}", tmp_path / "unused.db")
    run_search(tiny_ws, obj, "random", 3, 1e9, storage, seed=1, study_name="mine")
    study = optuna.load_study(study_name="mine", storage=storage.optuna())
    enc = Encoding(tiny_ws.space, tiny_ws.importance.layer_ranking(), "per-layer")
    gone = subprocess.Popen(["true"])
    gone.wait()
    stopped, live = study.ask(), study.ask()
    for trial, owner in ((stopped, f"{owner_id().split(':')[0]}:{gone.pid}:x"), (live, owner_id())):
        enc.suggest(trial)
        trial.set_user_attr("owner", owner)
    run_search(tiny_ws, obj, "random", 5, 1e9, storage, seed=1, study_name="mine")
    trials = {t.number: t for t in study.get_trials()}
    assert trials[stopped.number].state == optuna.trial.TrialState.FAIL
    assert trials[live.number].state == optuna.trial.TrialState.RUNNING
    again = [t for t in trials.values() if t.params == trials[stopped.number].params and t.number != stopped.number]
    assert [t.state for t in again] == [optuna.trial.TrialState.COMPLETE]
