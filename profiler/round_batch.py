"""One batch of a sweep's cells measured in interleaved rounds on the sweep's board: claimed
together (leases keep other sweeps and other boards of a fleet off them), each round stored
as it finishes, each cell recorded once its rounds stop; the reference in every round.

A sweep killed mid-batch loses no finished round: the next sweep that claims the cell
loads its rounds and goes on from them (``profiler.rounds`` decides when a cell is done)."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from profiler.errors import ErrorClass, MeasureError
from profiler.rounds import Cell, Drift, RoundsRun
from profiler.store import Job

if TYPE_CHECKING:
    from export.gguf_file import GgufOptions
    from export.onnx_graphs import ExportOptions
    from subnets.config import SubnetConfig

log = logging.getLogger(__name__)

FIRST, REPEAT = 0, 1  # a cell's first measurement; its re-measurement (the sweep's repeatability)
REFERENCE = "reference"


class RoundBatch:
    def __init__(self, profiler: Any, jobs: list[Job], by_hash: dict[str, SubnetConfig],
                 options: ExportOptions | GgufOptions, device_id: int, summary: Any, pass_no: int,
                 tag: str) -> None:
        """``profiler``: the sweep's ``profiler.sweep.Profiler`` (its export, measure and
        recovery), ``summary`` its ``SweepSummary`` (named, not imported: the sweep imports this)."""
        self.p, self.spec, self.store = profiler, profiler.spec, profiler.store
        self.jobs = {j.id: j for j in jobs}
        self.by_hash, self.options, self.device_id, self.summary = by_hash, options, device_id, summary
        self.pass_no, self.tag = pass_no, tag
        self.attempts: dict[int, int] = {}
        self.measured: set[str] = set()  # sub-networks with a cell recorded here
        self._drift_now = Drift()

    # --- the batch -------------------------------------------------------------------------
    def run(self) -> list[Job]:
        """Measure the batch; returns the jobs another sweep holds (not measured here)."""
        held = self._claim()
        if not self.jobs:
            return held
        cells = self._cells()
        phases = sorted({j.phase for j in self.jobs.values()})
        refs = {ph: Cell((REFERENCE, ph), ph, ph) for ph in phases}
        self._drift_now = self._drift(phases)
        rounds = RoundsRun(self.spec.rounds, self.tag, self._measure, self._stored, self._done, self._fault,
                           drift=self._drift_now, seed=self.pass_no,
                           progress=lambda d, t: self.p.progress(d, t, f"rounds: {d}/{t} cells of a batch done"))
        rounds.run(cells, refs)
        for phase, ref in refs.items():
            if ref.results and self.pass_no == FIRST:
                self._record_reference(phase, ref, rounds.drift)
        if not self.spec.keep_models:
            keys = {self.p._key(h) for h in {j.subnet_hash for j in self.jobs.values()}}
            self.p._evict(keys - {self.p._key(self.p.reference.config_hash())}, self.summary)
        return held

    def _claim(self) -> list[Job]:
        """First measurements are claimed (a re-measured cell is done: nobody else takes it)."""
        if self.pass_no != FIRST:
            return []
        held = []
        for job in list(self.jobs.values()):
            attempts = self.store.claim(job.id, self.p.owner, self.spec.lease_s)
            if attempts is None:
                held.append(self.jobs.pop(job.id))
            else:
                self.attempts[job.id] = attempts
        return held

    def _cells(self) -> list[Cell]:
        """The batch's cells with the rounds earlier sweeps stored for them."""
        cells = {jid: Cell(jid, j.phase, j.phase) for jid, j in self.jobs.items()}
        for row in self.store.rounds_of(list(cells), self.pass_no):
            cells[row["job_id"]].add(row["median_ms"], (row["round_batch"], row["round_no"]), row["raw_ms"])
        return list(cells.values())

    def _drift(self, phases: list[str]) -> Drift:
        """The reference rounds stored under this sweep's protocols (their first: the anchor)."""
        drift = Drift()
        for phase in phases:
            protocol = next(j.protocol for j in self.jobs.values() if j.phase == phase)
            seq, past = self.p.reference_shape(phase)
            for r in self.store.reference_rounds(self.device_id, protocol):
                if r["phase"] == phase and r["seq_len"] == seq and r["past_len"] == past:
                    drift.rounds[(phase, r["round_batch"], r["round_no"])] = r["median_ms"]
                    drift.anchors.setdefault(phase, r["median_ms"])
        return drift

    # --- a round's burst -----------------------------------------------------------------
    def _cell(self, cell: Cell) -> tuple[SubnetConfig, str, int, int]:
        """(config, phase, seq_len, past_len) of a cell or of a phase's reference."""
        if isinstance(cell.key, tuple):
            return (self.p.reference, cell.phase, *self.p.reference_shape(cell.phase))
        job = self.jobs[cell.key]
        return self.by_hash[job.subnet_hash], job.phase, job.seq_len, job.past_len

    def _measure(self, cell: Cell, round_no: int) -> dict[str, Any]:
        config, phase, seq, past = self._cell(cell)
        exported = self.p._export(config, self.options, self.summary)
        timing = self.spec.rounds.burst_timing(self.spec.timing_for(phase))
        fresh = self.spec.rounds.fresh_decode_sessions and phase == "decode"
        r = self.p._measure(exported, phase, seq, past, self.summary, timing=timing, fresh=fresh)
        self.summary.rounds += 1
        return r

    def _stored(self, cell: Cell, round_no: int, r: dict[str, Any]) -> None:
        config, phase, seq, past = self._cell(cell)
        job = None if isinstance(cell.key, tuple) else self.jobs[cell.key]
        protocol = job.protocol if job else next(j.protocol for j in self.jobs.values() if j.phase == phase)
        self.store.add_round({"job_id": job.id if job else None, "device_id": self.device_id,
                              "subnet_hash": config.config_hash(), "phase": phase, "seq_len": seq, "past_len": past,
                              "protocol": protocol, "pass_no": self.pass_no, "round_batch": self.tag,
                              "round_no": round_no, "board": self.p.target.spec.name, "median_ms": r["median_ms"],
                              "n": r.get("n"), "raw_ms": r.get("raw_ms") or []})

    def _fault(self, cell: Cell, e: MeasureError) -> bool:
        """Bring the board back; whether the cell may try again in a later round."""
        config, phase, _, _ = self._cell(cell)
        self.summary.faults.append({"job": cell.key if not isinstance(cell.key, tuple) else REFERENCE,
                                    "attempt": cell.faults, "error_class": e.error_class.value,
                                    "message": e.message[:300]})
        log.warning("round of %s %s failed (%s): %s", config.summary(), phase, e.error_class.value, e.message)
        key = self.p._key(config.config_hash())
        if e.error_class == ErrorClass.LOAD_ERROR:
            self.p._on_board.discard(key)
        elif e.error_class == ErrorClass.DISK_FULL:
            self.p._evict(self.p.target.models_on_board() - {key}, self.summary)
        else:
            self.p._recover(e, self.summary)
        if isinstance(cell.key, tuple) or self.pass_no != FIRST:
            return e.error_class.retryable and cell.faults < self.spec.max_attempts
        job = self.jobs[cell.key]
        tries = self.attempts[job.id] + cell.faults - 1
        if e.error_class.retryable and tries < self.spec.max_attempts:
            self.summary.retries += 1
            return True
        self.store.fail_job(job.id, e.error_class, e.message, final=True)
        self.summary.failed.append({"subnet": job.subnet_hash, "phase": job.phase, "seq_len": job.seq_len,
                                    "past_len": job.past_len, "error_class": e.error_class.value, "attempts": tries,
                                    "message": e.message})
        return False

    # --- a cell's result -------------------------------------------------------------------
    def _result(self, cell: Cell, drift: Drift) -> dict[str, Any]:
        """The pooled statistics with the board's record of the bursts (first and last)."""
        from profiler.rounds import pooled

        out: dict[str, Any] = {}
        if cell.results:
            first, last = cell.results[0], cell.results[-1]
            out = {k: last.get(k) for k in ("settings", "versions", "policy", "telemetry_after")}
            out.update(telemetry_before=first.get("telemetry_before"), load_ms=first.get("load_ms"),
                       throttled=any(r.get("throttled") for r in cell.results),
                       throttle_reasons=sorted({x for r in cell.results for x in r.get("throttle_reasons") or []}),
                       peak_rss_mb=max((r["peak_rss_mb"] for r in cell.results if r.get("peak_rss_mb")), default=None))
        out.update(pooled(cell, drift, self.spec.rounds))
        return out

    def _done(self, cell: Cell) -> None:
        job = self.jobs[cell.key]
        result = self._result(cell, self._drift_now)
        if self.pass_no != FIRST:
            self.store.add_repeat(job.id, self.p.target.spec.name, result)
            return
        if self.store.finish_job(job, self.device_id, result, self.p._key(job.subnet_hash)) is None:
            self.summary.held_elsewhere += 1
            return
        self.summary.measured += 1
        self.summary.unstable += int(bool(result.get("unstable")))
        self.summary.throttled += int(bool(result.get("throttled")))
        self.measured.add(job.subnet_hash)

    def _record_reference(self, phase: str, ref: Cell, drift: Drift) -> None:
        ref.stop = ref.stop or "batch"  # it ran as long as its batch did
        result = self._result(ref, drift)
        result["unstable"] = False
        self.p.record_reference(phase, result, self.p._key(self.p.reference.config_hash()), self.options,
                                self.device_id, self.summary)
