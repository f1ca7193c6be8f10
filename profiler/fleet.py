"""Many boards, one sweep: ``profile-device --host jetson-1,jetson-2`` or an inventory group.

Every board gets its own ``Profiler`` (its own thread, SSH link, agent and store connection)
over the same sub-networks. Boards whose handshakes give one fingerprint are one device: they
plan the same jobs (the job key covers the fingerprint, not the board), and the store's
leases (``Store.claim``, renewed by each sweep's heartbeat) hand each job to exactly one of
them: every board takes the next job nobody holds, so a fast board measures more and never
waits for a slow one, and one board measures one job at a time. Boards of other fingerprints
are other devices in the same run. A board that drops out gives its jobs back; the boards of
its device that are still sweeping take them up before they finish (``Profiler._sweep_up``).
The same leases let several ``profile-device`` processes, on one host or several, share one
store."""

from __future__ import annotations

import copy
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from profiler.database import Location
from profiler.errors import HostError
from profiler.fingerprint import device_fingerprint
from profiler.store import Store
from profiler.sweep import Profiler, SweepSpec, SweepSummary
from profiler.targets import Target

log = logging.getLogger(__name__)


@dataclass
class FleetSummary:
    """Per-board summaries of one sweep over several boards, and the wall time of all."""

    boards: list[SweepSummary]
    seconds: float = 0.0
    devices: dict[str, list[str]] = field(default_factory=dict)  # fingerprint -> its boards

    @property
    def measured(self) -> int:
        """Cells measured in this run, by all boards."""
        return sum(s.measured for s in self.boards)

    @property
    def already_done(self) -> int:
        """Cells found measured before this run (each device's, counted once)."""
        per_device: dict[str, int] = {}
        for s in self.boards:
            per_device[s.fingerprint] = max(per_device.get(s.fingerprint, 0), s.already_done)
        return sum(per_device.values())

    @property
    def failed(self) -> list[dict[str, Any]]:
        return [f for s in self.boards for f in s.failed]

    @property
    def subnets_per_hour(self) -> float:
        """Sub-networks with at least one cell measured in this run, per hour of wall time."""
        done = {(s.fingerprint, h) for s in self.boards for h in s.subnets}
        return len(done) * 3600.0 / self.seconds if self.seconds > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"boards": [s.to_dict() for s in self.boards], "seconds": self.seconds, "devices": self.devices,
                "subnets_per_hour": self.subnets_per_hour}


def device_names(fingerprints: dict[str, str | None], group: str | None) -> dict[str, str]:
    """The store's name for each fingerprint: the group's name when the boards came from one
    inventory group (one fingerprint), else the first board (in the order given) with it."""
    names: dict[str, str] = {}
    distinct = {fp for fp in fingerprints.values() if fp}
    for board, fp in fingerprints.items():
        if fp and fp not in names:
            names[fp] = group if group and len(distinct) == 1 else board
    return names


def run_fleet(ws: Any, boards: list[tuple[Target, SweepSpec]], db: Location, configs: list[Any],
              progress: Callable[[str], Callable[[int, int, str], None]] | None = None,
              args_record: dict[str, Any] | None = None, group: str | None = None) -> FleetSummary:
    """Sweep ``configs`` on every board at once, each with its own settings (its threads and
    back-end may differ; ``progress(board)`` gives each board's progress callback). A board
    that cannot be reached, or drops out, ends with its summary's ``stopped`` set and the
    others go on; a sweep of one board raises its error instead."""
    t0 = time.perf_counter()
    targets = [t for t, _ in boards]
    hellos, errors = _handshakes(targets)
    fps = {t.spec.name: (device_fingerprint(hellos[t.spec.name]) if t.spec.name in hellos else None)
           for t in targets}
    names = device_names(fps, group)
    summaries: dict[str, SweepSummary] = {}
    raised: dict[str, Exception] = {}
    threads = []
    for t, spec in boards:
        name = t.spec.name
        if name in errors:
            summaries[name] = SweepSummary(name, "", board=name, stopped=str(errors[name].problem))
            continue
        board_progress = progress(name) if progress else None
        th = threading.Thread(target=_board, name=f"sweep {name}", daemon=True,
                              args=(ws, t, db, copy.deepcopy(spec), configs, board_progress, args_record,
                                    names[fps[name] or ""], hellos[name], summaries, raised))
        th.start()
        threads.append(th)
    for th in threads:
        th.join()
    if len(boards) == 1 and (errors or raised):
        raise next(iter({**errors, **raised}.values()))
    devices: dict[str, list[str]] = {}
    for board, fp in fps.items():
        if fp:
            devices.setdefault(fp, []).append(board)
    return FleetSummary([summaries[t.spec.name] for t in targets], time.perf_counter() - t0, devices)


def _handshakes(targets: list[Target]) -> tuple[dict[str, dict[str, Any]], dict[str, HostError]]:
    """Start every board's agent in parallel: (hello by board, error by board)."""
    hellos: dict[str, dict[str, Any]] = {}
    errors: dict[str, HostError] = {}

    def start(t: Target) -> None:
        try:
            hellos[t.spec.name] = t.start()
        except HostError as e:
            errors[t.spec.name] = e
            log.warning("board %s is not reachable: %s", t.spec.name, e.problem)

    threads = [threading.Thread(target=start, args=(t,), daemon=True) for t in targets]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    if not hellos:
        first = next(iter(errors.values()))
        if len(targets) == 1:
            raise first
        raise HostError(f"no board of the sweep could be reached ({first.problem})",
                        first.fix or "check the boards' addresses and that sshd runs on them")
    return hellos, errors


def _board(ws: Any, target: Target, db: Location, spec: SweepSpec, configs: list[Any],
           progress: Callable[[int, int, str], None] | None, args_record: dict[str, Any] | None, device_name: str,
           hello: dict[str, Any], out: dict[str, SweepSummary], raised: dict[str, Exception]) -> None:
    """One board's sweep, in its own thread with its own store connection."""
    store = Store(db)
    profiler = Profiler(ws, target, store, spec, progress, device_name=device_name)
    try:
        out[target.spec.name] = profiler.run(configs, args_record, hello=hello)
    except Exception as e:  # a board that drops out (or a bug) stops this board only
        raised[target.spec.name] = e
        if not isinstance(e, HostError):
            log.exception("board %s stopped", target.spec.name)
        summary = profiler.summary or SweepSummary(device_name, "", board=target.spec.name)
        summary.stopped = str(e.problem) if isinstance(e, HostError) else f"{type(e).__name__}: {e}"
        out[target.spec.name] = summary
    finally:
        store.close()
