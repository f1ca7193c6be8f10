"""A profiling sweep: sub-networks x phases x shapes on one device, as resumable jobs.

Each job: export the sub-network (content-addressed, graph only by default), upload it
unless the board has it, measure, and store the result in the same transaction that marks
the job done. Faults are classified; transient ones are retried within a limit after
reconnecting; deterministic ones (out of memory, wrong answer) fail the job at once. A
reference sub-network is re-measured every N jobs to catch drift (thermal, other load)."""

from __future__ import annotations

import contextlib
import json
import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from export.gguf_file import GGUF_PRECISIONS, GgufOptions, export_gguf
from export.onnx_graphs import MIN_OPSET, ExportedSubnet, ExportOptions, export_subnet, min_ir_version
from export.quantize import GGUF_PRESETS
from export.quantize import PRECISIONS as ONNX_PRECISIONS
from profiler.errors import ErrorClass, HostError, MeasureError
from profiler.fingerprint import device_fingerprint
from profiler.owner import owner_alive, owner_id
from profiler.protocol import Protocol
from profiler.round_batch import RoundBatch
from profiler.rounds import RoundsPlan, paired_refused
from profiler.store import Job, Store, job_key
from profiler.targets import Target
from subnets.config import SubnetConfig
from subnets.cost import count_params
from subnets.errors import ConfigError
from subnets.paths import cache_dir

LLAMA_CPP_BACKENDS = ("llama.cpp", "llama.cpp-py")  # llama-bench; the Python binding (llama-cpp-python)

log = logging.getLogger(__name__)


@dataclass
class SweepSpec:
    phases: tuple[str, ...] = ("prefill", "decode")
    seq_lens: tuple[int, ...] = (128,)
    past_lens: tuple[int, ...] = (128,)
    batch: int = 1
    threads: int = 1
    backend: str = "ort-cpu"
    timing: dict[str, Any] = field(default_factory=dict)
    # A decode step is short and memory-bound: its median wanders with other tenants' memory
    # traffic on a time scale of seconds, which a within-cell CI cannot see. On this box the
    # spread of a decode cell's median over repeats fell from 4.5% (0.3 s timed) to 2.5% (1 s)
    # and 1.3-1.6% (3 s), so decode cells get a longer minimum (None: the same as prefill).
    decode_min_time_s: float | None = None
    # Decode cells are split over this many fresh sessions (the timed seconds unchanged): a
    # decode step's level moves with where a session's weights land (agent_timing.per_session).
    decode_sessions: int | None = None
    weights: str = "none"  # "none": graph only, the board materializes weights; "real": ship them
    # TensorRT: engine precision fp16 (default) or fp32; onnxruntime: the linear layers'
    # weights fp32 (default), int8 (MatMulInteger, dynamic activations) or int4 (MatMulNBits),
    # or the whole graph in fp16
    precision: str | None = None
    block_size: int = 32  # int4 weights: inputs per scale
    graph_opt: str = "all"  # onnxruntime back-ends: graph optimization level
    gpu_layers: int = 0  # llama.cpp: layers offloaded to the board's GPU (-ngl)
    graph: str = "plain"  # onnxruntime: "plain" operators, or "fused" contrib decoder operators (GroupQueryAttention)
    # each tensor group at its own type (an export.mix.PrecisionMix of the back-end's runtime
    # for the swept sub-network's kept layers) in place of one precision; stored as the
    # back-end <backend>:mix-<digest> (llama.cpp GGUF types, or onnxruntime's per MatMul)
    mix: Any = None

    def check(self) -> None:
        """Settings the back-end cannot run, refused before anything is measured."""
        if self.graph != "plain" and (self.is_llama_cpp or self.is_tensorrt):
            raise ConfigError(f"--graph {self.graph} is an onnxruntime graph variant", "drop --graph with this back-end")
        if self.rounds is not None and self.paired:
            raise paired_refused()
        if self.is_llama_cpp and (self.paired or self.batch != 1):
            raise ConfigError("llama-bench times one sequence at a time, alone",
                              "drop --paired and --batch with --backend llama.cpp")
        if self.mix is not None:
            runtime = "llama.cpp" if self.is_llama_cpp else None if self.is_tensorrt else "onnxruntime"
            if self.mix.runtime != runtime:
                raise ConfigError(f"a {self.mix.runtime} precision mix cannot be swept on {self.backend}",
                                  "profile a llama.cpp mix with --backend llama.cpp and an onnxruntime mix "
                                  "with --backend ort-cpu")
            if runtime == "onnxruntime" and (self.graph != "plain" or self.resolved_precision != "fp32"):
                raise ConfigError("an onnxruntime precision mix is swept as plain graphs with per-MatMul types",
                                  "drop --graph and --precision with --mix")
        ok = (("fp16", "fp32") if self.is_tensorrt else (*GGUF_PRECISIONS, *GGUF_PRESETS) if self.is_llama_cpp
              else ONNX_PRECISIONS)
        if self.is_llama_cpp and self.resolved_precision in GGUF_PRESETS and self.weights != "real":
            raise ConfigError(f"the {self.resolved_precision} preset is written by llama-quantize on this host, "
                              "with its real weights", "profile it with --weights real")
        if self.resolved_precision not in ok:
            raise ConfigError(f"back-end {self.backend} does not run {self.resolved_precision} here",
                              f"pass --precision {' or '.join(ok)} with --backend {self.backend}")

    @property
    def is_tensorrt(self) -> bool:
        return self.backend in ("trt", "trtexec")

    @property
    def is_llama_cpp(self) -> bool:
        """llama.cpp back-ends: its llama-bench tool, or its Python binding (``llama.cpp-py``)."""
        return self.backend in LLAMA_CPP_BACKENDS

    @property
    def resolved_precision(self) -> str:
        if self.precision:
            return self.precision
        return "fp16" if self.is_tensorrt else "f16" if self.is_llama_cpp else "fp32"

    @property
    def weights_precision(self) -> str | None:
        """The graph's weight precision as recorded (None: fp32 onnxruntime graphs, as before
        precisions existed; int4 carries its block size)."""
        p = self.resolved_precision
        if self.mix is not None and not self.is_tensorrt:
            return f"mix-{self.mix.digest()}"
        if self.is_llama_cpp:
            return p
        if self.is_tensorrt or p == "fp32":
            return None
        # "-qhead": the LM head multiplied at int8 (exporter 3 on): other graphs than the plain tags before
        return f"int4-b{self.block_size}-qhead" if p == "int4" else f"{p}-qhead" if p == "int8" else p

    @property
    def backend_tag(self) -> str:
        """The back-end as stored: TensorRT engines differ by precision, onnxruntime sessions
        by graph optimization level and weight precision, so these are part of it."""
        if self.is_tensorrt:
            return f"{self.backend}:{self.resolved_precision}"
        if self.is_llama_cpp:  # a GGUF weight type; layers offloaded to a GPU are another back-end
            return f"{self.backend}:{self.weights_precision}" + (f":ngl{self.gpu_layers}" if self.gpu_layers else "")
        tag = self.backend if self.graph_opt == "all" else f"{self.backend}:opt-{self.graph_opt}"
        if self.graph != "plain":
            tag = f"{tag}:{self.graph}"
        return tag if self.weights_precision is None else f"{tag}:{self.weights_precision}"
    opset: int = 17
    max_attempts: int = 3
    reconnect_attempts: int = 4
    reference_every: int = 20
    drift_threshold: float = 0.03
    retry_failed: bool = False
    # Delete each sub-network's files from the board once its cells are measured: boards have
    # small disks, and 120 SmolLM2 sub-networks with weights take ~30 GB.
    keep_models: bool = False
    # Time every cell alternately with the reference sub-network and store the ratio: shared
    # or thermally drifting boards slow all models at once, which the ratio cancels.
    paired: bool = False
    # per-phase timing settings replacing the above (verification repeats a predictor's own)
    phase_timing: dict[str, dict[str, Any]] | None = None
    # A claimed job stays this sweep's for lease_s seconds, renewed by a heartbeat every third
    # of it: a sweep whose process dies loses its jobs to the others within lease_s.
    lease_s: float = 30.0
    # After its cells are done, a sweep measures this share of them again (at least
    # repeat_min per phase, where it has that many): the board's repeatability, stored and
    # reported (profiler.repeatability). 0 and 0: never.
    repeat_share: float = 0.1
    repeat_min: int = 3
    # None: each cell timed to completion before the next; a plan: cells interleaved in
    # rounds, a batch at a time (profiler.rounds), the reference in every round
    rounds: RoundsPlan | None = None

    def timing_for(self, phase: str) -> dict[str, Any]:
        if self.phase_timing is not None and phase in self.phase_timing:
            return dict(self.phase_timing[phase])
        timing = dict(self.timing)
        if phase == "decode" and self.decode_min_time_s is not None:
            timing["min_time_s"] = max(float(timing.get("min_time_s", 0.0)), self.decode_min_time_s)
            timing["max_time_s"] = max(float(timing.get("max_time_s", 20.0)), timing["min_time_s"])
        if phase == "decode" and self.decode_sessions is not None:
            timing["sessions"] = self.decode_sessions
        return timing

    def protocol(self, phase: str, options: ExportOptions | GgufOptions, companion: str | None) -> Protocol:
        """Everything besides the cell that decides this phase's numbers (``companion``: the
        paired companion's hash, None for an unpaired cell such as a drift reference)."""
        precision = self.resolved_precision if self.is_tensorrt else self.weights_precision
        return Protocol(timing=self.timing_for(phase), weights=self.weights, paired=companion is not None,
                        companion=companion, opset=options.opset, ir_version=options.ir_version,
                        graph_opt=self.graph_opt, precision=precision,
                        schedule=self.rounds.to_dict() if self.rounds is not None else None)


@dataclass
class SweepSummary:
    device: str
    fingerprint: str
    board: str = ""  # the board that measured (a device of a fleet may be several boards)
    jobs: int = 0
    already_done: int = 0
    measured: int = 0
    failed: list[dict[str, Any]] = field(default_factory=list)
    faults: list[dict[str, Any]] = field(default_factory=list)  # every failed attempt, recovered or not
    skipped_failed: int = 0
    held_elsewhere: int = 0  # jobs another live sweep of the same store was measuring
    retries: int = 0
    reconnects: int = 0
    references: dict[str, list[float]] = field(default_factory=dict)  # per phase, the reference's medians
    drift: list[str] = field(default_factory=list)
    unstable: int = 0
    throttled: int = 0
    rounds: int = 0  # bursts timed in interleaved rounds (references included)
    seconds: dict[str, float] = field(default_factory=lambda: {"export": 0.0, "upload": 0.0, "session_load": 0.0,
                                                              "timing": 0.0, "total": 0.0})
    bytes_uploaded: int = 0
    evicted_bytes: int = 0
    subnets_measured: int = 0
    subnets: list[str] = field(default_factory=list)  # the sub-networks with a cell measured here
    stopped: str | None = None
    warnings: list[str] = field(default_factory=list)
    # per phase: profiler.repeatability.Repeatability of this sweep's cells measured twice
    repeatability: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def subnets_per_hour(self) -> float:
        t = self.seconds["total"]
        return self.subnets_measured * 3600.0 / t if t > 0 else 0.0

    @property
    def jobs_per_hour(self) -> float:
        t = self.seconds["total"]
        return self.measured * 3600.0 / t if t > 0 else 0.0

    def failure_counts(self) -> dict[str, int]:
        return dict(Counter(f["error_class"] for f in self.failed))

    def fault_counts(self) -> dict[str, int]:
        return dict(Counter(f["error_class"] for f in self.faults))

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["subnets_per_hour"] = self.subnets_per_hour
        d["jobs_per_hour"] = self.jobs_per_hour
        return d


def tag_precision(tag: str) -> str | None:
    """The weights' precision a back-end tag records (``SweepSpec.backend_tag``): a GGUF type
    for llama.cpp, ``int8-qhead``/``int4-b32-qhead``/``fp16``/``mix-<digest>`` for onnxruntime, None for fp32 onnxruntime
    graphs and TensorRT engines (whose tag carries the engine's precision instead)."""
    parts = tag.split(":")
    if parts[0] in LLAMA_CPP_BACKENDS:
        return parts[1] if len(parts) > 1 else None
    if parts[0] in ("trt", "trtexec"):
        return None
    return parts[-1] if parts[-1].startswith(("int8", "int4", "fp16", "mix-")) else None


def choose_backend(hello: dict[str, Any]) -> str:
    """``--backend auto``: the fastest runtime the handshake offers, TensorRT EP over CUDA EP
    over CPU."""
    providers = set((hello.get("onnxruntime") or {}).get("providers") or [])
    for provider, backend in (("TensorrtExecutionProvider", "ort-trt"), ("CUDAExecutionProvider", "ort-cuda")):
        if provider in providers:
            return backend
    return "ort-cpu"


def board_warnings(hello: dict[str, Any]) -> list[str]:
    """What makes a board's numbers untrustworthy before a single cell runs."""
    out = []
    jetson = ((hello.get("telemetry") or {}).get("jetson") or {})
    clocks = jetson.get("clocks") or {}
    if jetson and not clocks.get("clocks_locked"):
        mode = (jetson.get("nvpmodel") or {}).get("mode_name")
        out.append(f"Jetson clocks are not locked (power mode {mode}): latencies will wander with DVFS; "
                   "run `sudo jetson_clocks` (and keep the nvpmodel mode fixed) before profiling")
    for name, cpu in ((hello.get("telemetry") or {}).get("cpu") or {}).items():
        if cpu.get("governor") in ("powersave", "ondemand", "conservative", "schedutil"):
            out.append(f"CPU governor is {cpu['governor']} ({name}): set 'performance' for steadier latencies")
            break
    return out


def board_gguf_options(hello: dict[str, Any], spec: SweepSpec) -> GgufOptions:
    """llama.cpp sweeps: the board must have the runner asked for (llama-bench, or the Python
    binding), and a GPU back-end to offload to when layers are offloaded."""
    info = hello.get("llama_cpp") or {}
    binding = info.get("binding") or {}
    if spec.backend == "llama.cpp-py":
        if not binding or binding.get("error"):
            why = f"its llama-cpp-python does not load ({binding['error']})" if binding else "it has no llama-cpp-python"
            raise HostError(f"the board cannot run --backend llama.cpp-py: {why}",
                            "`pip install llama-cpp-python` on the board (or use the one scripts/build_llama_cpp.sh "
                            "installs next to the tools), or use --backend llama.cpp (llama-bench)")
        if spec.gpu_layers and not binding.get("gpu_offload"):
            raise HostError("the board's llama-cpp-python was built without GPU offload",
                            "reinstall it with CMAKE_ARGS=-DGGML_CUDA=on (Jetson), or drop --gpu-layers")
        return GgufOptions(precision=spec.resolved_precision, weights=spec.weights, mix=spec.mix)
    if not info.get("llama_bench"):
        also = " (it has llama-cpp-python: --backend llama.cpp-py times through that)" if binding.get("version") else ""
        raise HostError("the board has no llama.cpp llama-bench (not on PATH, nor where the inventory's llama_cpp "
                        f"points){also}", "build llama.cpp on the board (edgenas's scripts/build_llama_cpp.sh does) and "
                        "set llama_cpp = \"/path/to/llama.cpp/bin\" in its inventory entry, or use --backend ort-cpu")
    devices = info.get("devices") or ["CPU"]
    if spec.gpu_layers and devices == ["CPU"]:
        raise HostError("the board's llama.cpp build has no GPU back-end (devices: CPU)",
                        "rebuild llama.cpp with -DGGML_CUDA=ON (Jetson) or -DGGML_VULKAN=ON, or drop --gpu-layers")
    return GgufOptions(precision=spec.resolved_precision, weights=spec.weights, mix=spec.mix)


def board_export_options(hello: dict[str, Any], spec: SweepSpec) -> ExportOptions | GgufOptions:
    """The newest opset up to ``spec.opset`` that the board's runtime loads, with the oldest IR
    version that carries it (GGUF options for llama.cpp)."""
    if spec.is_llama_cpp:
        return board_gguf_options(hello, spec)
    ort = hello.get("onnxruntime") or {}
    max_opset, max_ir = ort.get("max_opset"), ort.get("max_ir_version")
    opset = spec.opset if max_opset is None else min(spec.opset, max_opset)
    if opset < MIN_OPSET:
        raise HostError(f"the board's onnxruntime {ort.get('version')} loads opsets up to {max_opset}; edgenas needs {MIN_OPSET}+",
                        "upgrade onnxruntime on the board (1.8 or newer)")
    ir = min_ir_version(opset)
    if max_ir is not None and ir > max_ir:
        raise HostError(f"the board's onnxruntime takes IR version <= {max_ir}, opset {opset} needs {ir}",
                        "upgrade onnxruntime on the board")
    precision = "fp32" if spec.is_tensorrt else spec.resolved_precision
    supported = ort.get("precisions")
    kinds = {precision} if spec.mix is None else {spec.mix.head, *spec.mix.attention, *spec.mix.mlp}
    if supported is not None and not kinds <= set(supported):
        raise HostError(f"the board's onnxruntime {ort.get('version')} cannot run {', '.join(sorted(kinds))} graphs "
                        f"(it runs {', '.join(supported)}): its operators for them are missing",
                        "upgrade onnxruntime on the board (int4 needs MatMulNBits, 1.17+), or pass another --precision")
    graphs = ort.get("graphs")
    if graphs is not None and spec.graph not in graphs:
        raise HostError(f"the board's onnxruntime {ort.get('version')} lacks the fused decoder operators "
                        "(GroupQueryAttention, SkipSimplifiedLayerNormalization)",
                        "upgrade onnxruntime on the board (1.17 or newer), or pass --graph plain")
    return ExportOptions(opset=opset, ir_version=ir, weights=spec.weights,  # type: ignore[arg-type]
                         precision=precision, block_size=spec.block_size, graph=spec.graph,
                         mix=None if spec.is_tensorrt else spec.mix)


def export_root(ws: Any) -> Path:
    """Where a sweep keeps its exports of ``ws``'s base model (GGUF files under ``gguf/``)."""
    return cache_dir() / "exports" / ws.base.base_id.replace("@", "-")


class Profiler:
    def __init__(self, workspace: Any, target: Target, store: Store, spec: SweepSpec,
                 progress: Callable[[int, int, str], None] | None = None,
                 reference: SubnetConfig | None = None, device_name: str | None = None) -> None:
        self.ws = workspace
        # the device's name in the store: the board's, or its fleet's (profiler.fleet)
        self.device_name = device_name or target.spec.name
        self.summary: SweepSummary | None = None  # the last run's, also when it stopped with an error
        self.target = target
        self.store = store
        self.spec = spec
        self.progress = progress or (lambda done, total, text: None)
        self.reference = reference or workspace.space.full()
        self._exports: dict[str, ExportedSubnet] = {}
        self._on_board: set[str] = set()
        self.owner = owner_id()  # this sweep's job leases
        self._planned: list[Job] = []
        self._batches = 0  # interleaved batches run: each batch's rounds are tagged by it

    # --- pieces -------------------------------------------------------------------------
    def _export(self, config: SubnetConfig, options: ExportOptions | GgufOptions, summary: SweepSummary) -> ExportedSubnet:
        h = config.config_hash()
        if h not in self._exports:
            t0 = time.perf_counter()
            root = export_root(self.ws)
            if isinstance(options, GgufOptions):
                self._exports[h] = export_gguf(self.ws.weights(config), root / "gguf", options,
                                               tokenizer_dir=self.ws.base.path)
            else:
                self._exports[h] = export_subnet(self.ws.weights(config), root, options)
            summary.seconds["export"] += time.perf_counter() - t0
        return self._exports[h]

    def _key(self, subnet_hash: str) -> str:
        """The export key of a sub-network exported in this sweep ("" if not yet)."""
        exported = self._exports.get(subnet_hash)
        return exported.key if exported is not None else ""

    def _measure(self, exported: ExportedSubnet, phase: str, seq_len: int, past_len: int,
                 summary: SweepSummary, options: ExportOptions | GgufOptions | None = None,
                 timing: dict[str, Any] | None = None, fresh: bool = False) -> dict[str, Any]:
        """One cell; with ``options`` and a paired sweep, timed alternately with the reference
        (``timing``: in place of the phase's; ``fresh``: in a newly loaded session)."""
        t0 = time.perf_counter()
        if self.target.ensure_model(exported, self._on_board):
            summary.seconds["upload"] += time.perf_counter() - t0
        companion = None
        if self.spec.paired and options is not None:
            ref = self._export(self.reference, options, summary)
            if ref.key != exported.key:
                t0 = time.perf_counter()
                if self.target.ensure_model(ref, self._on_board):
                    summary.seconds["upload"] += time.perf_counter() - t0
                companion = ref.key
        args = {"key": exported.key, "phase": phase, "batch": self.spec.batch, "seq_len": seq_len,
                "past_len": past_len, "threads": self.spec.threads, "backend": self.spec.backend,
                "timing": timing or self.spec.timing_for(phase), "precision": self.spec.resolved_precision,
                "graph_opt": self.spec.graph_opt, "gpu_layers": self.spec.gpu_layers,
                # one TensorRT engine per model and phase covers the sweep's whole shape grid
                "profile_seq_lens": list(self.spec.seq_lens), "profile_past_lens": list(self.spec.past_lens)}
        if companion is not None:
            args["companion"] = companion
        if fresh:
            args["fresh"] = True
        result = self.target.call("measure", args, timeout=self.target.timeouts.measure)
        result["settings"] = dict(result.get("settings") or {}, board=self.target.spec.name)  # which board of a fleet
        if not result.get("session_reused"):
            summary.seconds["session_load"] += result.get("load_ms", 0.0) / 1000.0
        summary.seconds["timing"] += result.get("timing_s", 0.0)
        return result

    def _recover(self, err: MeasureError, summary: SweepSummary) -> None:
        """Bring the agent back after a fault that may have taken it (or the link) down."""
        if err.error_class == ErrorClass.LOAD_ERROR:
            return  # the agent is fine; the model will be re-sent
        # Anything else may have taken the agent or the link down, or left a half-built
        # session behind: start clean.
        delay = 1.0
        for attempt in range(1, self.spec.reconnect_attempts + 1):
            try:
                self.target.restart()
                summary.reconnects += 1
                self._on_board = self.target.models_on_board()
                log.info("reconnected to %s (attempt %d)", self.target.spec.name, attempt)
                return
            except (HostError, MeasureError, OSError) as e:
                log.warning("reconnect %d/%d to %s failed: %s", attempt, self.spec.reconnect_attempts,
                            self.target.spec.name, e)
                time.sleep(delay)
                delay = min(delay * 2, 30.0)
        raise HostError(f"lost {self.target.spec.name} and could not reconnect after {self.spec.reconnect_attempts} tries "
                        f"(last fault: {err.error_class.value}: {err.message})",
                        "check the board; rerun the same command to resume (finished measurements are kept)")

    def _evict(self, keys: set[str], summary: SweepSummary) -> None:
        """Free the board's disk; a failure here is logged, never fatal to the sweep."""
        keys = {k for k in keys if k}
        if not keys:
            return
        try:
            r = self.target.call("evict", {"keys": sorted(keys), "uploader": self.target.token[:16]},
                                 timeout=self.target.timeouts.handshake)
            summary.evicted_bytes += int(r.get("freed_bytes") or 0)
        except (MeasureError, HostError, OSError) as e:
            log.warning("could not delete %d model(s) from %s: %s", len(keys), self.target.spec.name, e)
        self._on_board -= keys

    def _measure_reference(self, exported: ExportedSubnet, phase: str, seq: int, past: int,
                           summary: SweepSummary) -> dict[str, Any]:
        """The reference cell; a reference the board no longer has (its model cache was
        cleared) is sent again once, as a job's model would be, rather than lost for the sweep."""
        try:
            return self._measure(exported, phase, seq, past, summary)
        except MeasureError as e:
            if e.error_class != ErrorClass.LOAD_ERROR:
                raise
            summary.faults.append({"job": "reference", "attempt": 1, "error_class": e.error_class.value,
                                   "message": e.message[:300]})
            self._on_board.discard(exported.key)
            return self._measure(exported, phase, seq, past, summary)

    def reference_shape(self, phase: str) -> tuple[int, int]:
        """(seq_len, past_len) of a phase's reference cell: the sweep's first shape."""
        return (self.spec.seq_lens[0], 0) if phase == "prefill" else (1, self.spec.past_lens[0])

    def _reference(self, options: ExportOptions | GgufOptions, device_id: int, summary: SweepSummary) -> None:
        phase = self.spec.phases[0]
        seq, past = self.reference_shape(phase)
        exported = self._export(self.reference, options, summary)
        try:
            r = self._measure_reference(exported, phase, seq, past, summary)
        except MeasureError as e:
            log.warning("reference measurement failed: %s", e)
            return
        self.record_reference(phase, r, exported.key, options, device_id, summary)

    def record_reference(self, phase: str, r: dict[str, Any], export_key: str, options: ExportOptions | GgufOptions,
                         device_id: int, summary: SweepSummary) -> None:
        """Store a reference measurement and warn when it moved from the store's first."""
        seq, past = self.reference_shape(phase)
        self.store.add_subnet(self.reference.config_hash(), self.reference.base_id, self.reference.to_json(),
                              count_params(self.reference, self.ws.space.dims), self.reference.summary())
        protocol = self.store.add_protocol(self.spec.protocol(phase, options, None))
        self.store.add_reference(device_id, self.reference.config_hash(), phase, self.spec.batch, seq, past,
                                 self.spec.backend_tag, self.spec.threads, r, export_key, protocol)
        summary.references.setdefault(phase, []).append(r["median_ms"])
        prior = [row["median_ms"] for row in self.store.references(device_id)
                 if row["phase"] == phase and row["seq_len"] == seq and row["past_len"] == past
                 and row["threads"] == self.spec.threads and row["backend"] == self.spec.backend_tag
                 and row["protocol"] == protocol]
        base = prior[0] if prior else r["median_ms"]
        change = r["median_ms"] / base - 1.0
        if abs(change) > self.spec.drift_threshold:
            msg = (f"reference drifted {change:+.1%} ({base:.2f} -> {r['median_ms']:.2f} ms) after "
                   f"{summary.measured} jobs")
            summary.drift.append(msg)
            log.warning(msg)

    # --- the sweep ----------------------------------------------------------------------
    def _plan(self, configs: list[SubnetConfig], fp: str, device_id: int, options: ExportOptions | GgufOptions,
              summary: SweepSummary) -> list[Job]:
        """Register the sweep's jobs (keyed by cell and protocol) and return those to measure."""
        spec = self.spec
        with self.store.tx():
            for c in configs:
                self.store.add_subnet(c.config_hash(), c.base_id, c.to_json(), count_params(c, self.ws.space.dims), c.summary())
        companion = self.reference.config_hash() if spec.paired else None
        self._release_dead_leases()
        rows = []
        for phase in spec.phases:
            protocol = self.store.add_protocol(spec.protocol(phase, options, companion))
            shapes = [(s, 0) for s in spec.seq_lens] if phase == "prefill" else [(1, p) for p in spec.past_lens]
            for c in configs:
                # the companion itself is timed unpaired (a ratio of 1 says nothing)
                proto = protocol if c.config_hash() != companion else self.store.add_protocol(spec.protocol(phase, options, None))
                for seq, past in shapes:
                    rows.append({"job_key": job_key(fp, c.config_hash(), phase, spec.batch, seq, past, spec.backend_tag,
                                                    spec.threads, proto),
                                 "device_id": device_id, "subnet_hash": c.config_hash(), "phase": phase,
                                 "batch": spec.batch, "seq_len": seq, "past_len": past, "backend": spec.backend_tag,
                                 "threads": spec.threads, "protocol": proto})
        self.store.add_jobs(rows)
        jobs = self.store.jobs_by_key([r["job_key"] for r in rows])
        self._planned = jobs  # every cell of the plan, done or not: the repeat pass chooses among them
        summary.jobs = len(jobs)
        summary.already_done = sum(j.status == "done" for j in jobs)
        failed = [j for j in jobs if j.status == "failed"]
        if spec.retry_failed:
            self.store.reset_attempts([j.id for j in failed])
            jobs = self.store.jobs_by_key([r["job_key"] for r in rows])
        else:
            summary.skipped_failed = len(failed)
            summary.failed += [{"subnet": j.subnet_hash, "phase": j.phase, "seq_len": j.seq_len, "past_len": j.past_len,
                                "error_class": j.error_class, "attempts": j.attempts,
                                "message": "failed in an earlier sweep"} for j in failed]
        pending = [j for j in jobs if j.status not in ("done", "failed")]
        order = {c.config_hash(): i for i, c in enumerate(configs)}
        pending.sort(key=lambda j: (order[j.subnet_hash], j.phase, j.seq_len, j.past_len))
        return pending

    def _release_dead_leases(self) -> None:
        """Leases of sweeps on this machine whose process is gone end now, not at expiry."""
        for owner in self.store.lease_owners():
            if not owner_alive(owner):
                self.store.release(owner)

    @contextlib.contextmanager
    def _heartbeat(self) -> Iterator[None]:
        """Renew this sweep's leases every third of ``lease_s`` while the body runs (its own
        store connection: a measurement may block this thread for minutes)."""
        stop = threading.Event()

        def beat() -> None:
            store: Store | None = None
            while not stop.wait(self.spec.lease_s / 3):
                try:
                    store = store or Store(self.store.location)
                    store.renew(self.owner, self.spec.lease_s)
                except Exception as e:  # a store that stops answering for a while: try again next beat
                    log.warning("could not renew the leases of %s (%s); trying again", self.owner, e)
                    if store is not None:
                        with contextlib.suppress(Exception):
                            store.close()
                    store = None
            if store is not None:
                store.close()

        thread = threading.Thread(target=beat, name=f"lease {self.owner}", daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join()

    def _take_freed(self, held: list[Job], by_hash: dict[str, SubnetConfig], options: ExportOptions | GgufOptions,
                    device_id: int, summary: SweepSummary, measured: set[str]) -> list[Job]:
        """Measure the held jobs that are free now; return those still held by a live sweep."""
        self._release_dead_leases()
        state = self.store.job_states([j.id for j in held])
        free = []
        for job in held:
            if state.get(job.id) in ("done", "failed"):
                summary.held_elsewhere += int(state.get(job.id) == "done")
            else:
                free.append(job)
        if self.spec.rounds is not None:
            return self._interleaved(free, by_hash, options, device_id, summary, measured)
        still = []
        for job in free:
            outcome = self._run_job(job, by_hash[job.subnet_hash], options, device_id, summary)
            if outcome == "held":
                still.append(job)
            elif outcome == "measured":
                measured.add(job.subnet_hash)
        return still

    def _interleaved(self, jobs: list[Job], by_hash: dict[str, SubnetConfig], options: ExportOptions | GgufOptions,
                     device_id: int, summary: SweepSummary, measured: set[str], pass_no: int = 0) -> list[Job]:
        """``jobs`` in interleaved rounds, a batch of the plan's size at a time (pass 1: done
        cells re-measured). Returns the jobs another sweep holds."""
        held: list[Job] = []
        size = self.spec.rounds.batch_cells if self.spec.rounds else len(jobs)
        for start in range(0, len(jobs), size):
            self._batches += 1
            batch = RoundBatch(self, jobs[start:start + size], by_hash, options, device_id, summary, pass_no,
                               f"{self.owner}/{pass_no}/{self._batches}")
            held += batch.run()
            measured |= batch.measured
        return held

    def _sweep_up(self, waiting: list[Job], by_hash: dict[str, SubnetConfig], options: ExportOptions | GgufOptions,
                  device_id: int, summary: SweepSummary) -> set[str]:
        """Jobs another sweep held when this one reached them: wait for them, and measure the
        ones whose holder let go (it finished without them, its board dropped out, its process
        died and its lease ran out), until each is done or failed. Returns the sub-networks
        measured here."""
        measured: set[str] = set()
        while waiting:
            waiting = self._take_freed(waiting, by_hash, options, device_id, summary, measured)
            if waiting:
                time.sleep(min(5.0, self.spec.lease_s / 6))
        return measured

    def _run_job(self, job: Job, config: SubnetConfig, options: ExportOptions | GgufOptions, device_id: int,
                 summary: SweepSummary) -> str:
        """Measure one job with retries: "measured", "failed", "held" when another sweep
        process holds it, or "measured elsewhere" when another recorded it first."""
        while True:
            attempts = self.store.claim(job.id, self.owner, self.spec.lease_s)
            if attempts is None:
                return "held"
            try:
                exported = self._export(config, options, summary)
                result = self._measure(exported, job.phase, job.seq_len, job.past_len, summary, options)
                if self.store.finish_job(job, device_id, result, exported.key) is None:
                    summary.held_elsewhere += 1
                    return "measured elsewhere"
                summary.measured += 1
                summary.unstable += int(bool(result.get("unstable")))
                summary.throttled += int(bool(result.get("throttled")))
                return "measured"
            except MeasureError as e:
                final = (not e.error_class.retryable) or attempts >= self.spec.max_attempts
                self.store.fail_job(job.id, e.error_class, e.message, final)
                summary.faults.append({"job": job.id, "attempt": attempts, "error_class": e.error_class.value,
                                       "message": e.message[:300]})
                log.warning("job %s %s failed (attempt %d, %s): %s", config.summary(), job.phase, attempts,
                            e.error_class.value, e.message)
                if e.error_class == ErrorClass.LOAD_ERROR:
                    self._on_board.discard(self._key(job.subnet_hash))
                elif e.error_class == ErrorClass.DISK_FULL:
                    self._evict(self.target.models_on_board() - {self._key(job.subnet_hash)}, summary)
                else:
                    self._recover(e, summary)
                if final:
                    summary.failed.append({"subnet": job.subnet_hash, "phase": job.phase, "seq_len": job.seq_len,
                                           "past_len": job.past_len, "error_class": e.error_class.value,
                                           "attempts": attempts, "message": e.message})
                    return "failed"
                summary.retries += 1

    def _first_pass(self, pending: list[Job], by_hash: dict[str, SubnetConfig], options: ExportOptions | GgufOptions,
                    device_id: int, summary: SweepSummary, measured: set[str]) -> list[Job]:
        """Each pending job in order, skipping those another sweep holds (returned), with a
        reference measurement every ``reference_every`` jobs and each sub-network's files
        evicted from the board after its last cell. Before each job, skipped jobs whose
        holder let go since (it finished, or its process is gone) are taken first."""
        spec, total, since_ref, held = self.spec, len(pending), 0, []
        if spec.rounds is not None:
            return self._interleaved(pending, by_hash, options, device_id, summary, measured)
        if spec.reference_every and pending:
            self._reference(options, device_id, summary)
        for done, job in enumerate(pending):
            if held:
                held = self._take_freed(held, by_hash, options, device_id, summary, measured)
            config = by_hash[job.subnet_hash]
            self.progress(done, total, f"{config.summary()} {job.phase} S={job.seq_len} P={job.past_len}")
            outcome = self._run_job(job, config, options, device_id, summary)
            if outcome == "held":
                held.append(job)
                continue
            if outcome == "measured":
                measured.add(job.subnet_hash)
            last_of_subnet = done + 1 == total or pending[done + 1].subnet_hash != job.subnet_hash
            if last_of_subnet and not spec.keep_models and job.subnet_hash != self.reference.config_hash():
                self._evict({self._key(job.subnet_hash)}, summary)  # the reference stays: it is re-measured
            since_ref += 1
            if spec.reference_every and since_ref >= spec.reference_every:
                since_ref = 0
                self._reference(options, device_id, summary)
        return held

    def _repeat_choice(self, planned: list[Job]) -> list[Job]:
        """The done cells of this plan to measure again: per phase, the share asked (at least
        ``repeat_min``) less those measured twice already, spread over the plan by a fixed
        shuffle (the same cells when a killed sweep resumes)."""
        import math
        import random

        spec = self.spec
        state = self.store.job_states([j.id for j in planned])
        done = [j for j in planned if state.get(j.id) == "done"]
        again = self.store.repeated_jobs([j.id for j in done])
        out = []
        for phase in spec.phases:
            cells = sorted((j for j in done if j.phase == phase), key=lambda j: (j.subnet_hash, j.seq_len, j.past_len))
            want = min(len(cells), max(spec.repeat_min, math.ceil(spec.repeat_share * len(cells))))
            fresh = [j for j in cells if j.id not in again]
            random.Random(phase).shuffle(fresh)
            out += fresh[:max(0, want - (len(cells) - len(fresh)))]
        return out

    def _repeat_pass(self, planned: list[Job], by_hash: dict[str, SubnetConfig], options: ExportOptions | GgufOptions,
                     device_id: int, summary: SweepSummary) -> None:
        """Measure the chosen done cells once more, each stored as it finishes; a cell that
        fails now is logged and left (its first measurement stands)."""
        from profiler.repeatability import by_phase

        chosen = self._repeat_choice(planned) if self.spec.repeat_share > 0 or self.spec.repeat_min > 0 else []
        if self.spec.rounds is not None:
            self._interleaved(chosen, by_hash, options, device_id, summary, set(), pass_no=1)
            chosen = []
        for n, job in enumerate(chosen):
            config = by_hash[job.subnet_hash]
            self.progress(n, len(chosen), f"again: {config.summary()} {job.phase} S={job.seq_len} P={job.past_len}")
            try:
                result = self._measure(self._export(config, options, summary), job.phase, job.seq_len, job.past_len,
                                       summary, options)
            except MeasureError as e:
                log.warning("re-measuring %s %s failed (%s): %s", config.summary(), job.phase, e.error_class.value,
                            e.message)
                continue
            self.store.add_repeat(job.id, self.target.spec.name, result)
        ids = {j.id for j in planned}
        pairs = [r for r in self.store.repeat_pairs(summary.fingerprint) if r["job_id"] in ids]
        summary.repeatability = {ph: r.to_dict() for ph, r in by_phase(pairs).items()}

    def run(self, configs: list[SubnetConfig], args_record: dict[str, Any] | None = None,
            hello: dict[str, Any] | None = None) -> SweepSummary:
        """Measure every cell of ``configs`` not yet in the store (``hello``: the board's
        handshake when the caller started the target already)."""
        t_start = time.perf_counter()
        spec = self.spec
        for c in configs:
            self.ws.space.validate(c)
        hello = hello if hello is not None else self.target.start()
        if spec.backend == "auto":
            spec.backend = choose_backend(hello)
            log.info("back-end for %s: %s", self.target.spec.name, spec.backend)
        spec.check()
        fp = device_fingerprint(hello)
        summary = self.summary = SweepSummary(self.device_name, fp, board=self.target.spec.name)
        summary.warnings.extend(board_warnings(hello))
        for w in summary.warnings:
            log.warning("%s: %s", self.target.spec.name, w)
        device_id = self.store.upsert_device(self.device_name, fp, {"hello": hello, "host": self.target.spec.describe()})
        options = board_export_options(hello, spec)
        sweep_id = self.store.start_sweep(device_id, args_record or {})
        by_hash = {c.config_hash(): c for c in configs}
        pending = self._plan(configs, fp, device_id, options, summary)
        total = len(pending)
        self.progress(0, total, "")
        self._on_board = self.target.models_on_board()
        measured_subnets: set[str] = set()
        try:
            with self._heartbeat():
                held = self._first_pass(pending, by_hash, options, device_id, summary, measured_subnets)
                if held:
                    self.progress(total - len(held), total, f"waiting for {len(held)} job(s) other sweeps hold")
                swept = self._sweep_up(held, by_hash, options, device_id, summary)
                self._repeat_pass(self._planned, by_hash, options, device_id, summary)
            measured_subnets |= swept
            if not spec.keep_models:  # what jobs taken out of order left on the board
                left = {self._key(h) for h in measured_subnets if h != self.reference.config_hash()} & self._on_board
                self._evict(left, summary)
            self.progress(total, total, "done")
        except HostError as e:
            summary.stopped = str(e.problem)
            raise
        finally:
            summary.seconds["total"] = time.perf_counter() - t_start
            summary.bytes_uploaded = self.target.bytes_uploaded
            summary.subnets_measured = len(measured_subnets)
            summary.subnets = sorted(measured_subnets)
            self.store.release(self.owner)
            self.store.finish_sweep(sweep_id, summary.to_dict())
            try:
                self.target.stop(graceful=summary.stopped is None)
            except Exception:
                pass
        return summary


def summary_json(summary: SweepSummary) -> str:
    return json.dumps(summary.to_dict(), indent=1)
