"""TensorRT back-ends of the edgenas agent (Python 3.8+; needs a GPU board to run).

Two ways, for the two kinds of board one meets:
- ``trtexec``: JetPack always ships it, even where the TensorRT Python bindings are not
  installed. The agent builds its command line (optimization profile over the sweep's
  shapes, FP16, ``--useSpinWait``, ``--noDataTransfers``, ``--useCudaGraph`` where valid,
  ``--exportTimes``) and turns its per-iteration JSON and its printed summary into the same
  statistics as the other back-ends.
- the TensorRT Python API: engine built from the ONNX file with one optimization profile,
  cached by (model hash, TensorRT version, precision, profile); timed with CUDA events.

Engines are cached under the agent's folder; build time and engine size are reported apart
from run time. A silent FP32 fallback of an FP16 build is detected from the engine's layer
precisions (or, failing that, an engine size close to the FP32 one)."""

import hashlib
import json
import os
import re
import shutil
import subprocess
import time

# --- optimization profiles ------------------------------------------------------------------


def profile_shapes(inputs, batch, seq_lens, past_lens):
    """min/opt/max shapes per input for the sweep's grid. ``inputs`` is [(name, shape)]
    with symbolic dims 'batch', 'sequence', 'past_sequence'. opt is the largest length
    (the one a deployment tunes for), min the smallest."""
    seq_lens = sorted(seq_lens) or [1]
    past_lens = sorted(past_lens) or [0]
    out = {}
    for name, shape in inputs:
        spec = {"min": [], "opt": [], "max": []}
        for d in shape:
            if isinstance(d, int):
                lo = opt = hi = d
            elif d == "batch":
                lo = opt = hi = int(batch)
            elif d == "sequence":
                lo, opt, hi = seq_lens[0], seq_lens[-1], seq_lens[-1]
            elif d == "past_sequence":
                lo, opt, hi = past_lens[0], past_lens[-1], past_lens[-1]
            else:
                raise ValueError("input %s has an unknown dynamic axis %r" % (name, d))
            spec["min"].append(lo)
            spec["opt"].append(opt)
            spec["max"].append(hi)
        out[name] = spec
    return out


def _shape_arg(profile, which):
    return ",".join("%s:%s" % (name, "x".join(str(v) for v in spec[which])) for name, spec in sorted(profile.items()))


def run_shapes(inputs, batch, seq_len, past_len):
    """The concrete shape of every input for one cell."""
    p = profile_shapes(inputs, batch, [seq_len], [past_len])
    return dict((name, spec["opt"]) for name, spec in p.items())


def engine_key(model_sha256, trt_version, precision, profile):
    ident = json.dumps({"model": model_sha256, "trt": trt_version, "precision": precision, "profile": profile},
                       sort_keys=True)
    return hashlib.sha256(ident.encode()).hexdigest()[:20]


# --- trtexec ---------------------------------------------------------------------------------


def trtexec_build_command(trtexec, onnx_path, engine_path, profile, fp16, layer_info_path=None, timing_cache=None):
    cmd = [trtexec, "--onnx=%s" % onnx_path, "--saveEngine=%s" % engine_path, "--skipInference",
           "--minShapes=%s" % _shape_arg(profile, "min"), "--optShapes=%s" % _shape_arg(profile, "opt"),
           "--maxShapes=%s" % _shape_arg(profile, "max")]
    if fp16:
        cmd.append("--fp16")
    if layer_info_path:
        cmd += ["--profilingVerbosity=detailed", "--exportLayerInfo=%s" % layer_info_path]
    if timing_cache:
        cmd.append("--timingCacheFile=%s" % timing_cache)
    return cmd


def trtexec_run_command(trtexec, engine_path, shapes, times_path, warmup_ms=500, duration_s=3, min_iterations=10,
                        cuda_graph=True, spin_wait=True):
    """Time an engine: device-side compute only (``--noDataTransfers``), spin-waiting for
    steadier numbers; CUDA graphs unless the caller knows the engine can't be captured."""
    shape_arg = ",".join("%s:%s" % (n, "x".join(str(v) for v in s)) for n, s in sorted(shapes.items()))
    cmd = [trtexec, "--loadEngine=%s" % engine_path, "--shapes=%s" % shape_arg, "--noDataTransfers",
           "--warmUp=%d" % int(warmup_ms), "--duration=%d" % max(1, round(duration_s)),
           "--iterations=%d" % int(min_iterations), "--avgRuns=1", "--exportTimes=%s" % times_path]
    if spin_wait:
        cmd.append("--useSpinWait")
    if cuda_graph:
        cmd.append("--useCudaGraph")
    return cmd


def parse_trtexec_times(text):
    """Per-iteration GPU compute times (ms) from ``--exportTimes`` JSON; latency when the
    trace has no compute field."""
    data = json.loads(text)
    if isinstance(data, dict):
        data = data.get("times") or data.get("iterations") or []
    out = []
    for entry in data:
        for key in ("computeMs", "latencyMs"):
            if key in entry:
                out.append(float(entry[key]))
                break
    return out


_STAT = re.compile(r"(min|max|mean|median|percentile\((\d+(?:\.\d+)?)%\))\s*=\s*([-\d.eE+]+)\s*ms")


def parse_trtexec_summary(text):
    """The 'Performance summary' of trtexec's log -> {"gpu_compute": {...}, "latency": {...},
    "throughput_qps": ..., "version": ..., "passed": bool, "warnings": [...]}."""
    out = {"warnings": []}
    for line in (text or "").splitlines():
        body = re.sub(r"^(\[[^\]]*\]\s*)+", "", line).strip()
        m = re.match(r"Throughput:\s*([\d.eE+]+)\s*qps", body)
        if m:
            out["throughput_qps"] = float(m.group(1))
            continue
        m = re.match(r"(Latency|GPU Compute Time|Enqueue Time|H2D Latency|D2H Latency):\s*(.*)$", body)
        if m:
            stats = {}
            for name, pct, val in _STAT.findall(m.group(2)):
                stats["p%g" % float(pct) if pct else name] = float(val)
            out[m.group(1).lower().replace(" ", "_")] = stats
            continue
        m = re.match(r"Total GPU Compute Time:\s*([\d.eE+]+)\s*s", body)
        if m:
            out["total_gpu_compute_s"] = float(m.group(1))
            continue
        if "coefficient of variance" in body or "unstable" in body:
            out["warnings"].append(body)
        m = re.search(r"&&&& (PASSED|FAILED) TensorRT\.trtexec \[TensorRT v(\d+)\]", line)
        if m:
            out["passed"] = m.group(1) == "PASSED"
            out["trt_version_code"] = int(m.group(2))
    return out


def layer_precisions(layer_info_text):
    """Count of layers per output precision in ``--exportLayerInfo`` JSON (detailed)."""
    data = json.loads(layer_info_text)
    counts = {}
    for layer in data.get("Layers", []):
        if not isinstance(layer, dict):
            continue
        outs = layer.get("Outputs") or []
        fmt = " ".join(str(o.get("Format/Datatype", "")) for o in outs if isinstance(o, dict))
        prec = "FP16" if ("Half" in fmt or "FP16" in fmt) else "FP32" if ("Float" in fmt or "FP32" in fmt) else "other"
        counts[prec] = counts.get(prec, 0) + 1
    return counts


def fp32_fallback(precision, counts, engine_bytes=None, weights_bytes=None):
    """True when an FP16 build came out (mostly) FP32: few FP16 layers, or an engine about
    as large as the FP32 weights."""
    if precision != "fp16":
        return False
    floats = counts.get("FP16", 0) + counts.get("FP32", 0)
    if floats:
        return counts.get("FP16", 0) < 0.5 * floats
    if engine_bytes and weights_bytes:
        return engine_bytes > 0.8 * weights_bytes
    return False


class EngineCache(object):
    """Engines and their build records under the agent's folder, by ``engine_key``."""

    def __init__(self, cache_dir):
        self.cache_dir = cache_dir
        if not os.path.isdir(cache_dir):
            os.makedirs(cache_dir)

    def paths(self, key):
        base = os.path.join(self.cache_dir, key)
        return base + ".engine", base + ".json"

    def lookup(self, key):
        engine, meta_path = self.paths(key)
        if os.path.isfile(engine) and os.path.isfile(meta_path):
            with open(meta_path) as f:
                meta = json.load(f)
            meta["cached"] = True
            return engine, meta
        return None

    def record(self, key, precision, profile, trt_version, build_s, counts, weights_bytes):
        engine, meta_path = self.paths(key)
        size = os.path.getsize(engine)
        meta = {"build_s": build_s, "engine_bytes": size, "precision": precision, "layer_precisions": counts,
                "fp32_fallback": fp32_fallback(precision, counts, size, weights_bytes), "profile": profile,
                "trt": trt_version, "cached": False}
        with open(meta_path, "w") as f:
            json.dump(meta, f)
        return engine, meta


class TrtexecBackend(object):
    """Builds (once, cached) and times engines with the board's trtexec."""

    def __init__(self, cache_dir, trtexec=None):
        self.trtexec = trtexec or shutil.which("trtexec") or _jetpack_trtexec()
        if not self.trtexec:
            raise RuntimeError("trtexec not found (JetPack puts it in /usr/src/tensorrt/bin); install TensorRT")
        self.cache = EngineCache(cache_dir)

    def build(self, onnx_path, model_sha256, profile, precision, weights_bytes=None, timeout=3600):
        key = engine_key(model_sha256, self.version(), precision, profile)
        hit = self.cache.lookup(key)
        if hit:
            return hit
        engine, _ = self.cache.paths(key)
        info_path = os.path.join(self.cache.cache_dir, key + ".layers.json")
        t0 = time.time()
        cmd = trtexec_build_command(self.trtexec, onnx_path, engine + ".tmp", profile, precision == "fp16", info_path)
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, universal_newlines=True, timeout=timeout)
        if proc.returncode != 0 or not os.path.isfile(engine + ".tmp"):
            raise RuntimeError("trtexec build failed: %s" % proc.stdout[-1500:])
        os.rename(engine + ".tmp", engine)
        counts = {}
        if os.path.isfile(info_path):
            with open(info_path) as f:
                counts = layer_precisions(f.read())
        return self.cache.record(key, precision, profile, self.version(), time.time() - t0, counts, weights_bytes)

    def time(self, engine, shapes, duration_s, warmup_ms=500, timeout=600):
        times_path = engine + ".times.json"
        for graph in (True, False):  # some engines (data-dependent shapes) cannot be captured
            cmd = trtexec_run_command(self.trtexec, engine, shapes, times_path, warmup_ms, duration_s, cuda_graph=graph)
            proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, universal_newlines=True,
                                  timeout=timeout)
            if proc.returncode == 0:
                with open(times_path) as f:
                    times_ms = parse_trtexec_times(f.read())
                return times_ms, parse_trtexec_summary(proc.stdout), graph
        raise RuntimeError("trtexec run failed: %s" % proc.stdout[-1500:])

    def version(self):
        if not hasattr(self, "_version"):
            try:
                out = subprocess.run([self.trtexec, "--help"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     universal_newlines=True, timeout=60).stdout
            except (OSError, subprocess.SubprocessError):
                out = ""
            m = re.search(r"TensorRT v(\d+)", out)
            self._version = m.group(1) if m else "unknown"
        return self._version


def _jetpack_trtexec():
    p = "/usr/src/tensorrt/bin/trtexec"
    return p if os.path.isfile(p) else None


# --- TensorRT Python API ---------------------------------------------------------------------


class TensorRTBackend(object):
    """Engines through the TensorRT Python API, timed with CUDA events (via torch's CUDA
    runtime when present: the boards that have the bindings usually have torch too)."""

    def __init__(self, cache_dir):
        import tensorrt as trt  # fails fast on boards without the bindings

        self.trt = trt
        self.logger = trt.Logger(trt.Logger.WARNING)
        self.cache = EngineCache(cache_dir)

    def build(self, onnx_path, model_sha256, profile, precision, weights_bytes=None):
        trt = self.trt
        key = engine_key(model_sha256, trt.__version__, precision, profile)
        hit = self.cache.lookup(key)
        if hit:
            return hit
        engine_path, _ = self.cache.paths(key)
        t0 = time.time()
        builder = trt.Builder(self.logger)
        flags = 0
        if hasattr(trt.NetworkDefinitionCreationFlag, "EXPLICIT_BATCH"):
            flags = 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
        network = builder.create_network(flags)
        parser = trt.OnnxParser(network, self.logger)
        if not parser.parse_from_file(onnx_path):
            errs = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
            raise RuntimeError("TensorRT could not parse %s: %s" % (onnx_path, errs))
        config = builder.create_builder_config()
        if precision == "fp16":
            config.set_flag(trt.BuilderFlag.FP16)
        config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED
        opt = builder.create_optimization_profile()
        for name, spec in profile.items():
            opt.set_shape(name, spec["min"], spec["opt"], spec["max"])
        config.add_optimization_profile(opt)
        blob = builder.build_serialized_network(network, config)
        if blob is None:
            raise RuntimeError("TensorRT engine build failed for %s" % onnx_path)
        with open(engine_path + ".tmp", "wb") as f:
            f.write(bytes(blob))
        os.rename(engine_path + ".tmp", engine_path)
        runtime = trt.Runtime(self.logger)
        engine = runtime.deserialize_cuda_engine(bytes(blob))
        counts = {}
        try:
            info = engine.create_engine_inspector().get_engine_information(trt.LayerInformationFormat.JSON)
            counts = layer_precisions(info)
        except Exception:
            pass  # older TensorRT without the inspector: fall back on the engine size
        return self.cache.record(key, precision, profile, trt.__version__, time.time() - t0, counts, weights_bytes)

    def timer(self, engine_path, shapes):
        """A zero-argument function running one inference, and a CUDA-event clock for the
        timing protocol (so the protocol measures device time, not host time)."""
        import torch

        trt = self.trt
        runtime = trt.Runtime(self.logger)
        with open(engine_path, "rb") as f:
            engine = runtime.deserialize_cuda_engine(f.read())
        ctx = engine.create_execution_context()
        buffers = {}
        for i in range(engine.num_io_tensors):
            name = engine.get_tensor_name(i)
            if engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT:
                ctx.set_input_shape(name, shapes[name])
        for i in range(engine.num_io_tensors):
            name = engine.get_tensor_name(i)
            shape = tuple(ctx.get_tensor_shape(name))
            dtype = torch.int64 if engine.get_tensor_dtype(name) == trt.DataType.INT64 else (
                torch.float16 if engine.get_tensor_dtype(name) == trt.DataType.HALF else torch.float32)
            t = torch.zeros(shape, dtype=dtype, device="cuda") if dtype == torch.int64 else torch.randn(shape, device="cuda").to(dtype)
            buffers[name] = t
            ctx.set_tensor_address(name, t.data_ptr())
        stream = torch.cuda.Stream()

        def run():
            ctx.execute_async_v3(stream.cuda_stream)

        def device_timed_run():
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record(stream)
            run()
            end.record(stream)
            end.synchronize()
            return start.elapsed_time(end) / 1000.0

        return run, device_timed_run, buffers
