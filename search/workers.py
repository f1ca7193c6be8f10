"""``search-subnets --workers N``: N-1 more processes on the same study.

Each worker is a full search loop of its own (``run_search``) on the same storage and study
name, as a worker started separately on another machine would be: Optuna's storage keeps
their trials in one study, and the shared perplexity claims (``search.storage``) keep any
two from evaluating one candidate. The processes are spawned (a fresh interpreter each, no
inherited torch or SQLite state) and split the machine's cores."""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import time
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from search.request import SearchRequest

log = logging.getLogger(__name__)


def threads_per_worker(workers: int) -> int:
    return max(1, (os.cpu_count() or 1) // max(1, workers))


class WorkerPool:
    """``n`` worker processes on one study: started first (they load the model while this
    process does), waited for until each is ready to search so the work is shared from the
    first trial, and joined (not killed) at the end so their last trials are in the study
    when it is collected."""

    def __init__(self, request: SearchRequest, storage_url: str, n: int) -> None:
        ctx = mp.get_context("spawn")
        self.queue = ctx.Queue()
        self.procs = [ctx.Process(target=worker_main, args=(request, storage_url, i + 1, self.queue))
                      for i in range(max(0, n))]
        self.results: list[dict[str, Any]] = []
        for p in self.procs:
            p.start()

    def _drain(self, block: bool, timeout: float | None = None) -> None:
        import queue

        try:
            self.results.append(self.queue.get(block, timeout))
        except queue.Empty:
            pass

    def wait_ready(self, timeout: float = 600.0) -> None:
        deadline = time.monotonic() + timeout
        while sum(r.get("ready", False) for r in self.results) < len(self.procs) and time.monotonic() < deadline:
            if not any(p.is_alive() for p in self.procs):
                break
            self._drain(True, 1.0)

    def join(self) -> list[dict[str, Any]]:
        """Each worker's perplexity evaluations, once all have ended."""
        while any(p.is_alive() for p in self.procs):
            self._drain(True, 1.0)  # a worker cannot exit while its message waits in the pipe
        for p in self.procs:
            p.join()
        while not self.queue.empty():
            self._drain(False)
        failed = [p.exitcode for p in self.procs if p.exitcode]
        if failed:
            log.warning("%d search worker(s) ended with an error (exit codes %s); their finished trials are kept",
                        len(failed), failed)
        return [r for r in self.results if "evaluations" in r]


def worker_main(request: SearchRequest, storage_url: str, index: int, queue: Any) -> None:
    """One extra worker: the search loop on the shared study, no baselines, no outputs."""
    import torch

    from search.deployments import setup
    from search.request import parse_ceiling
    from search.storage import StudyStorage
    from search.study import run_search, shared_quality

    torch.set_num_threads(threads_per_worker(request.workers))
    logging.basicConfig(level=logging.WARNING)
    ws, deps, _ = setup(request)
    storage = StudyStorage(storage_url, storage_url)
    quality = shared_quality(storage, ws)
    ceiling = parse_ceiling(request.max_perplexity, quality(ws.space.full()))
    queue.put({"worker": index, "ready": True})
    res = run_search(ws, deps[0].objective, request.algorithm, request.evals, request.latency_budget_ms, storage,
                     max_params=request.params_limit, seed=request.seed, granularity=request.granularity,
                     max_perplexity=ceiling, deployments=deps, study_name=request.study_name, worker=index)
    queue.put({"worker": index, "evaluations": res.ppl_evaluations + quality.evaluations})
