from __future__ import annotations

from pathlib import Path
from typing import Any

from profiler.hosts import resolve_host
from profiler.store import Store
from profiler.sweep import Profiler, SweepSpec, SweepSummary
from profiler.targets import Timeouts, make_target

# Short cells: these tests check behaviour, not latency.
FAST_TIMING = {"min_time_s": 0.03, "max_time_s": 0.3, "min_runs": 5, "warmup_s": 0.0, "warmup_runs": 1}


def sweep(ws: Any, host: str, db: Path, configs: list[Any], inventory: Path | None = None,
          ssh_config: Path | None = None, accept_new_host_key: bool = False, target_cls: Any = None,
          timeouts: Timeouts | None = None, **spec_kw: Any) -> SweepSummary:
    spec_kw.setdefault("seq_lens", (16,))
    spec_kw.setdefault("past_lens", (16,))
    spec_kw.setdefault("timing", FAST_TIMING)
    spec_kw.setdefault("reference_every", 0)
    spec = SweepSpec(**spec_kw)
    host_spec = resolve_host(host, inventory, ssh_config)
    timeouts = timeouts or Timeouts(connect=10, handshake=60, measure=60, upload_stall=20)
    if target_cls is None:
        target = make_target(host_spec, timeouts, accept_new_host_key, inventory, ssh_config)
    else:
        target = target_cls(host_spec, timeouts, accept_new_host_key, inventory, ssh_config)
    store = Store(db)
    try:
        return Profiler(ws, target, store, spec).run(configs)
    finally:
        store.close()
