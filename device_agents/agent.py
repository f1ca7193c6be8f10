#!/usr/bin/env python3
"""edgenas device agent: measures ONNX models on this board and answers in JSON lines.

Protocol: one JSON object per line on stdin, {"id": ..., "verb": ..., "args": {...}}; one per
line on stdout, {"id": ..., "ok": true, "result": {...}} or {"id": ..., "ok": false,
"error": {"class": ..., "message": ...}}. Verbs: hello, models, verify, materialize, measure,
evict, telemetry, shutdown.

Everything it writes lies under its root folder (``--root``, by default the folder above its
own). It needs Python 3.8+, numpy and the runtime, and imports no host code."""

import argparse
import errno
import hashlib
import json
import os
import platform
import re
import shutil
import sys
import time
import traceback

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import agent_llamacpp
import agent_onnxprobe
import agent_pidfile
import agent_runtime
import agent_telemetry
import agent_timing
from agent_runtime import AgentError

AGENT_VERSION = "1"
PROTOCOL = 1
# GGUF back-ends: llama-bench, and the Python binding (llama-cpp-python)
LLAMA_CPP_BACKENDS = ("llama.cpp", "llama.cpp-py")
_KEY = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_FILE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
_TOKEN = re.compile(r"^[0-9a-f]{1,32}$")


def disk_free_mb(path):
    try:
        st = os.statvfs(path)
        return st.f_bavail * st.f_frsize / 1048576.0
    except (OSError, AttributeError):
        return None


def tree_bytes(path):
    total = 0
    for dirpath, _, files in os.walk(path):
        for name in files:
            try:
                total += os.path.getsize(os.path.join(dirpath, name))
            except OSError:
                pass
    return total


def sha256_file(path, chunk=1 << 20):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(chunk)
            if not b:
                return h.hexdigest()
            h.update(b)


class Agent(object):
    def __init__(self, root, llama_cpp=None):
        self.root = os.path.abspath(root)
        self.llama_cpp_hint = llama_cpp
        self.models_dir = os.path.join(self.root, "models")
        if not os.path.isdir(self.models_dir):
            os.makedirs(self.models_dir)
        self.np = None
        self.ort = None
        self.import_errors = {}
        try:
            import numpy

            self.np = numpy
        except ImportError as e:
            self.import_errors["numpy"] = str(e)
        try:
            import onnxruntime

            self.ort = onnxruntime
        except ImportError as e:
            self.import_errors["onnxruntime"] = str(e)
        self.sessions = []  # small LRU of (key tuple, OrtSession, load_ms)
        self.companions = {}  # (key, phase, ...) -> OrtSession of a paired sweep's companion
        self.companion_rss = {}  # companion key -> MB its session added to the resident set
        self.probe = None

    # --- helpers ------------------------------------------------------------------------
    def model_dir(self, key, partial=False, uploader=""):
        """A model's folder, or the folder one uploader sends it into (``uploader``: that
        host target's token, so two sweeps sending one model never write into one folder)."""
        if not isinstance(key, str) or not _KEY.match(key):
            raise AgentError("load_error", "invalid model key %r" % (key,))
        if uploader and not _TOKEN.match(uploader):
            raise AgentError("load_error", "invalid uploader token %r" % (uploader,))
        return os.path.join(self.models_dir, key + ((".partial" + ("-" + uploader if uploader else "")) if partial else ""))

    def require_runtime(self, onnx=True):
        missing = [m for m in ("numpy", "onnxruntime") if m in self.import_errors and (onnx or m == "numpy")]
        if missing:
            raise AgentError("load_error", "this board's Python lacks %s; install with `%s -m pip install %s`"
                             % (" and ".join(missing), sys.executable, " ".join(missing)))

    # --- verbs --------------------------------------------------------------------------
    def hello(self, args):
        ort_info = None
        if self.ort is not None:
            if self.probe is None:
                self.probe = agent_onnxprobe.probe(self.ort)
            ort_info = {"version": self.ort.__version__, "providers": self.ort.get_available_providers(),
                        "max_opset": self.probe[0], "max_ir_version": self.probe[1],
                        "precisions": agent_onnxprobe.weight_precisions(self.ort),
                        "graphs": agent_onnxprobe.graph_variants(self.ort)}
        trt_info = {"trtexec": shutil.which("trtexec") or (
            "/usr/src/tensorrt/bin/trtexec" if os.path.isfile("/usr/src/tensorrt/bin/trtexec") else None)}
        try:
            import tensorrt

            trt_info["python"] = tensorrt.__version__
        except Exception:
            trt_info["python"] = None
        return {
            "agent_version": AGENT_VERSION,
            "protocol": PROTOCOL,
            "python": platform.python_version(),
            "python_executable": sys.executable,
            "numpy": getattr(self.np, "__version__", None),
            "onnxruntime": ort_info,
            "tensorrt": trt_info,
            "llama_cpp": agent_llamacpp.info(self.llama_cpp_hint),
            "missing": self.import_errors,
            "board": agent_telemetry.board_info(),
            "telemetry": agent_telemetry.snapshot(),
            "root": self.root,
            "disk_free_mb": disk_free_mb(self.root),
            "pid": os.getpid(),
            "ended_orphan": getattr(self, "ended_orphan", None),
            "other_agents": getattr(self, "other_agents", []),
        }

    def _ensure_models_dir(self):
        if not os.path.isdir(self.models_dir):  # deleted under us: start an empty cache again
            os.makedirs(self.models_dir)

    def models(self, args):
        self._ensure_models_dir()
        out = []
        for name in sorted(os.listdir(self.models_dir)):
            d = os.path.join(self.models_dir, name)
            if os.path.isfile(os.path.join(d, ".verified")):
                out.append(name)
        return {"models": out}

    def verify(self, args):
        """Check the uploaded files of ``key`` against their sha256 and publish them."""
        key = args["key"]
        files = args["files"]
        partial, final = self.model_dir(key, True, args.get("uploader", "")), self.model_dir(key)
        if os.path.isfile(os.path.join(final, ".verified")) and os.path.isdir(partial):
            shutil.rmtree(partial, ignore_errors=True)  # another sweep published it first: keep theirs
        src = partial if os.path.isdir(partial) else final
        bad = []
        for name, digest in sorted(files.items()):
            if not _FILE.match(name):
                raise AgentError("load_error", "invalid file name %r" % name)
            p = os.path.join(src, name)
            if not os.path.isfile(p):
                bad.append("%s missing" % name)
            elif sha256_file(p) != digest:
                bad.append("%s sha256 mismatch (%d bytes on board)" % (name, os.path.getsize(p)))
        if bad:
            raise AgentError("load_error", "upload of %s failed verification: %s" % (key, "; ".join(bad)))
        if src == partial:
            if os.path.isdir(final):
                shutil.rmtree(final, ignore_errors=True)
            try:
                os.rename(partial, final)
            except OSError:
                if not os.path.isfile(os.path.join(final, ".verified")):
                    raise
                shutil.rmtree(partial, ignore_errors=True)  # lost a race to an identical upload
        with open(os.path.join(final, ".verified"), "w") as f:
            json.dump(files, f)
        return {"key": key, "verified": sorted(files)}

    def materialize(self, args):
        """Write a graph-only export's weights file on the board: random normal with a fixed
        seed (never zeros, which some kernels shortcut), in the layout the graph expects."""
        self.require_runtime(onnx=False)
        np = self.np
        d = self.model_dir(args["key"])
        manifest_path = os.path.join(d, "export.json")
        if not os.path.isfile(manifest_path):
            raise AgentError("load_error", "model %s is not on this board" % args["key"])
        with open(manifest_path) as f:
            manifest = json.load(f)
        target = os.path.join(d, manifest["weights_file"])
        if os.path.isfile(target) and os.path.getsize(target) == manifest["weights_bytes"]:
            return {"key": args["key"], "written": False}
        rng = np.random.default_rng(int(args.get("seed", 0)))
        tmp = "%s.tmp%d" % (target, os.getpid())  # two agents may materialize one model at once
        t0 = time.time()
        try:
            if manifest.get("options", {}).get("format") == "gguf":
                agent_llamacpp.materialize_gguf(np, rng, d, manifest, tmp)
            else:
                self._write_weights(np, rng, manifest, tmp)
            os.rename(tmp, target)
        except BaseException:
            if os.path.exists(tmp):  # a half-written file on a full disk would keep it full
                os.remove(tmp)
            raise
        return {"key": args["key"], "written": True, "seconds": time.time() - t0}

    def _write_weights(self, np, rng, manifest, tmp):
        with open(tmp, "wb") as f:
            pos = 0
            for t in manifest["tensors"]:
                if t["offset"] > pos:
                    f.write(b"\0" * (t["offset"] - pos))
                arr = self._random_tensor(np, rng, t)
                f.write(arr.tobytes())
                pos = t["offset"] + t["length"]
            if pos < manifest["weights_bytes"]:
                f.write(b"\0" * (manifest["weights_bytes"] - pos))

    @staticmethod
    def _random_tensor(np, rng, t):
        """Seeded stand-in values for one tensor of the manifest, by kind and dtype: never
        zeros (some kernels shortcut them), quantized values over their whole range."""
        dtype = np.dtype(t.get("dtype", "float32"))
        count = t["length"] // dtype.itemsize
        kind = t["kind"]
        if kind == "q4":  # two 4-bit values a byte
            return rng.integers(0, 256, count, dtype=np.uint8)
        if kind == "q8":
            return rng.integers(-127, 128, count, dtype=np.int8)
        if kind == "scale":  # a block's |max| / 7 for weights of sd 0.02
            return np.abs(0.01 + 0.002 * rng.standard_normal(count)).astype(dtype)
        if kind == "norm":
            return (1.0 + 0.02 * rng.standard_normal(count)).astype(dtype)
        return (0.02 * rng.standard_normal(count)).astype(dtype)

    def evict(self, args):
        """Delete models from the board's cache. The profiler calls this once a sub-network's
        cells are measured: a sweep of hundreds of sub-networks would otherwise fill a small
        board's disk (120 SmolLM2 sub-networks take ~30 GB with their weights)."""
        keys = list(args.get("keys") or [])
        dirs = [self.model_dir(k) for k in keys]  # validates every key before deleting anything
        self.sessions = [s for s in self.sessions if s[0][0] not in keys]
        self.companions = {k: v for k, v in self.companions.items() if k[0] not in keys}
        freed, n = 0, 0
        # another sweep's upload in progress is its own: only ours (and a legacy one) go
        partials = [self.model_dir(k, True, u) for k in keys for u in {"", args.get("uploader", "")}]
        for d in dirs + partials:
            if os.path.isdir(d):
                freed += tree_bytes(d)
                shutil.rmtree(d, ignore_errors=True)
                n += 1
        return {"evicted": n, "freed_bytes": freed, "disk_free_mb": disk_free_mb(self.root)}

    @staticmethod
    def _session_key(args):
        return (args["key"], args["phase"], args.get("backend", "ort-cpu"), int(args.get("threads", 1)),
                bool(args.get("spinning", False)), tuple(args.get("affinity") or ()), str(args.get("graph_opt", "all")))

    def _session(self, args):
        """The session of a measured model, from a two-entry LRU (a model's phases and shapes
        share it; older models' memory is released). ``fresh``: a new load of the model, as an
        interleaved round of a decode cell asks (where a session's weights land sets its level)."""
        key = self._session_key(args)
        if args.get("fresh"):
            self.sessions = [e for e in self.sessions if e[0] != key]
        for i, (k, sess, load_ms) in enumerate(self.sessions):
            if k == key:
                self.sessions.append(self.sessions.pop(i))  # most recently used last
                return sess, load_ms, True
        self.sessions = self.sessions[-1:]  # keep at most two sessions' memory
        sess, load_ms = self._open_session(args, key)
        self.sessions.append((key, sess, load_ms))
        return sess, load_ms, False

    def _open_session(self, args, key):
        d = self.model_dir(args["key"])
        manifest_path = os.path.join(d, "export.json")
        if not os.path.isfile(os.path.join(d, ".verified")) or not os.path.isfile(manifest_path):
            raise AgentError("load_error", "model %s is not on this board (upload it first)" % args["key"])
        with open(manifest_path) as f:
            manifest = json.load(f)
        if args["phase"] not in manifest["graphs"]:
            raise AgentError("load_error", "model %s has no %s graph" % (args["key"], args["phase"]))
        self.materialize({"key": args["key"]})
        t0 = time.perf_counter()
        sess = agent_runtime.OrtSession(self.ort, os.path.join(d, manifest["graphs"][args["phase"]]),
                                        backend=key[2], threads=key[3], spinning=key[4], affinity=list(key[5]) or None,
                                        graph_opt=key[6])
        load_ms = (time.perf_counter() - t0) * 1000.0
        vocab = [t["shape"][0] for t in manifest["tensors"] if t["name"] == "embed"]
        sess.vocab_size = vocab[0] if vocab else 1000
        return sess, load_ms

    def _companion(self, args, batch, seq_len, past_len):
        """The fixed model timed alternately with every cell (``paired`` sweeps): one pinned
        session per phase, kept apart from the LRU of measured models."""
        cargs = dict(args, key=args["companion"])
        key = self._session_key(cargs)
        if key not in self.companions:
            self.companions = {k: v for k, v in self.companions.items() if k[1] != key[1]}  # one per phase
            rss = agent_runtime.rss_mb()
            sess = self._open_session(cargs, key)[0]
            sess.prepare(sess.make_feeds(self.np, batch, seq_len, past_len, sess.vocab_size, seed=0))
            sess.run_once()
            after = agent_runtime.rss_mb()
            self.companion_rss = {key: max(0.0, after - rss) if rss is not None and after is not None else 0.0}
            self.companions[key] = sess
        sess = self.companions[key]
        sess.prepare(sess.make_feeds(self.np, batch, seq_len, past_len, sess.vocab_size, seed=0))
        return sess

    def _tensorrt(self, args, policy):
        """Native TensorRT cells: build the engine for the sweep's profile (cached), then time."""
        import agent_tensorrt

        d = self.model_dir(args["key"])
        with open(os.path.join(d, "export.json")) as f:
            manifest = json.load(f)
        self.materialize({"key": args["key"]})
        onnx_path = os.path.join(d, manifest["graphs"][args["phase"]])
        sess_inputs = agent_runtime.graph_inputs(self.ort, onnx_path)
        batch = int(args.get("batch", 1))
        profile = agent_tensorrt.profile_shapes(sess_inputs, batch, args.get("profile_seq_lens") or [args.get("seq_len", 1)],
                                                args.get("profile_past_lens") or [args.get("past_len", 0)])
        shapes = agent_tensorrt.run_shapes(sess_inputs, batch, int(args.get("seq_len", 1)), int(args.get("past_len", 0)))
        precision = args.get("precision", "fp16")
        cache = os.path.join(self.root, "engines")
        sha = manifest["graph_sha256"][args["phase"]]
        try:
            if args["backend"] == "trtexec":
                be = agent_tensorrt.TrtexecBackend(cache)
                engine, meta = be.build(onnx_path, sha, profile, precision, manifest.get("weights_bytes"))
                times_ms, summary, graph = be.time(engine, shapes, policy.min_time_s, int(policy.warmup_s * 1000))
                times, reason = [t / 1000.0 for t in times_ms], "trtexec"
                extra = {"trtexec_summary": summary, "cuda_graph": graph}
            else:
                be = agent_tensorrt.TensorRTBackend(cache)
                engine, meta = be.build(onnx_path, sha, profile, precision, manifest.get("weights_bytes"))
                run, timed, _ = be.timer(engine, shapes)
                times, reason = agent_timing.run_protocol(run, policy, timed=timed)
                extra = {}
        except ImportError as e:
            raise AgentError("compile_error", "TensorRT Python bindings missing (%s); install TensorRT or use backend trtexec" % e)
        except RuntimeError as e:
            raise AgentError(agent_runtime.classify_exception(e, "compile_error"), str(e)[:1500])
        stats = agent_timing.summarize(times, policy.unstable_cov)
        stats.update(extra)
        stats.update({"stop_reason": reason, "load_ms": meta["build_s"] * 1000.0, "engine": meta,
                      "session_reused": bool(meta.get("cached")), "timing_s": sum(times)})
        return stats

    def _gguf_file(self, args):
        """The GGUF file of a cell (filled in first if it was shipped as a header)."""
        if int(args.get("batch", 1)) != 1:
            raise AgentError("compile_error", "llama.cpp cells time one sequence: use --batch 1 with llama.cpp")
        d = self.model_dir(args["key"])
        with open(os.path.join(d, "export.json")) as f:
            manifest = json.load(f)
        if manifest.get("options", {}).get("format") != "gguf":
            raise AgentError("load_error", "model %s is not a GGUF export" % args["key"])
        self.materialize({"key": args["key"]})
        return os.path.join(d, manifest["weights_file"])

    def _llama_binding(self, args, policy):
        """llama.cpp cells through the Python binding, timed by the agent's own protocol."""
        model = self._gguf_file(args)
        times, reason, load_s, settings = agent_llamacpp.time_binding_cell(
            model, args["phase"], int(args.get("seq_len", 1)), int(args.get("past_len", 0)),
            int(args.get("threads", 1)), policy, int(args.get("gpu_layers", 0)), self.llama_cpp_hint)
        stats = agent_timing.summarize(times, policy.unstable_cov)
        stats.update(self._level(policy, reason, stats, [], [], None))
        stats.update({"stop_reason": reason, "load_ms": load_s * 1000.0, "session_reused": False,
                      "timing_s": sum(times), "raw_ms": [round(t * 1000.0, 4) for t in times], "settings": settings,
                      "versions": {"llama_cpp_python": settings["binding"]}})
        return stats

    def _llama_cpp(self, args, policy):
        """llama.cpp cells: the GGUF file (filled in if shipped as a header), timed by llama-bench."""
        bench = agent_llamacpp.find_llama_bench(self.llama_cpp_hint)
        if bench is None:
            raise AgentError("compile_error", "this board has no llama-bench: build llama.cpp on it (edgenas's "
                             "scripts/build_llama_cpp.sh) and set llama_cpp = \"/path/to/bin\" in the inventory")
        model = self._gguf_file(args)
        t0 = time.perf_counter()
        times, reason, rec, rounds = agent_llamacpp.time_cell(
            bench, model, args["phase"], int(args.get("seq_len", 1)),
            int(args.get("past_len", 0)), int(args.get("threads", 1)), policy, int(args.get("gpu_layers", 0)))
        stats = agent_timing.summarize(times, policy.unstable_cov)
        stats.update(self._level(policy, reason, stats, [], [], None))
        stats.update({"stop_reason": reason, "load_ms": 0.0, "session_reused": False, "rounds": rounds,
                      "timing_s": time.perf_counter() - t0, "raw_ms": [round(t * 1000.0, 4) for t in times],
                      "settings": {"threads": int(args.get("threads", 1)), "gpu_layers": int(args.get("gpu_layers", 0)),
                                   "llama_bench": bench},
                      "versions": {"llama_cpp": "%s (build %s)" % (rec.get("build_commit"), rec.get("build_number"))},
                      "llama_cpp": {k: rec.get(k) for k in ("build_commit", "build_number", "backends", "cpu_info",
                                                             "gpu_info", "model_type", "model_size", "n_threads",
                                                             "n_gpu_layers", "flash_attn", "type_k", "type_v")}})
        return stats

    def measure(self, args):
        gguf = args.get("backend") in LLAMA_CPP_BACKENDS
        self.require_runtime(onnx=not gguf)  # llama.cpp boards need only numpy
        np = self.np
        policy = agent_timing.TimingPolicy.from_dict(args.get("timing"))
        batch, seq_len, past_len = int(args.get("batch", 1)), int(args.get("seq_len", 1)), int(args.get("past_len", 0))
        before = agent_telemetry.snapshot()
        peak_reset = agent_runtime.reset_peak_rss()
        rss0 = agent_runtime.rss_mb()
        if args.get("backend") in ("trt", "trtexec") or gguf:
            run = {"llama.cpp": self._llama_cpp, "llama.cpp-py": self._llama_binding}.get(args["backend"], self._tensorrt)
            stats = run(args, policy)
            after = agent_telemetry.snapshot()
            reasons = agent_telemetry.throttle_reasons(before, after)
            versions = dict(stats.pop("versions", {}), agent=AGENT_VERSION, python=platform.python_version())
            stats.update({"throttled": bool(reasons), "throttle_reasons": reasons, "telemetry_before": before,
                          "telemetry_after": after, "raw_ms": stats.get("raw_ms", []),
                          "settings": dict(stats.get("settings", {}), backend=args["backend"]),
                          "policy": policy.to_dict(),
                          # llama-bench's memory is its own process's, not the agent's
                          "peak_rss_mb": None if args["backend"] == "llama.cpp" else agent_runtime.current_peak_rss_mb(),
                          "versions": versions})
            return stats
        # a companion left resident by an earlier cell is in this cell's peak: subtracted below
        resident = sum(self.companion_rss.get(k, 0.0) for k in self.companions) if args.get("companion") else 0.0
        sess, load_ms, reused = self._session(args)
        feeds = sess.make_feeds(np, batch, seq_len, past_len, sess.vocab_size, seed=int(args.get("seed", 0)))
        sess.prepare(feeds)
        settings = sess.settings
        try:
            sess.check_outputs(np, sess.run_once(), batch)
            cell_peak = agent_runtime.current_peak_rss_mb()  # before any companion or fresh session adds to it
            if cell_peak is not None and resident:
                cell_peak = max(cell_peak - resident, rss0 or 0.0)
            companion = self._companion(args, batch, seq_len, past_len) if args.get("companion") else None
            t_start = time.perf_counter()
            held = [sess]
            del sess  # _time_sessions releases it before loading a fresh session: one copy in memory
            times, other, ratios, reason, per_session = self._time_sessions(args, held, feeds, companion, policy, batch)
            timing_s = time.perf_counter() - t_start
        except AgentError:
            raise
        except Exception as e:
            raise AgentError(agent_runtime.classify_exception(e, "runtime_error"), "run failed: %s" % str(e)[:500])
        after = agent_telemetry.snapshot()
        stats = agent_timing.summarize(times, policy.unstable_cov)
        stats.update(self._level(policy, reason, stats, other, ratios, per_session))
        if companion is not None:
            stats.update({"companion_median_ms": agent_timing.percentile(sorted(other), 50) * 1000.0,
                          "paired_ratio": agent_timing.percentile(sorted(ratios), 50), "companion": args["companion"],
                          "companion_runs": len(other)})
        reasons = agent_telemetry.throttle_reasons(before, after)
        stats.update({
            "stop_reason": reason,
            "throttled": bool(reasons),
            "throttle_reasons": reasons,
            "load_ms": load_ms,
            "timing_s": timing_s,
            "session_reused": reused,
            "peak_rss_mb": cell_peak,
            "companion_rss_mb": resident,
            "peak_rss_is_cell_peak": peak_reset,
            "peak_rss_while_timing_mb": agent_runtime.current_peak_rss_mb(),
            "rss_before_mb": rss0,
            "raw_ms": [round(t * 1000.0, 4) for t in times],
            "settings": settings,
            "policy": policy.to_dict(),
            "telemetry_before": before,
            "telemetry_after": after,
            "versions": {"onnxruntime": self.ort.__version__, "numpy": np.__version__,
                         "python": platform.python_version(), "agent": AGENT_VERSION},
        })
        return stats

    @staticmethod
    def _level(policy, reason, stats, other, ratios, per_session):
        """The cell's median, its interval and the unstable flag, from the statistic that
        carries the cell's number: per-session medians when timed over several sessions
        (between-session spread dominates), the ratio's runs when paired."""
        out = {}
        if per_session is not None and len(per_session) > 1:
            key = "paired_ratio" if ratios else "median_ms"
            level, rel = agent_timing.sessions_ci([e[key] for e in per_session])
            out["sessions"] = per_session
            if not ratios:
                out["median_ms"] = level
            out["median_rel_ci"] = rel
            out["pooled_median_ms"] = stats["median_ms"]
            # the level of a few sessions is uncertain by nature: flag it only when wider than the dispersion bound
            out["unstable"] = bool(stats["unstable"] or rel > policy.unstable_cov)
            return out
        if ratios:
            out["median_rel_ci"] = agent_timing.rel_median_ci(sorted(ratios))
        rel = out.get("median_rel_ci", stats["median_rel_ci"])
        # Unstable: widely spread runs, or a number whose interval never narrowed to the target.
        out["unstable"] = bool(stats["unstable"] or (reason != "converged" and rel > policy.target_rel_ci))
        return out

    def _time_sessions(self, args, held, feeds, companion, policy, batch):
        """Time the cell in ``policy.sessions`` sessions (the cached one, then fresh loads of
        the same graph), pooling their runs. Only one session of the cell is in memory at a
        time: each fresh one replaces the previous (and becomes the cached one), and the LRU's
        other model is let go first, so a small board does not run out of memory falsely."""
        each = policy.per_session()
        key = self._session_key(args)
        if policy.sessions > 1:
            self.sessions = [e for e in self.sessions if e[0] == key]
        times, other, ratios, reasons, per_session = [], [], [], [], []
        for i in range(policy.sessions):
            if i > 0:
                self.sessions = [e for e in self.sessions if e[0] != key]
                held.clear()  # the previous session's last reference: freed before the next loads
                s, load_ms = self._open_session(args, key)
                self.sessions.append((key, s, load_ms))
                held.append(s)
                del s
                held[0].prepare(feeds)
                held[0].check_outputs(self.np, held[0].run_once(), batch)
            if companion is None:
                t, reason = agent_timing.run_protocol(held[0].run_once, each)
                o, r = [], []
            else:
                t, o, r, reason = agent_timing.run_paired(held[0].run_once, companion.run_once, each)
            times += t
            other += o
            ratios += r
            reasons.append(reason)
            entry = {"median_ms": agent_timing.percentile(sorted(t), 50) * 1000.0, "runs": len(t)}
            if r:
                entry["paired_ratio"] = agent_timing.percentile(sorted(r), 50)
            per_session.append(entry)
        held.clear()
        reason = next((x for x in reasons if x != "converged"), reasons[0])
        return times, other, ratios, reason, (per_session if policy.sessions > 1 else None)

    def telemetry(self, args):
        return agent_telemetry.snapshot()


def serve(agent, inp, out):
    verbs = {"hello": agent.hello, "models": agent.models, "verify": agent.verify, "materialize": agent.materialize,
             "measure": agent.measure, "evict": agent.evict, "telemetry": agent.telemetry}
    for line in inp:
        line = line.strip()
        if not line:
            continue
        rid = None
        try:
            req = json.loads(line)
            rid = req.get("id")
            verb = req.get("verb")
            if verb == "shutdown":
                out.write(json.dumps({"id": rid, "ok": True, "result": {}}) + "\n")
                out.flush()
                return
            if verb not in verbs:
                raise AgentError("protocol_error", "unknown verb %r" % (verb,))
            resp = {"id": rid, "ok": True, "result": verbs[verb](req.get("args") or {})}
        except AgentError as e:
            resp = {"id": rid, "ok": False, "error": {"class": e.error_class, "message": e.message}}
        except MemoryError as e:
            resp = {"id": rid, "ok": False, "error": {"class": "out_of_memory", "message": "MemoryError: %s" % e}}
        except Exception as e:
            if getattr(e, "errno", None) == errno.ENOSPC:
                free = disk_free_mb(agent.root)
                error = {"class": "disk_full", "message": "the board's disk is full (%s MB free under %s): %s"
                         % ("?" if free is None else "%.0f" % free, agent.root, e)}
            elif getattr(e, "errno", None) == errno.ENOENT and os.path.join(agent.root, "models") in str(e):
                # a model's files went from the board's cache mid-request: the profiler sends it again
                error = {"class": "load_error", "message": "model files vanished from the board: %s" % e}
            else:
                error = {"class": "unknown", "message": "%s: %s" % (type(e).__name__, e),
                         "traceback": traceback.format_exc()[-2000:]}
            resp = {"id": rid, "ok": False, "error": error}
        out.write(json.dumps(resp) + "\n")
        out.flush()


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--root", default=None, help="folder the agent may write under (default: the folder above this file)")
    ap.add_argument("--token", default=None, help="the host's token for this sweep: a new agent ends the old one of the same token")
    ap.add_argument("--llama-cpp", default=None, help="llama.cpp's llama-bench, or the folder holding it (default: PATH)")
    args = ap.parse_args()
    root = args.root or os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    ended, others = agent_pidfile.take_over(root, args.token) if args.token else (None, [])
    # The protocol owns stdout: route anything else that writes to fd 1 (native runtime
    # logs) to stderr.
    proto = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    agent = Agent(root, args.llama_cpp)
    agent.ended_orphan, agent.other_agents = ended, others
    serve(agent, sys.stdin, proto)


if __name__ == "__main__":
    main()
