"""The latency objective: a user's workload (a prompt of S tokens, then N generated tokens)
through a device's prefill and decode predictors."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from predictor.estimator import LatencyEstimator, config_table
from predictor.features import ConfigBatch
from subnets.errors import EdgenasError


@dataclass(frozen=True)
class Workload:
    prompt_len: int = 128
    gen_tokens: int = 64

    @classmethod
    def parse(cls, text: str) -> Workload:
        try:
            s, n = (int(x) for x in text.split(","))
        except ValueError:
            raise EdgenasError(f"workload {text!r} is not 'S,N'", "give the prompt length and generated tokens, e.g. 128,64") from None
        if s < 1 or n < 0:
            raise EdgenasError(f"workload {text!r}: S must be >= 1 and N >= 0", "e.g. --workload 128,64")
        return cls(s, n)

    def decode_points(self) -> np.ndarray:
        """Past lengths at which the decode cost is sampled: the first and the last step (a
        decode step's time is affine in its past length, for which their mean is exact; a
        middle point cost every sweep and every device check a third more decode cells)."""
        if self.gen_tokens == 0:
            return np.zeros(0)
        first, last = self.prompt_len, self.prompt_len + self.gen_tokens - 1
        # integer past lengths, so the verified cells are exactly the predicted ones
        return np.array([first, last] if last > first else [first], dtype=np.float64)

    def total(self, prefill_ms: np.ndarray, decode_at_points: list[np.ndarray]) -> np.ndarray:
        """prefill + sum of N decode steps: N times the mean of the first and last step's."""
        if self.gen_tokens == 0:
            return prefill_ms
        return prefill_ms + self.gen_tokens * (decode_at_points[0] + decode_at_points[-1]) / 2.0


@dataclass
class LatencyObjective:
    prefill: LatencyEstimator
    decode: LatencyEstimator
    workload: Workload
    device_name: str
    base_id: str
    # per phase, how its training data was measured (threads, backend, protocol, protocol_record):
    # what verification must reproduce; empty for a predictor that did not record it
    measured_as: dict[str, dict] = field(default_factory=dict)
    digests: dict[str, str] = field(default_factory=dict)  # per phase, the predictor's meta digest

    def __post_init__(self) -> None:
        # a fitted model (BoostedCostModel) is held through its estimator, like a loaded one
        for phase in ("prefill", "decode"):
            est = getattr(self, phase)
            if not isinstance(est, LatencyEstimator):
                setattr(self, phase, LatencyEstimator.from_model(est))

    @classmethod
    def load(cls, folder: Path, workload: Workload, device: str | None, base_id: str | None,
             override: bool = False) -> LatencyObjective:
        folder = Path(folder)
        if not (folder / "prefill").is_dir() or not (folder / "decode").is_dir():
            from predictor.persist import PredictorFileError

            raise PredictorFileError(f"{folder} does not hold prefill/ and decode/ predictors",
                                     "pass the --out folder of train-predictor --phase prefill,decode")
        pre, meta = LatencyEstimator.load(folder / "prefill", device, base_id, "prefill", override)
        dec, dmeta = LatencyEstimator.load(folder / "decode", device, base_id, "decode", override)
        keys = ("threads", "backend", "protocol", "protocol_record")
        measured_as = {phase: {k: (m.get("metrics") or {}).get(k) for k in keys} for phase, m in
                       (("prefill", meta), ("decode", dmeta))}
        return cls(pre, dec, workload, meta["device_name"], meta["base_id"], measured_as,
                   {"prefill": meta["sha256"], "decode": dmeta["sha256"]})

    def predict_both(self, batch: ConfigBatch) -> tuple[np.ndarray, np.ndarray]:
        """(predicted, upper bound) workload latency in ms. The bound sums each phase's CV+
        bound at alpha/2 (decode's holds for its sampled points together), so it holds for
        the whole workload with probability >= 1 - 2 alpha (see ``bound``)."""
        wl = self.workload
        half = self.prefill.alpha / 2
        X_pre = config_table(batch, wl.prompt_len, 0)
        X_dec = [config_table(batch, 1, p) for p in wl.decode_points()]
        mean = wl.total(self.prefill.predict(X_pre), [self.decode.predict(X) for X in X_dec])
        upper = wl.total(self.prefill.predict_upper(X_pre, alpha=half),
                         [self.decode.predict_upper(X, alpha=half) for X in X_dec])
        return mean, upper

    def bound(self) -> dict[str, float | bool]:
        """What the workload bound promises: each phase fails with probability <= 2 (alpha/2),
        or the widened level; the union of the two failures is the workload's."""
        half = self.prefill.alpha / 2
        pre, dec = self.prefill.coverage(half), self.decode.coverage(half)
        fail = (1 - pre["guaranteed"]) + (1 - dec["guaranteed"] if self.workload.gen_tokens else 0.0)
        return {"nominal": 1 - self.prefill.alpha, "guaranteed": max(0.0, 1 - fail),
                "widened": bool(pre["widened"] or dec["widened"])}

    def predict(self, batch: ConfigBatch) -> np.ndarray:
        return self.predict_both(batch)[0]

    def predict_upper(self, batch: ConfigBatch) -> np.ndarray:
        return self.predict_both(batch)[1]
