"""A workstation's background work, on demand: a process that takes a share of one core in
bursts (busy for ``burst_s``, then idle long enough that the busy time is ``share`` of the
whole), for tests and benchmarks that ask how a measurement holds up on an ordinary machine.

The busy part multiplies small matrices and sweeps a buffer larger than a core's caches, so
it takes cache and memory bandwidth from a measured model as well as cycles, as a compiler
or a browser does. Burst lengths are jittered by a seeded generator so the load does not
lock step with a timing loop's period.

    python -m profiler.load_generator --share 0.4 --burst 2 --duration 600

``BackgroundLoad`` starts that process for a ``with`` block and ends it by its pid.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class LoadSpec:
    share: float = 0.4  # of one core, averaged over a busy and an idle spell
    burst_s: float = 2.0  # one busy spell's mean length
    jitter: float = 0.25  # each spell's length varies by up to this share, either way
    buffer_mb: int = 32  # swept once per busy step: larger than a core's caches
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0.0 < self.share < 1.0:
            raise ValueError(f"load share {self.share} is not between 0 and 1 (exclusive): pass e.g. --share 0.4")
        if self.burst_s <= 0:
            raise ValueError(f"burst length {self.burst_s} s is not positive: pass e.g. --burst 2")
        if not 0.0 <= self.jitter < 1.0:
            raise ValueError(f"jitter {self.jitter} is not in [0, 1): pass e.g. --jitter 0.25")

    @property
    def idle_s(self) -> float:
        return self.burst_s * (1.0 - self.share) / self.share

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _busy(until: float, work: Any) -> int:
    """Work until ``until`` (perf_counter seconds); the number of steps done."""
    a, buf = work
    steps = 0
    while time.perf_counter() < until:
        a = a @ a
        a /= float(abs(a).max()) or 1.0
        buf += 1.0  # one pass over the buffer: memory traffic
        steps += 1
    return steps


def run_load(spec: LoadSpec, duration_s: float | None = None) -> dict[str, float]:
    """Alternate busy and idle spells for ``duration_s`` (None: until the process is ended);
    returns the busy share actually taken (wall clock) and the work done."""
    import numpy as np

    rng = np.random.default_rng(spec.seed)
    work = (rng.standard_normal((96, 96)), np.zeros(spec.buffer_mb * 2**20 // 8))
    t0 = time.perf_counter()
    busy = 0.0
    steps = 0
    while duration_s is None or time.perf_counter() - t0 < duration_s:
        spell = spec.burst_s * (1.0 + spec.jitter * rng.uniform(-1, 1))
        start = time.perf_counter()
        steps += _busy(start + spell, work)
        busy += time.perf_counter() - start
        time.sleep(spec.idle_s * (1.0 + spec.jitter * rng.uniform(-1, 1)))
    total = time.perf_counter() - t0
    return {"busy_share": busy / total if total > 0 else 0.0, "seconds": total, "steps": float(steps)}


class BackgroundLoad:
    """The load generator as a child process for the length of a ``with`` block, ended by
    its own pid (never by name); ``None`` runs nothing, so a benchmark's loaded and quiet
    conditions share one code path."""

    def __init__(self, spec: LoadSpec | None) -> None:
        self.spec = spec
        self.proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> BackgroundLoad:
        if self.spec is None:
            return self
        s = self.spec
        env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "profiler.load_generator", "--share", str(s.share), "--burst", str(s.burst_s),
             "--jitter", str(s.jitter), "--buffer-mb", str(s.buffer_mb), "--seed", str(s.seed)],
            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m profiler.load_generator", description=__doc__.split("\n\n")[0])
    ap.add_argument("--share", type=float, default=0.4, help="share of one core taken, e.g. 0.4")
    ap.add_argument("--burst", type=float, default=2.0, help="mean busy spell in seconds")
    ap.add_argument("--jitter", type=float, default=0.25, help="each spell's length varies by up to this share")
    ap.add_argument("--buffer-mb", type=int, default=32, help="memory swept per busy step (MB)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--duration", type=float, default=None, help="seconds to run (default: until ended)")
    a = ap.parse_args(argv)
    try:
        spec = LoadSpec(a.share, a.burst, a.jitter, a.buffer_mb, a.seed)
    except ValueError as e:
        ap.error(str(e))
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    out = run_load(spec, a.duration)
    sys.stderr.write(f"busy {out['busy_share']:.1%} of {out['seconds']:.0f} s\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
