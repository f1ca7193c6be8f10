"""The multi-objective search: Optuna's ask/tell loop over sub-networks, minimizing
perplexity and predicted workload latency under a hard budget on the predicted upper bound.

Algorithms: ``nsga2`` (Optuna's NSGA-II with constraints), ``random`` (the baseline), and
``local`` (random start, then one-step mutations of points on the current front, fed through
the same ask/tell loop with ``enqueue_trial``). The budget is in perplexity evaluations (what
a search costs); candidates the predictor puts over the latency budget are told at once. The
study lives in an Optuna storage (``search.storage``: a local SQLite file by default, or a
PostgreSQL/MySQL server or a journal file), so a crashed search resumes and several workers
share one, each counting the study's evaluations, not its own. Perplexity is shared by config
hash through the same storage, evaluated once across workers; infeasible candidates are never
evaluated for quality."""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from predictor.workload import LatencyObjective
from profiler.owner import owner_alive, owner_id
from search.encoding import Encoding
from search.pareto import hypervolume, pareto_mask
from search.request import ALGORITHMS, SearchError
from search.storage import STALE_S, SharedQuality, StudyStorage, parse_storage
from subnets.config import SubnetConfig
from subnets.cost import count_params

log = logging.getLogger(__name__)

INFEASIBLE_PPL = 1e12


def shared_quality(storage: StudyStorage, ws: Any) -> SharedQuality:
    """``ws.perplexity`` shared by every worker of ``storage``, keyed by what it depends on
    (weights, importance, held-out tokens); values of an older edgenas's per-folder cache
    (``perplexity-<id>.jsonl`` next to a SQLite study) are read, not evaluated again."""
    qid = ws.quality_id()
    seed: dict[str, float] = {}
    if storage.url.startswith("sqlite:///"):
        legacy = Path(storage.url[len("sqlite:///"):]).parent / f"perplexity-{qid}.jsonl"
        for line in legacy.read_text().splitlines() if legacy.is_file() else []:
            try:
                d = json.loads(line)
                seed[d["hash"]] = float(d["perplexity"])
            except (json.JSONDecodeError, KeyError, TypeError, ValueError):
                continue  # a torn last line after a crash
    return SharedQuality(storage.claims(qid), ws.perplexity, seed)


@dataclass
class Deployment:
    """One way to deploy a sub-network: its weight precision, the workspace that judges its
    quality at that precision, the predictors of its latency there. A search over several is
    a search over architecture x precision: each candidate is a sub-network and a precision."""

    precision: str
    ws: Any
    objective: LatencyObjective


@dataclass
class SearchResult:
    points: list[dict[str, Any]]
    front: list[dict[str, Any]]
    hypervolume: float
    seconds: dict[str, float] = field(default_factory=dict)
    ppl_evaluations: int = 0
    study_name: str = ""
    resumed: str = ""  # what happened to the study, for the user: resumed, new, or new because X changed
    repeats: int = 0  # trials that proposed a (config, precision) already judged: told, not evaluated again


def study_identity(ws: Any, objective: LatencyObjective, algorithm: str, granularity: str, seed: int,
                   budget_ms: float, max_params: float) -> dict[str, Any]:
    """Everything that defines the search's objectives and constraints: a study resumes only
    when all of it is the same (the evaluation budget may grow)."""
    wl = objective.workload
    return {"algorithm": algorithm, "granularity": granularity, "seed": seed, "budget_ms": budget_ms,
            "max_params": None if not math.isfinite(max_params) else max_params,
            "quality": ws.quality_id(), "device": objective.device_name,
            "predictor": dict(objective.digests), "workload": [wl.prompt_len, wl.gen_tokens],
            "space": ws.space.dims.to_dict() | {"neuron_step": ws.space.neuron_step}}


def identity_digest(identity: dict[str, Any]) -> str:
    import hashlib

    return hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:10]


def default_study_name(identity: dict[str, Any]) -> str:
    return f"{identity['algorithm']}-{identity['granularity']}-s{identity['seed']}-{identity_digest(identity)}"


def open_study(storage: StudyStorage, identity: dict[str, Any], sampler: Any,
               name: str | None = None) -> tuple[Any, str]:
    """The study for ``identity`` in ``storage``: resumed when it exists, else created; the
    note says which, and for a new study what differs from the others there. A study of
    that ``name`` made for other settings is refused: its trials answer another question."""
    import optuna

    name = name or default_study_name(identity)
    backend = storage.optuna()
    summaries = optuna.get_all_study_summaries(backend)
    existing = {s.study_name: s for s in summaries}
    other = existing[name].user_attrs.get("identity") if name in existing else None
    changed = _differing(identity, other) if isinstance(other, dict) else []
    if changed:
        raise SearchError(f"study {name!r} in {storage.described or storage.url} was made with other settings "
                          f"({', '.join(changed)} differ)",
                          "pass another --study-name, or drop --study-name for a study named after these settings")
    study = optuna.create_study(study_name=name, storage=backend, directions=["minimize", "minimize"], sampler=sampler,
                                load_if_exists=True)
    if name in existing:
        return study, f"resumed study {name} ({existing[name].n_trials} trials so far)"
    study.set_user_attr("identity", identity)
    diffs = []
    for s in summaries:
        other = s.user_attrs.get("identity")
        if isinstance(other, dict):
            changed = _differing(identity, other)
            diffs.append((len(changed), s.study_name, changed))
    if not diffs:
        return study, f"new study {name}"
    _, closest, changed = min(diffs)
    return study, f"new study {name}: {', '.join(changed)} differ from study {closest} in {storage.described}"


def _differing(identity: dict[str, Any], other: dict[str, Any]) -> list[str]:
    """The settings two study identities disagree on, compared as stored (JSON: a tuple and
    the list it comes back as are one value)."""
    def canon(v: Any) -> str:
        return json.dumps(v, sort_keys=True, default=str)

    return sorted(k for k in set(identity) | set(other) if canon(identity.get(k)) != canon(other.get(k)))


def make_sampler(algorithm: str, seed: int, population: int) -> Any:
    import optuna

    if algorithm == "nsga2":
        # constraints come from trial.set_constraint (optuna >= 5)
        return optuna.samplers.NSGAIISampler(population_size=population, seed=seed)
    if algorithm in ("random", "local"):
        return optuna.samplers.RandomSampler(seed=seed)
    raise SearchError(f"unknown algorithm {algorithm!r}", f"use one of {', '.join(ALGORITHMS)}")


def smallest_latency(objective: LatencyObjective, enc: Encoding) -> tuple[float, SubnetConfig]:
    d = enc.space.dims
    params = {"layers": enc.space.min_layers}
    for i in ([0] if enc.shared else range(d.num_layers)):
        params.update({f"g{i}": 1, f"h{i}": 1, f"n{i}": 0})
    if enc.granularity == "tapered":
        params["taper"] = 0
    c = enc.decode(params)
    return float(objective.predict_upper(enc.batch([c]))[0]), c


def _check_budget(deps: dict[str, Deployment], enc: Encoding, budget_ms: float, objective: LatencyObjective) -> None:
    floor, smallest = min(smallest_latency(d.objective, enc) for d in deps.values())
    if budget_ms < floor:
        raise SearchError(
            f"latency budget {budget_ms:g} ms is below the smallest sub-network's predicted bound, {floor:.2f} ms "
            f"({smallest.summary()}) for workload S={objective.workload.prompt_len}, N={objective.workload.gen_tokens}",
            f"raise --latency-budget-ms above {floor:.2f}, or shorten --workload",
        )


@dataclass
class _Limits:
    budget_ms: float
    max_params: float
    max_perplexity: float


class _Loop:
    """One worker's ask/tell loop on a study: each candidate predicted, rejected at once when
    over the budget, else evaluated for perplexity (shared across workers) and told."""

    def __init__(self, study: Any, enc: Encoding, deps: dict[str, Deployment], qualities: dict[str, SharedQuality],
                 limits: _Limits, worker: int) -> None:
        self.study, self.enc, self.deps, self.qualities, self.limits = study, enc, deps, qualities, limits
        self.worker, self.mixed, self.me = worker, len(deps) > 1, owner_id()
        self.t_pred = self.t_quality = 0.0
        self.best: dict[str, Any] | None = None
        # (config, precision) pairs the study has judged: a repeat is told its values again
        # (from the shared cache) but does not spend an evaluation
        self.seen = {(t.user_attrs.get("config"), t.user_attrs.get("precision")) for t in self.done_trials()}

    def done_trials(self) -> list[Any]:
        import optuna

        return [t for t in self.study.get_trials(deepcopy=False) if t.state == optuna.trial.TrialState.COMPLETE]

    def enqueue_mutation(self, rng: np.random.Generator) -> None:
        """``local``: a one-step mutation of a random point of the current front."""
        trials = [t for t in self.done_trials() if t.user_attrs.get("feasible")]
        if trials:
            vals = np.array([t.values for t in trials])
            front = [t for t, k in zip(trials, pareto_mask(vals[:, 0], vals[:, 1])) if k]
            parent = front[int(rng.integers(len(front)))]
            self.study.enqueue_trial(self.enc.mutate(dict(parent.params), rng), skip_if_exists=True)

    def step(self) -> bool:
        """Propose, judge and tell one candidate; True when it was evaluated for perplexity."""
        lim = self.limits
        trial = self.study.ask()
        trial.set_user_attr("owner", self.me)
        config = self.enc.decode(self.enc.suggest(trial))
        dep = self.deps[trial.suggest_categorical("precision", sorted(self.deps))] if self.mixed \
            else next(iter(self.deps.values()))
        a = time.perf_counter()
        lat_a, up_a = dep.objective.predict_both(self.enc.batch([config]))
        lat, up = float(lat_a[0]), float(up_a[0])
        self.t_pred += time.perf_counter() - a
        n_params = count_params(config, self.enc.space.dims)
        evaluate = up <= lim.budget_ms and n_params <= lim.max_params
        trial.set_constraint("latency_upper_ms", up - lim.budget_ms)
        trial.set_constraint("params", (n_params - lim.max_params) if math.isfinite(lim.max_params) else -1.0)
        for k, v in (("config", config.to_json()), ("upper_ms", up), ("params", n_params),
                     ("precision", dep.precision), ("worker", self.worker)):
            trial.set_user_attr(k, v)
        a = time.perf_counter()
        ppl = self.qualities[dep.precision](config) if evaluate else INFEASIBLE_PPL
        self.t_quality += time.perf_counter() - a
        feasible = evaluate and ppl <= lim.max_perplexity
        key = (config.to_json(), dep.precision)
        repeat = key in self.seen
        self.seen.add(key)
        trial.set_constraint("perplexity", (ppl - lim.max_perplexity) if math.isfinite(lim.max_perplexity) else -1.0)
        trial.set_user_attr("feasible", feasible)
        trial.set_user_attr("evaluated", evaluate and not repeat)
        trial.set_user_attr("repeat", repeat)
        self.study.tell(trial, [min(ppl, INFEASIBLE_PPL), lat])
        if feasible and (self.best is None or ppl < self.best["perplexity"]):
            self.best = {"perplexity": ppl, "latency_ms": lat, "summary": _summary(config, dep.precision, self.mixed)}
        return evaluate and not repeat


def _open_for(ws: Any, objective: LatencyObjective, deps: dict[str, Deployment], storage: StudyStorage,
              algorithm: str, granularity: str, seed: int, worker: int, evals: int, limits: _Limits,
              study_name: str | None) -> tuple[Any, str]:
    """The study of these settings (resumed or new), stale trials of stopped workers retired."""
    identity = study_identity(ws, objective, algorithm, granularity, seed, limits.budget_ms, limits.max_params)
    if math.isfinite(limits.max_perplexity):
        identity["max_perplexity"] = limits.max_perplexity
    if len(deps) > 1:
        identity["deployments"] = {k: {"quality": d.ws.quality_id(), "predictor": dict(d.objective.digests)}
                                   for k, d in sorted(deps.items())}
    sampler = make_sampler(algorithm, seed + 1000 * worker, max(8, min(40, evals // 5)))
    study, note = open_study(storage, identity, sampler, study_name)
    log.info("%s", note)
    retired = retire_stale_trials(study)
    if retired:
        log.info("%d trial(s) left running by stopped workers failed; their candidates queued again", retired)
    return study, note


def run_search(ws: Any, objective: LatencyObjective, algorithm: str, evals: int, budget_ms: float,
               storage: StudyStorage | Path, max_params: float = math.inf, seed: int = 0, granularity: str = "per-layer",
               ref_ppl: float = 1e5, warm_start: Sequence[SubnetConfig] = (), max_perplexity: float = math.inf,
               progress: Callable[[int, int, dict[str, Any] | None], None] | None = None,
               max_trials: int | None = None, deployments: Sequence[Deployment] = (),
               study_name: str | None = None, worker: int = 0) -> SearchResult:
    """Search until the study holds ``evals`` sub-networks evaluated for perplexity (the
    search's cost: a candidate over the budget is rejected by the predictor in microseconds
    and does not count; with several workers, theirs count too), or ``max_trials`` candidates
    (default 20 x evals) were proposed. ``max_perplexity`` is a quality ceiling: a constraint
    like the budget, known only once a candidate's perplexity is evaluated (so such a candidate
    costs an evaluation). With several ``deployments`` each candidate is also given a
    precision, and judged and timed at it. ``storage``: a ``StudyStorage``, or a SQLite file.
    ``worker``: this worker's number in a shared study (its sampler draws its own candidates)."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    if algorithm not in ALGORITHMS:
        raise SearchError(f"unknown algorithm {algorithm!r}", f"use one of {', '.join(ALGORITHMS)}")
    deps = {d.precision: d for d in deployments} or {ws.precision: Deployment(ws.precision, ws, objective)}
    enc = Encoding(ws.space, ws.importance.layer_ranking(), granularity)
    _check_budget(deps, enc, budget_ms, objective)
    storage = parse_storage(None, storage) if isinstance(storage, Path) else storage
    limits = _Limits(budget_ms, max_params, max_perplexity)
    study, note = _open_for(ws, objective, deps, storage, algorithm, granularity, seed, worker, evals, limits, study_name)
    loop = _Loop(study, enc, deps, {k: shared_quality(storage, d.ws) for k, d in deps.items()}, limits, worker)
    rng = np.random.default_rng(seed + 1000 * worker)
    t0 = time.perf_counter()
    max_trials = max_trials or 20 * evals + 100
    done = loop.done_trials()
    n_eval = _evaluated(done)
    if not done:
        # Known-good structured points (the baselines) as the first generation: the search
        # starts from them and improves on them rather than rediscovering them.
        for c in warm_start[:evals]:
            for k in deps:
                study.enqueue_trial(enc.encode(c) | ({"precision": k} if loop.mixed else {}), skip_if_exists=True)
    init, mine = max(8, evals // 5), 0
    while n_eval < evals and mine < max_trials:
        if algorithm == "local" and n_eval >= init:
            loop.enqueue_mutation(rng)
        evaluated = loop.step()
        mine += 1
        # the study's count (other workers' evaluations count too), read when ours grew it and
        # now and then: reading every trial after each microsecond rejection would cost O(n^2)
        if evaluated or mine % 20 == 0:
            n_eval = _evaluated(loop.done_trials())
        if progress:
            progress(n_eval, evals, loop.best)
    if n_eval < evals:
        log.warning("stopped after %d proposed sub-networks with %d of %d evaluations: most candidates exceed the "
                    "budget; raise --latency-budget-ms", mine, n_eval, evals)
    res = collect(study, ws.precision, loop.mixed, ref_ppl, budget_ms)
    res.seconds = {"total": time.perf_counter() - t0, "predictor": loop.t_pred, "perplexity": loop.t_quality}
    res.ppl_evaluations = sum(q.evaluations for q in loop.qualities.values())
    res.resumed = note
    return res


def retire_stale_trials(study: Any) -> int:
    """Trials that a worker left running when it stopped (killed, its host gone): failed, and
    their candidates queued again, so none is lost; a perplexity it had computed is read back
    from the shared cache, not computed again. A trial is stale when its worker's process is
    gone (a worker on this host) or it started more than ``STALE_S`` ago."""
    import datetime

    import optuna

    retired = 0
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        owner = t.user_attrs.get("owner")
        age = (datetime.datetime.now() - t.datetime_start).total_seconds() if t.datetime_start else 0.0
        if age < STALE_S and (owner is None or owner_alive(owner)):
            continue
        try:
            study.tell(t.number, state=optuna.trial.TrialState.FAIL)
        except (ValueError, RuntimeError):  # another worker retired it first (Optuna: not running)
            continue
        if t.params:
            study.enqueue_trial(dict(t.params))
        retired += 1
    return retired


def _evaluated(trials: list[Any]) -> int:
    return sum(1 for t in trials if t.user_attrs.get("evaluated", t.user_attrs.get("feasible")))


def collect(study: Any, precision: str, mixed: bool, ref_ppl: float, budget_ms: float) -> SearchResult:
    """The study's finished trials, its feasible front and hypervolume (every worker's)."""
    import optuna

    points, repeats = [], 0
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)):
        if t.user_attrs.get("repeat"):  # told again, judged once
            repeats += 1
            continue
        c = SubnetConfig.from_json(t.user_attrs["config"])
        prec = t.user_attrs.get("precision", precision)
        points.append({"trial": t.number, "config_hash": c.config_hash(), "summary": _summary(c, prec, mixed),
                       "precision": prec, "config": c.to_dict(),
                       "perplexity": float(t.values[0]), "latency_ms": float(t.values[1]),
                       "upper_ms": float(t.user_attrs["upper_ms"]), "params": int(t.user_attrs["params"]),
                       "feasible": bool(t.user_attrs["feasible"])})
    feas = [p for p in points if p["feasible"]]
    front: list[dict[str, Any]] = []
    hv = 0.0
    if feas:
        ppl_arr = np.array([p["perplexity"] for p in feas])
        lat_arr = np.array([p["latency_ms"] for p in feas])
        front = sorted((p for p, k in zip(feas, pareto_mask(ppl_arr, lat_arr)) if k), key=lambda p: p["latency_ms"])
        hv = hypervolume(ppl_arr, lat_arr, ref_ppl, budget_ms)
    return SearchResult(points, front, hv, study_name=study.study_name, repeats=repeats)


def _summary(config: SubnetConfig, precision: str, mixed: bool) -> str:
    return f"{config.summary()} @ {precision}" if mixed else config.summary()



