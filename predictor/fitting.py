"""Training a device's latency predictors: one frozen ``PredictorRequest`` (field names are
``edgenas train-predictor``'s flags) and ``train_predictors(request)``, which cross-validates
each phase's estimator beside the baselines, fits it on every measurement, saves it, and
returns a ``PhaseReport`` per phase (the command line draws its tables from them)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from predictor.data import Measurements
from predictor.errors import DataError
from profiler.database import Location

DEFAULT_DB = Path("runs/measurements.db")
PHASES = ("prefill", "decode")


@dataclass(frozen=True)
class PredictorRequest:
    device: str
    db: Location = DEFAULT_DB
    phase: tuple[str, ...] = PHASES
    out: Path | None = None
    model: str = "smollm2"
    folds: int = 5
    transfer_from: Path | None = None
    threads: int | None = None
    backend: str | None = None
    no_plot: bool = False
    include_unstable: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "phase", tuple(self.phase))
        bad = [p for p in self.phase if p not in PHASES]
        if bad or not self.phase:
            raise DataError(f"unknown phase(s) {bad or list(self.phase)}", "use prefill, decode or prefill,decode")
        if self.folds < 2:
            raise DataError(f"--folds {self.folds} cannot cross-validate", "pass --folds 2 or more")

    @property
    def folder(self) -> Path:
        return self.out if self.out is not None else Path("runs/predictors") / self.device

    @property
    def min_train(self) -> int:
        """Measurements each training split needs: fewer when transferring a fitted predictor."""
        from predictor.model import MIN_TRAIN, MIN_TRAIN_TRANSFER

        return MIN_TRAIN if self.transfer_from is None else MIN_TRAIN_TRANSFER


@dataclass
class PhaseReport:
    """One phase's predictor: where it was saved and how it did on held-out sub-networks."""

    phase: str
    folder: Path
    comparison: dict[str, dict[str, float]]
    device_name: str
    n: int
    n_subnets: int
    threads: int
    backend: str
    folds: int
    shapes: list[tuple[int, int]]
    excluded_unstable: int = 0
    excluded_throttled: int = 0
    paired: int = 0
    prior: Path | None = None
    plot: Path | None = None
    # the board's re-measurement spread over these cells' kind (profiler.repeatability), if any
    repeatability: dict[str, float] | None = None
    form: str = ""  # what the predictor is made of (predictor.model.model_form)

    @property
    def noise_ratio(self) -> float | None:
        """The predictor's held-out error spread over the board's re-measurement spread (a
        predictor wrong only by the measurement noise scores about 0.71: one measurement's
        noise, against the difference of two)."""
        sd = (self.comparison.get("edgenas predictor") or {}).get("sd_log")
        if not self.repeatability or sd is None or not self.repeatability["sd_log_ratio"] > 0:
            return None
        return float(sd / self.repeatability["sd_log_ratio"])


def _repeatability(store: Any, m: Measurements) -> dict[str, float] | None:
    """The re-measurement spread of the cells like ``m``'s: its device, phase, back-end,
    threads and protocol."""
    from profiler.repeatability import repeatability

    pairs = [(r["first_ms"], r["again_ms"]) for r in store.repeat_pairs(m.fingerprint)
             if r["phase"] == m.phase and r["backend"] == m.backend and r["threads"] == m.threads
             and r["protocol"] == m.protocol]
    rep = repeatability(pairs)
    return None if rep is None else rep.to_dict()


def _fit_phase(request: PredictorRequest, m: Measurements, base_id: str, dims: Any,
               repeat: dict[str, float] | None = None) -> PhaseReport:
    from predictor.evaluate import choose_folds, compare, plot_predicted_vs_measured
    from predictor.model import BoostedCostModel, model_form
    from predictor.persist import load_predictor, save_predictor

    prior = request.transfer_from
    kw: dict[str, Any] = {}
    if prior is not None:
        folder = prior / m.phase if (prior / m.phase).is_dir() else prior
        kw["prior"] = load_predictor(folder, base_id=base_id, phase=m.phase)[0]
    k = choose_folds(m, request.folds, request.min_train)
    comparison, oof = compare(m, k=k, predictor_kw=kw)
    p = BoostedCostModel(dims, m.phase, **kw).fit(m.batch, m.seq_len, m.past_len, m.y_ms)
    folder = request.folder / m.phase
    save_predictor(p, folder, m.device_name, m.fingerprint, base_id, m.data_hash,
                   {"cv": comparison, "threads": m.threads, "backend": m.backend, "protocol": m.protocol,
                    "protocol_record": m.protocol_record, "excluded_unstable": m.excluded_unstable,
                    "excluded_throttled": m.excluded_throttled, "n": len(m), "paired": m.paired,
                    "repeatability": repeat})
    report = PhaseReport(m.phase, folder, comparison, m.device_name, len(m), len(set(m.subnet_hashes.tolist())),
                         m.threads, m.backend, k, sorted(set(zip(m.seq_len.tolist(), m.past_len.tolist()))),
                         m.excluded_unstable, m.excluded_throttled, m.paired, prior, repeatability=repeat,
                         form=model_form(p.fit_info))
    if not request.no_plot:
        report.plot = plot_predicted_vs_measured(m.y_ms, oof, folder / "predicted_vs_measured.png",
                                                 f"{m.device_name} {m.phase}: held-out predictions")
    return report


def train_predictors(request: PredictorRequest) -> dict[str, PhaseReport]:
    """Train, cross-validate against the baselines and save each requested phase's predictor."""
    from predictor.data import load_measurements
    from profiler.database import exists
    from profiler.errors import StoreError
    from profiler.store import Store
    from subnets.basemodel import load_base_info

    if not exists(request.db):
        raise StoreError(f"measurement store {request.db} does not exist", "run profile-device first, or pass --db PATH")
    base_id, dims = load_base_info(request.model)
    store = Store(request.db)
    try:
        out = {}
        for phase in request.phase:
            m = load_measurements(store, request.device, phase, dims, base_id, include_unstable=request.include_unstable,
                                  minimum=request.min_train, threads=request.threads, backend=request.backend)
            out[phase] = _fit_phase(request, m, base_id, dims, _repeatability(store, m))
        return out
    finally:
        store.close()
