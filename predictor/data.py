"""Training data for the predictor, read from the measurement store."""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass

import numpy as np

from predictor.errors import DataError
from predictor.features import ConfigBatch
from predictor.model import MIN_TRAIN
from profiler.protocol import UNRECORDED
from profiler.store import Store
from subnets.config import SubnetConfig
from subnets.dims import BaseDims

log = logging.getLogger(__name__)


@dataclass
class Measurements:
    dims: BaseDims
    device_name: str
    fingerprint: str
    base_id: str
    phase: str
    configs: list[SubnetConfig]
    subnet_hashes: np.ndarray
    batch: ConfigBatch
    seq_len: np.ndarray
    past_len: np.ndarray
    y_ms: np.ndarray
    excluded_unstable: int
    excluded_throttled: int
    threads: int = 1
    backend: str = "ort-cpu"
    paired: int = 0  # measurements whose latency is companion-normalized (see ``paired_latency``)
    protocol: str = UNRECORDED  # the measurement protocol's digest (profiler.protocol)
    protocol_record: dict | None = None

    def __len__(self) -> int:
        return len(self.y_ms)

    @property
    def data_hash(self) -> str:
        h = hashlib.sha256()
        for a in (self.subnet_hashes.astype(str), self.seq_len, self.past_len, self.y_ms):
            h.update(np.ascontiguousarray(a).tobytes())
        return h.hexdigest()[:16]

    def subset(self, mask: np.ndarray) -> Measurements:
        idx = np.flatnonzero(mask)
        return Measurements(self.dims, self.device_name, self.fingerprint, self.base_id, self.phase,
                            [self.configs[i] for i in idx], self.subnet_hashes[idx],
                            ConfigBatch(self.batch.kept[idx], self.batch.kv_groups[idx], self.batch.heads_per_group[idx],
                                        self.batch.neurons[idx]),
                            self.seq_len[idx], self.past_len[idx], self.y_ms[idx], 0, 0, self.threads, self.backend,
                            0, self.protocol, self.protocol_record)


def load_measurements(store: Store, device: str, phase: str, dims: BaseDims, base_id: str | None = None,
                      include_unstable: bool = False, minimum: int = MIN_TRAIN, threads: int | None = None,
                      backend: str | None = None, use_paired: bool = True, protocol: str | None = None) -> Measurements:
    """The usable measurements of one device, phase, thread count and back-end (by default
    the thread count and back-end most measured): latency at 1 and 4 threads are different
    devices for a predictor."""
    devices = store.find_devices(device)
    if not devices:
        known = sorted({d["name"] for d in store.devices()})
        raise DataError(f"no device {device!r} in {store.described} (it has: {', '.join(known) or 'none'})",
                        "pass --device with a name from that list, or profile it first with profile-device")
    dev = devices[0]
    if len({d["fingerprint"] for d in devices}) > 1:
        log.warning("device %s has %d fingerprints (hardware or runtime changed); using the latest, %s",
                    device, len(devices), dev["fingerprint"])
    rows = list(store.measurement_rows(device=dev["fingerprint"], phase=phase))
    if base_id is not None:
        other = {r["base_id"] for r in rows} - {base_id}
        if other and not any(r["base_id"] == base_id for r in rows):
            raise DataError(f"the {phase} measurements of {device} are of base model(s) {sorted(other)}, not {base_id}",
                            "pass the --model those sub-networks were cut from")
        rows = [r for r in rows if r["base_id"] == base_id]
    rows = _one_protocol(rows, device, phase, threads, backend, protocol, store)
    unstable = sum(1 for r in rows if r["unstable"])
    throttled = sum(1 for r in rows if r["throttled"])
    if not include_unstable:
        rows = [r for r in rows if not r["unstable"] and not r["throttled"]]
    if len(rows) < minimum:
        raise DataError(
            f"{len(rows)} usable {phase} measurements of {device}{'' if threads is None else f' at {threads} threads'} in "
            f"{store.described} ({unstable} unstable and "
            f"{throttled} throttled excluded); at least {minimum} are needed",
            f"profile more sub-networks: profile-device --host {device} --samples {max(minimum, 20)} --db {store.described}",
        )
    configs = [SubnetConfig.from_json(r["config"]) for r in rows]
    seq = np.array([r["seq_len"] for r in rows], dtype=np.float64)
    past = np.array([r["past_len"] for r in rows], dtype=np.float64)
    if use_paired:
        y, paired = paired_latency(rows, seq, past)
    else:
        y, paired = np.array([r["median_ms"] for r in rows], dtype=np.float64), 0
    return Measurements(
        dims, dev["name"], dev["fingerprint"], rows[0]["base_id"], phase, configs,
        np.array([r["subnet_hash"] for r in rows]), ConfigBatch.from_configs(configs, dims.num_layers),
        seq, past, y, unstable, throttled, threads=int(rows[0]["threads"]), backend=str(rows[0]["backend"]),
        paired=paired, protocol=rows[0]["protocol"], protocol_record=_record(store, rows[0]["protocol"]),
    )


def _record(store: Store, digest: str) -> dict | None:
    p = store.protocols().get(digest)
    return None if p is None else p.to_dict()


def _one_protocol(rows: list[dict], device: str, phase: str, threads: int | None, backend: str | None,
                  protocol: str | None, store: Store) -> list[dict]:
    """The rows of one thread count, back-end and measurement protocol (by default the most
    measured): a predictor trained on a mix would learn the protocols' difference as noise."""
    if not rows:
        return rows
    from collections import Counter

    counts = Counter((r["threads"], r["backend"], r["protocol"]) for r in rows)
    usable = [k for k, _ in counts.most_common()
              if (threads is None or k[0] == threads) and (backend is None or k[1] == backend)
              and (protocol is None or k[2] == protocol)]
    if not usable:
        have = ", ".join(f"{b} at {t} thread(s) ({n})" for (t, b, _), n in Counter(
            (r["threads"], r["backend"], "") for r in rows).most_common())
        want_t = threads if threads is not None else "any"
        under = f" under protocol {protocol}" if protocol is not None else ""
        raise DataError(f"{device} has no {phase} measurements of back-end {backend or 'any'} at {want_t} thread(s)"
                        f"{under} in {store.described}", f"pick one it has: {have} (--backend, --threads)")
    want = usable[0]
    if len(counts) > 1:
        protocols = store.protocols()
        others = ", ".join(f"{n} at {t} thread(s) {b} under {_describe(protocols, p)}"
                           for (t, b, p), n in counts.items() if (t, b, p) != want)
        # said when the choice was the store's (the most measured), not the caller's
        (log.debug if backend is not None else log.info)(
            "%s %s: using the %d measurements at %d thread(s) %s under %s (the store also has %s)", device, phase,
            counts[want], want[0], want[1], _describe(protocols, want[2]), others)
    return [r for r in rows if (r["threads"], r["backend"], r["protocol"]) == want]


def _describe(protocols: dict, digest: str) -> str:
    p = protocols.get(digest)
    return f"protocol {digest} ({p.describe()})" if p is not None else f"protocol {digest}"


def paired_latency(rows: list[dict], seq: np.ndarray, past: np.ndarray) -> tuple[np.ndarray, int]:
    """Latency per measurement: the median, or for a paired cell (timed alternately with a
    fixed companion model) its ratio to the companion times the companion's median over all
    paired cells of that shape. The board's common slow phases cancel in the ratio; the
    scale stays milliseconds of a typical moment."""
    y = np.array([r["median_ms"] for r in rows], dtype=np.float64)
    ratio = np.array([np.nan if r.get("paired_ratio") is None else r["paired_ratio"] for r in rows], dtype=np.float64)
    comp = np.array([np.nan if r.get("companion_ms") is None else r["companion_ms"] for r in rows], dtype=np.float64)
    ok = np.isfinite(ratio) & np.isfinite(comp) & (ratio > 0)
    for s, p in set(zip(seq[ok].tolist(), past[ok].tolist())):
        k = ok & (seq == s) & (past == p)
        y[k] = ratio[k] * float(np.median(comp[k]))
    return y, int(ok.sum())


def device_info(store: Store, fingerprint: str) -> dict:
    for d in store.devices():
        if d["fingerprint"] == fingerprint:
            return json.loads(d["info"])
    return {}
