"""What a sweep is asked: one frozen ``SweepRequest`` (field names are ``edgenas profile``'s
flags), validated before the model loads, and ``profile(request)``, the sweep over one board
or several that the command, the main job and the Python API all run."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from profiler.database import Location, describe
from profiler.fleet import FleetSummary
from profiler.rounds import RoundsPlan, paired_refused
from profiler.sweep import SweepSpec
from subnets.config import SubnetConfig
from subnets.errors import ConfigError
from subnets.space import DEFAULT_GRANULARITY

DEFAULT_DB = Path("runs/measurements.db")
# a board's name -> that board's progress callback (done, total, text)
BoardProgress = Callable[[str], Callable[[int, int, str], None]]


@dataclass(frozen=True)
class SweepRequest:
    host: str
    model: str = "smollm2"
    neuron_step: int = 64
    samples: int | None = None
    configs: Path | None = None
    seed: int = 0
    granularity: str = DEFAULT_GRANULARITY
    phases: tuple[str, ...] = ("prefill", "decode")
    seq_len: tuple[int, ...] = (128,)
    past_len: tuple[int, ...] = (128,)
    threads: int | None = None
    backend: str | None = None
    db: Location = DEFAULT_DB
    inventory: Path | None = None
    ssh_config: Path | None = None
    accept_new_host_key: bool = False
    weights: str = "none"
    precision: str | None = None
    graph: str = "plain"
    gpu_layers: int = 0
    block_size: int = 32
    graph_opt: str = "all"
    min_time: float = 1.0
    decode_min_time: float | None = None
    max_time: float = 20.0
    sessions: int = 1
    decode_sessions: int = 3
    target_ci: float = 0.02
    max_attempts: int = 3
    lease: float = 30.0
    reference_every: int = 20
    drift_threshold: float = 0.03
    repeat_share: float = 0.1
    repeat_min: int = 3
    retry_failed: bool = False
    paired: bool = False
    rounds: int = 0  # 0: each cell timed to completion; N: cells interleaved in N rounds or more
    max_rounds: int = 8
    round_cells: int = 12
    normalize_drift: bool = False
    round_quantile: float = 0.5
    keep_models: bool = False
    connect_timeout: float | None = None
    handshake_timeout: float = 120.0
    measure_timeout: float | None = None
    upload_timeout: float = 60.0
    agent_memory_mb: int | None = None
    # the sweep settings as one ``SweepSpec`` for every board (the Python API's way of saying
    # them); None: derived from the fields above and each board's inventory entry
    sweep_spec: SweepSpec | None = None

    def __post_init__(self) -> None:
        for flag, value in (("--sessions", self.sessions), ("--decode-sessions", self.decode_sessions)):
            if value < 1:
                raise ConfigError(f"{flag} {value} is not a session count", f"pass {flag} 1 or more")
        if self.samples is not None and self.samples < 1:
            raise ConfigError(f"--samples {self.samples} is not positive", "ask for at least 1 sample")
        if not self.min_time > 0 or self.max_time < self.min_time:
            raise ConfigError(f"--min-time {self.min_time} / --max-time {self.max_time} is not a time window",
                              "pass --min-time above 0 and --max-time at least as long")
        if not 0 <= self.repeat_share <= 1 or self.repeat_min < 0:
            raise ConfigError(f"--repeat-share {self.repeat_share} / --repeat-min {self.repeat_min} is not a share of "
                              "the cells and a count", "pass --repeat-share in [0, 1] and --repeat-min 0 or more "
                              "(both 0: measure no cell twice)")
        if self.rounds_plan() is not None and self.paired:  # a bad --rounds range fails in rounds_plan
            raise paired_refused()
        if self.threads is not None and self.threads < 1:
            raise ConfigError(f"--threads {self.threads} is not positive", "pass --threads 1 or more")

    def rounds_plan(self) -> RoundsPlan | None:
        if self.rounds == 0:
            return None
        return RoundsPlan(min_rounds=self.rounds, max_rounds=self.max_rounds, target_rel_ci=self.target_ci,
                          batch_cells=self.round_cells, normalize=self.normalize_drift, quantile=self.round_quantile)

    def host_settings(self, host: Any) -> Any:
        """An inventory entry with this request's overrides."""
        if self.agent_memory_mb:
            host = replace(host, agent_memory_mb=self.agent_memory_mb)
        if self.connect_timeout:
            host = replace(host, connect_timeout=self.connect_timeout)
        return host

    def timeouts(self, host: Any) -> Any:
        from profiler.targets import Timeouts

        return Timeouts(connect=host.connect_timeout, handshake=self.handshake_timeout, upload_stall=self.upload_timeout,
                        measure=self.measure_timeout or 3 * self.max_time + 120)

    def spec(self, host: Any) -> SweepSpec:
        """One board's sweep settings: the request's, its inventory entry's threads and
        back-end where the request leaves them out."""
        if self.sweep_spec is not None:
            return self.sweep_spec
        timing = {"min_time_s": self.min_time, "max_time_s": self.max_time, "target_rel_ci": self.target_ci,
                  "sessions": self.sessions}
        return SweepSpec(phases=self.phases, seq_lens=self.seq_len, past_lens=self.past_len,
                         threads=self.threads or host.threads or 1, backend=self.backend or host.backend,
                         timing=timing, decode_min_time_s=self.decode_min_time or 3 * self.min_time,
                         decode_sessions=self.decode_sessions, weights=self.weights, max_attempts=self.max_attempts,
                         reference_every=self.reference_every, drift_threshold=self.drift_threshold,
                         retry_failed=self.retry_failed, precision=self.precision, block_size=self.block_size,
                         graph_opt=self.graph_opt, keep_models=self.keep_models, paired=self.paired,
                         gpu_layers=self.gpu_layers, graph=self.graph, lease_s=self.lease,
                         repeat_share=self.repeat_share, repeat_min=self.repeat_min, rounds=self.rounds_plan())

    def record(self) -> dict[str, Any]:
        """What was asked, as the sweep records it (the store location without a password)."""
        rec = {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(self).items() if k != "sweep_spec"}
        if self.sweep_spec is not None:
            rec["sweep_spec"] = asdict(self.sweep_spec)
        rec["db"] = describe(self.db)
        return rec


def configs_for(request: SweepRequest, ws: Any) -> list[SubnetConfig]:
    """The sub-networks a request names: its configs file, or ``samples`` stratified draws."""
    from subnets.configio import read_configs

    if request.configs is not None:
        configs = read_configs(request.configs)
        for i, c in enumerate(configs, 1):
            try:
                ws.space.validate(c)
            except ConfigError as e:
                raise ConfigError(f"{request.configs}, config {i}: {e.problem}", e.fix) from None
        return configs
    return ws.space.sample(request.samples or 10, request.seed, granularity=request.granularity,
                           strategy="stratified", layer_ranking=ws.importance.layer_ranking())


def profile(request: SweepRequest, ws: Any = None, configs: list[SubnetConfig] | None = None,
            progress: BoardProgress | None = None) -> FleetSummary:
    """Measure the request's sub-networks (or ``configs``) on its board or boards into its
    store; resumes what the store already holds under the same protocol."""
    from profiler.fleet import run_fleet
    from profiler.hosts import resolve_hosts
    from profiler.store import Store
    from profiler.targets import make_target
    from subnets.workspace import Workspace

    hosts, group = resolve_hosts(request.host, request.inventory, request.ssh_config)
    hosts = [request.host_settings(h) for h in hosts]
    for h in hosts:
        if (request.backend or h.backend) != "auto":  # before the long model load
            request.spec(h).check()
    Store(request.db).close()  # open before the long model load: a bad store fails fast
    ws = ws or Workspace.open(request.model, neuron_step=request.neuron_step)
    configs = configs if configs is not None else configs_for(request, ws)
    boards = [(make_target(h, request.timeouts(h), request.accept_new_host_key, request.inventory, request.ssh_config),
               request.spec(h)) for h in hosts]
    return run_fleet(ws, boards, request.db, configs, progress, request.record(), group)
