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
    spec_kw.setdefault("repeat_share", 0.0)  # re-measuring is tested on its own
    spec_kw.setdefault("repeat_min", 0)
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


def roofline_latency(configs: list[Any], dims: Any, phase: str, seq: Any, past: Any, noise: float = 0.01,
                     seed: int = 0, peak: float = 4e7, bw: float = 8e6, launch: float = 0.02) -> Any:
    """Synthetic device latency (ms) from a model the predictor does not contain: each layer
    takes the larger of its compute and memory time (a roofline), MLP widths and head counts
    are padded to hardware tiles, attention grows with the context, plus launch overheads and
    log-normal noise. The predictor's base is a sum of such terms, never their maximum."""
    import math

    import numpy as np

    # peak: MACs/ms, bw: bytes/ms, launch: ms per layer
    seq = np.broadcast_to(np.asarray(seq, dtype=np.float64), (len(configs),))
    past = np.broadcast_to(np.asarray(past, dtype=np.float64), (len(configs),))
    h, hd = dims.hidden_size, dims.head_dim
    out = np.zeros(len(configs))
    for i, c in enumerate(configs):
        tokens = seq[i] if phase == "prefill" else 1.0
        ctx = seq[i] if phase == "prefill" else past[i] + 1
        t = 0.3
        for lc in c.layers:
            heads = 4 * math.ceil(lc.kv_groups * lc.heads_per_group / 4)
            neurons = 128 * math.ceil(lc.neurons / 128)
            macs = tokens * h * (3 * neurons + hd * (2 * heads + 2 * lc.kv_groups)) + 2 * tokens * ctx * heads * hd
            bytes_ = 4 * h * (3 * lc.neurons + hd * (2 * heads + 2 * lc.kv_groups)) + 8 * ctx * lc.kv_groups * hd
            t += max(macs / peak, bytes_ / bw) + launch
        t += max(tokens * h * dims.vocab_size / peak, 4 * h * dims.vocab_size / bw)
        out[i] = t
    return out * np.exp(np.random.default_rng(seed).normal(0, noise, len(out)))
