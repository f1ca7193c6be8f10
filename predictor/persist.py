"""Saving and loading predictors as folders of JSON: never a pickle.

    meta.json     what the predictor is for (device fingerprint, base model, phase, feature
                  schema), its fitted base, its bound, training data hash, metrics, versions,
                  and the sha256 of every other file (an edited file is refused)
    booster.json  the XGBoost model (its own JSON format), when boosted
    prior/        the source device's predictor, when this one was transferred
    folds/K/      the CV+ fold models behind the bound (meta.json holds their scores)"""

from __future__ import annotations

import hashlib
import json
import platform
from pathlib import Path
from typing import Any

import numpy as np

from predictor.features import FEATURE_SCHEMA_VERSION, FEATURES
from predictor.model import BASE_TERMS, BASES, BoostedCostModel
from subnets.dims import BaseDims
from subnets.errors import EdgenasError

FORMAT = "edgenas-latency-predictor"
FORMAT_VERSION = 2  # 2: CV+ bound (fold models and scores) instead of one conformal factor


class PredictorFileError(EdgenasError):
    """A predictor folder that is missing, edited, or for something else."""


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _versions() -> dict[str, str]:
    import sklearn
    import xgboost

    return {"xgboost": xgboost.__version__, "numpy": np.__version__, "scikit-learn": sklearn.__version__,
            "python": platform.python_version()}


def save_predictor(p: BoostedCostModel, folder: Path, device_name: str, fingerprint: str, base_id: str,
                   data_hash: str, metrics: dict[str, Any] | None = None) -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    files: dict[str, str] = {}
    if p.booster is not None:
        p.booster.save_model(str(folder / "booster.json"))
        files["booster.json"] = _sha(folder / "booster.json")
    if p.prior is not None:
        save_predictor(p.prior, folder / "prior", p.prior.fit_info.get("device_name", "prior"),
                       p.prior.fit_info.get("fingerprint", ""), base_id, p.prior.fit_info.get("data_hash", ""),
                       p.prior.fit_info.get("metrics"))
        files["prior/meta.json"] = _sha(folder / "prior" / "meta.json")
    for k, fold in enumerate(p.folds):
        save_predictor(fold, folder / "folds" / str(k), device_name, fingerprint, base_id, data_hash)
        files[f"folds/{k}/meta.json"] = _sha(folder / "folds" / str(k) / "meta.json")
    meta: dict[str, Any] = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "feature_schema": FEATURE_SCHEMA_VERSION,
        "features": list(FEATURES), "device_name": device_name, "device_fingerprint": fingerprint,
        "base_id": base_id, "phase": p.phase, "dims": p.dims.to_dict(), "alpha": p.alpha,
        "scores": None if p.scores is None else p.scores.tolist(),
        "score_fold": None if p.score_fold is None else p.score_fold.tolist(), "folds": len(p.folds),
        "base_terms": list(BASE_TERMS),
        "base_coef": None if p.base_coef is None else p.base_coef.tolist(),
        "base_scale": None if p.base_scale is None else p.base_scale.tolist(),
        "transfer_coef": None if p.transfer_coef is None else list(p.transfer_coef),
        "transfer_terms": None if p.transfer_terms is None else p.transfer_terms.tolist(),
        "boosted": p.booster is not None, "data_hash": data_hash, "fit_info": p.fit_info, "metrics": metrics or {},
        "versions": _versions(), "files": files,
    }
    meta = json.loads(json.dumps(meta, default=float))  # plain JSON types, so the digest round-trips
    meta["sha256"] = _meta_digest(meta)
    (folder / "meta.json").write_text(json.dumps(meta, indent=1))
    return folder


def _meta_digest(meta: dict[str, Any]) -> str:
    body = {k: v for k, v in meta.items() if k != "sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def _current_protocol_digest(metrics: dict[str, Any]) -> None:
    """Stores digest a protocol as this version does (defaults filled in, store schema 4), so
    a predictor trained before that finds its measurements under the digest they now carry."""
    from profiler.protocol import Protocol

    if metrics.get("protocol_record"):
        metrics["protocol"] = Protocol.from_dict(metrics["protocol_record"]).digest


def _read_meta(folder: Path) -> dict[str, Any]:
    """meta.json, checked to be an untouched predictor of this format."""
    meta_path = folder / "meta.json"
    if not meta_path.is_file():
        raise PredictorFileError(f"{folder} is not a predictor folder (no meta.json)",
                                 "pass the folder train-predictor wrote (--out)")
    try:
        meta = json.loads(meta_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise PredictorFileError(f"{meta_path} is not valid JSON ({e})", "retrain the predictor") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise PredictorFileError(f"{meta_path} is not an edgenas predictor", "retrain with train-predictor")
    if meta.get("format_version") != FORMAT_VERSION:
        raise PredictorFileError(f"{folder} is a predictor of format {meta.get('format_version')}, this edgenas reads "
                                 f"format {FORMAT_VERSION} (its bound is computed differently)",
                                 "retrain the predictor with this version (train-predictor)")
    if meta.get("sha256") != _meta_digest(meta):
        raise PredictorFileError(f"{meta_path} was modified after training (its digest differs)",
                                 "retrain, or restore the original file")
    return meta


def _check_use(folder: Path, meta: dict[str, Any], device: str | None, base_id: str | None, phase: str | None,
               override: bool) -> None:
    """Refuse a predictor of another schema, with files changed since training, or of another
    device, base model or phase (unless ``override``)."""
    if meta.get("feature_schema") != FEATURE_SCHEMA_VERSION or meta.get("features") != list(FEATURES):
        if not override:
            raise PredictorFileError(
                f"{folder} uses feature schema {meta.get('feature_schema')}, this edgenas computes {FEATURE_SCHEMA_VERSION}",
                "retrain the predictor with this version (train-predictor)")
    if meta.get("base_coef") is not None and meta.get("base_terms") != list(BASE_TERMS):
        raise PredictorFileError(
            f"{folder} was fitted on base terms {meta.get('base_terms') or 'of an older edgenas'}, this edgenas uses "
            f"{', '.join(BASE_TERMS)}", "retrain the predictor with this version (train-predictor)")
    for name, digest in (meta.get("files") or {}).items():
        f = folder / name
        if not f.is_file():
            raise PredictorFileError(f"{folder} is missing {name}", "copy the whole folder, or retrain")
        if _sha(f) != digest:
            raise PredictorFileError(f"{f} was modified after training (sha256 differs)", "retrain, or restore the original file")
    for what, want, have in (("device", device, (meta.get("device_name"), meta.get("device_fingerprint"))),
                             ("base model", base_id, (meta.get("base_id"),)), ("phase", phase, (meta.get("phase"),))):
        if want is not None and want not in have and not override:
            raise PredictorFileError(
                f"{folder} predicts {what} {have[0]!r}, not {want!r}",
                f"train a predictor for {want!r} (train-predictor), or pass --override to use it anyway")


def _restore_bound(p: BoostedCostModel, folder: Path, meta: dict[str, Any], base_id: str | None, phase: str | None,
                   override: bool) -> None:
    """The CV+ bound: held-out scores and the fold models they came from."""
    if meta.get("scores") is None:
        return
    p.scores = np.asarray(meta["scores"], dtype=np.float64)
    p.score_fold = np.asarray(meta["score_fold"], dtype=np.int64)
    p.folds = [load_predictor(folder / "folds" / str(k), base_id=base_id, phase=phase, override=override)[0]
               for k in range(int(meta["folds"]))]
    if len(p.scores) != len(p.score_fold) or not np.all(np.isfinite(p.scores)) or \
            (len(p.score_fold) and int(p.score_fold.max()) >= len(p.folds)):
        raise ValueError("bound scores malformed")


def _restore_base(p: BoostedCostModel, folder: Path, meta: dict[str, Any], base_id: str | None, phase: str | None,
                  override: bool) -> None:
    """The physics-shaped base: its own coefficients, or a prior device's scaled (transfer)."""
    if meta.get("transfer_terms") is None and meta.get("transfer_coef") is None:
        p.base_coef = np.asarray(meta["base_coef"], dtype=np.float64)
        p.base_scale = np.asarray(meta["base_scale"], dtype=np.float64)
        if p.base_coef.shape != p.base_scale.shape or not np.all(np.isfinite(p.base_coef)):
            raise ValueError("base coefficients malformed")
        return
    if meta.get("transfer_terms") is not None:
        p.transfer_terms = np.asarray(meta["transfer_terms"], dtype=np.float64)
        if p.transfer_terms.shape != (len(BASE_TERMS),) or not np.all(np.isfinite(p.transfer_terms)):
            raise ValueError("transfer scales malformed")
    else:
        p.transfer_coef = tuple(float(x) for x in meta["transfer_coef"])  # type: ignore[assignment]
    p.prior, _ = load_predictor(folder / "prior", base_id=base_id, phase=phase, override=override)


def load_predictor(folder: Path, device: str | None = None, base_id: str | None = None, phase: str | None = None,
                   override: bool = False) -> tuple[BoostedCostModel, dict[str, Any]]:
    """Load and check a predictor (JSON and XGBoost's JSON model, never a pickle); refuse one
    for another device, base model, phase or feature schema unless ``override``."""
    folder = Path(folder)
    meta = _read_meta(folder)
    _check_use(folder, meta, device, base_id, phase, override)
    _current_protocol_digest(meta.get("metrics") or {})
    try:
        p = BoostedCostModel(BaseDims.from_dict(meta["dims"]), meta["phase"], alpha=float(meta["alpha"]))
        _restore_bound(p, folder, meta, base_id, phase, override)
        p.fit_info = dict(meta.get("fit_info") or {})
        p.base_used = p.fit_info["base"] if p.fit_info.get("base") in BASES else "physics"
        _restore_base(p, folder, meta, base_id, phase, override)
        if meta.get("boosted"):
            import xgboost as xgb

            booster = xgb.XGBRegressor()
            booster.load_model(str(folder / "booster.json"))
            p.booster = booster
    except (KeyError, TypeError, ValueError) as e:
        raise PredictorFileError(f"{folder / 'meta.json'} is malformed ({type(e).__name__}: {e})",
                                 "retrain the predictor") from None
    return p, meta
