"""llama.cpp cells for the edgenas agent: GGUF files timed by the board's own ``llama-bench``,
or through llama.cpp's Python binding (llama-cpp-python) where that is what the board has.

llama-bench times what llama.cpp users run (its kernels, its KV cache, its threads) and
reports every repetition (``samples_ns``). The agent keeps its timing protocol around it:
llama-bench's own warm-up run, then rounds of repetitions, each round a fresh process (a
fresh load, as the ONNX path's sessions), pooled until the median's 95% interval is within
the target and the minimum time and run count are met, or the time cap is hit. A prefill
cell is ``-p S -d P`` (S prompt tokens after P tokens of context); a decode cell is
``-n 1 -d P``: one generated token after P tokens of context, the context's state restored
(untimed) before each repetition.

The binding runs in the agent's process, so its cells get the agent's own protocol
(``agent_timing.run_protocol``: warm-up, timed runs until the median's interval narrows): a
prefill cell evaluates S tokens after P of context, a decode cell one token after P, the
context's cache truncated back to P before each run (the binding's ``Llama.eval`` drops
cache entries past ``n_tokens``), so every run is the same step.

Python 3.8+, stdlib and numpy only (and llama_cpp for the binding); imports no host code."""

import json
import os
import re
import shutil
import subprocess
import time

from agent_runtime import AgentError

GGML_BLOCKS = {"f32": (1, 4), "f16": (1, 2), "q8_0": (32, 34), "q5_1": (32, 24), "q5_0": (32, 22),
               "q4_1": (32, 20), "q4_0": (32, 18)}
MIN_DECI_BUILD = 4350  # llama.cpp build that loads the per-layer 'deci' architecture


def find_llama_bench(hint=None):
    """llama-bench from ``--llama-cpp`` (the tool or its folder), $EDGENAS_LLAMA_CPP, PATH."""
    for cand in (hint, os.environ.get("EDGENAS_LLAMA_CPP")):
        if not cand:
            continue
        cand = os.path.expanduser(cand)
        for p in (cand, os.path.join(cand, "llama-bench"), os.path.join(cand, "bin", "llama-bench")):
            if os.path.isfile(p) and os.access(p, os.X_OK):
                return p
    return shutil.which("llama-bench")


def _ask(bench, flag, parse, timeout=60):
    """``parse`` of what ``llama-bench FLAG`` prints (None if it does not run)."""
    try:
        p = subprocess.run([bench, flag], capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return parse(p.stdout + "\n" + p.stderr)


def list_devices(bench):
    """The compute devices the build offers, e.g. ["CPU"] or ["CUDA0", "CPU"]."""
    return _ask(bench, "--list-devices", parse_devices)


def parse_devices(text):
    devices = []
    for line in text.splitlines():
        m = re.match(r"\s*([A-Za-z][A-Za-z0-9_]*\d*)\s*:\s*\S", line)
        if m and m.group(1) not in ("Available", "available", "error", "warning", "load_backend"):
            devices.append(m.group(1))
    return devices + (["CPU"] if "CPU" not in devices else [])


def parse_version(text):
    """A llama.cpp tool's ``--version``: {"version", "build", "commit", "compiler", "target"}
    (what it prints: "version: 0.5.0-dev (build 1, commit 0c1e57098)" or, before 2025,
    "version: 4350 (5f0db95)"; then "built with GNU 12.2.0 for Linux x86_64")."""
    out = {}
    m = re.search(r"version:\s*(\S+)\s*\(build\s*(\d+),\s*commit\s*(\w+)\)", text)
    if m:
        out.update(version=m.group(1), build=int(m.group(2)), commit=m.group(3))
    else:
        m = re.search(r"version:\s*(\d+)\s*\((\w+)\)", text)
        if m:
            out.update(version=m.group(1), build=int(m.group(1)), commit=m.group(2))
    m = re.search(r"built with (.+?) for ([^\r\n]+)", text)
    if m:
        out.update(compiler=m.group(1).strip(), target=m.group(2).strip())
    return out or None


def backends_of(devices):
    """The ggml back-ends a build offers, from its devices: CPU always, then CUDA, Metal,
    Vulkan, ... (device names are the back-end's name and an index)."""
    out = ["CPU"]
    for d in devices or []:
        name = re.sub(r"\d+$", "", d)
        if name and name not in out:
            out.append(name)
    return out


def bench_version(bench):
    """The build llama-bench reports (``parse_version``)."""
    return _ask(bench, "--version", parse_version)


def binding_paths(hint=None):
    """Where a llama_cpp package may lie besides the Python path: ``python/`` next to the
    tools' folder, as scripts/build_llama_cpp.sh installs it."""
    out = []
    for cand in (hint, os.environ.get("EDGENAS_LLAMA_CPP")):
        if cand:
            cand = os.path.expanduser(cand)
            folder = os.path.dirname(cand) if os.path.isfile(cand) else cand
            out += [os.path.join(folder, "python"), os.path.join(os.path.dirname(folder), "python")]
    return [p for p in out if os.path.isdir(os.path.join(p, "llama_cpp"))]


def import_binding(hint=None):
    """The llama_cpp module (llama-cpp-python), or raise AgentError saying why not."""
    import sys

    try:
        import llama_cpp

        return llama_cpp
    except ImportError as e:
        first = e
    except Exception as e:  # the package is there but its native library is not
        raise AgentError("compile_error", "llama-cpp-python is installed but does not load: %s" % str(e)[:300])
    for p in binding_paths(hint):
        if p not in sys.path:
            sys.path.insert(0, p)
        try:
            import llama_cpp

            return llama_cpp
        except Exception as e:
            raise AgentError("compile_error", "llama-cpp-python under %s does not load: %s" % (p, str(e)[:300]))
    raise AgentError("compile_error", "this board has no llama.cpp Python binding (%s): `pip install "
                     "llama-cpp-python` on it, or profile with --backend llama.cpp (llama-bench)" % first)


def binding_info(hint=None):
    """The handshake's entry for the binding: version, native library's system info (its
    CPU features and back-ends), GPU offload; None without one, {"error": ...} if broken."""
    try:
        llama_cpp = import_binding(hint)
    except AgentError as e:
        return None if "has no llama.cpp Python binding" in e.message else {"error": e.message}
    out = {"version": getattr(llama_cpp, "__version__", None), "path": os.path.dirname(llama_cpp.__file__)}
    try:
        out["system_info"] = llama_cpp.llama_print_system_info().decode("utf-8", "replace").strip()
        out["gpu_offload"] = bool(llama_cpp.llama_supports_gpu_offload())
    except Exception as e:
        out["error"] = str(e)[:300]
    return out


def info(hint=None):
    """The handshake's llama.cpp entry: llama-bench with the build it reports (version,
    commit, compiler) and its devices and back-ends, and the Python binding; None when the
    board has neither."""
    bench = find_llama_bench(hint)
    binding = binding_info(hint)
    if bench is None and binding is None:
        return None
    out = {"llama_bench": bench, "devices": None, "backends": None, "build": None, "binding": binding}
    if bench is not None:
        devices = list_devices(bench)
        out.update(devices=devices, backends=backends_of(devices), build=bench_version(bench))
    return out


def bench_command(bench, model, phase, seq_len, past_len, threads, reps, gpu_layers=0):
    cmd = [bench, "-m", model, "-o", "json", "-r", str(int(reps)), "-t", str(int(threads)),
           "-ngl", str(int(gpu_layers)), "-d", str(int(past_len))]
    if phase == "prefill":
        cmd += ["-p", str(int(seq_len)), "-n", "0"]
    else:
        cmd += ["-p", "0", "-n", str(max(1, int(seq_len)))]
    return cmd


def parse_bench_json(text):
    """The one test's record of ``llama-bench -o json`` output; per-token seconds of each
    repetition (a decode sample covers n_gen tokens)."""
    start = text.find("[")
    if start < 0:
        raise AgentError("runtime_error", "llama-bench printed no JSON: %s" % text[-500:])
    try:
        records = json.loads(text[start:])
    except ValueError as e:
        raise AgentError("runtime_error", "llama-bench's JSON is unreadable (%s): %s" % (e, text[-300:]))
    if not records:
        raise AgentError("runtime_error", "llama-bench ran no test")
    rec = records[0]
    per = float(rec.get("n_gen") or 1) if int(rec.get("n_prompt") or 0) == 0 else 1.0
    return rec, [ns / 1e9 / per for ns in rec.get("samples_ns") or []]


_CLASSIFY = (
    (r"unknown model architecture: '([^']+)'",
     "compile_error", "this board's llama.cpp does not know the '{0}' architecture (per-layer sizes need build "
     "b" + str(MIN_DECI_BUILD) + " or later): update llama.cpp on the board"),
    (r"invalid ggml type|unknown ggml type|tensor '[^']+' has invalid ggml type|type \d+ .*not supported",
     "compile_error", "this board's llama.cpp cannot load the GGUF's weight type: update llama.cpp, or profile "
     "with another --precision (f16, q8_0)"),
    (r"failed to allocate|out of memory|cudaMalloc failed|std::bad_alloc",
     "out_of_memory", "llama.cpp ran out of memory on the board"),
    (r"error loading model|failed to load model",
     "load_error", "llama.cpp could not load the GGUF file"),
)


def classify_failure(text):
    """(error class, message) for a failed llama-bench run, from its output."""
    for pattern, cls, message in _CLASSIFY:
        m = re.search(pattern, text)
        if m:
            detail = [line for line in text.strip().splitlines() if line.strip()][-3:]
            return cls, message.format(*m.groups()) + " [llama-bench: %s]" % " | ".join(detail)[-600:]
    return "runtime_error", "llama-bench failed: %s" % text.strip()[-800:]


def run_bench(cmd, timeout):
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise AgentError("timeout", "llama-bench did not finish in %.0f s" % timeout)
    except OSError as e:
        raise AgentError("compile_error", "llama-bench could not start: %s" % e)
    if p.returncode != 0:
        text = p.stderr + "\n" + p.stdout
        if "failed to load model" in text:
            text = _load_log(cmd, timeout) or text
        cls, message = classify_failure(text)
        raise AgentError(cls, message)
    return parse_bench_json(p.stdout)


def _load_log(cmd, timeout):
    """llama-bench logs why a load failed only when verbose: run it again so (it fails at
    once, in the load)."""
    try:
        p = subprocess.run(cmd + ["-v"], capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired):
        return None
    lines = [ln for ln in p.stderr.splitlines() if not ln.startswith(("llama_model_loader: - ", "print_info"))]
    return "\n".join(lines[-40:])


def time_cell(bench, model, phase, seq_len, past_len, threads, policy, gpu_layers=0, timeout=600.0):
    """Rounds of llama-bench until the protocol is satisfied: (per-token seconds of every
    repetition, stop reason, the last record, rounds run)."""
    import agent_timing

    times, rounds, rec, t0 = [], 0, None, time.time()
    reps = policy.min_runs
    while True:
        rec, samples = run_bench(bench_command(bench, model, phase, seq_len, past_len, threads, reps, gpu_layers),
                                 timeout)
        times += samples
        rounds += 1
        timed = sum(times)
        enough = len(times) >= policy.min_runs and timed >= policy.min_time_s
        if enough and agent_timing.rel_median_ci(sorted(times)) <= policy.target_rel_ci:
            return times, "converged", rec, rounds
        if timed >= policy.max_time_s or time.time() - t0 >= policy.max_time_s * 3:
            return times, "max_time", rec, rounds
        if len(times) >= policy.max_runs:
            return times, "max_runs", rec, rounds
        # the next round: about a second of repetitions (each round pays a process start and a load)
        reps = int(min(max(3, len(times) / max(timed, 1e-6)), 1000))


def _load(llama_cpp, model, n_ctx, threads, gpu_layers):
    """A Llama over ``model``; a failed load is classified from llama.cpp's log (captured by
    loading once more, verbosely, as for llama-bench)."""
    import contextlib
    import io

    kw = dict(model_path=model, n_ctx=n_ctx, n_batch=2048, n_ubatch=512, n_threads=int(threads),
              n_threads_batch=int(threads), n_gpu_layers=int(gpu_layers))
    try:
        return llama_cpp.Llama(verbose=False, **kw)
    except Exception as e:
        first = str(e)
    log = io.StringIO()
    try:
        with contextlib.redirect_stderr(log):
            llama_cpp.Llama(verbose=True, **kw)
    except Exception:
        pass
    lines = [ln for ln in log.getvalue().splitlines() if not ln.startswith(("llama_model_loader: - ", "print_info"))]
    cls, message = classify_failure("\n".join(lines[-40:]) + "\n" + first)
    raise AgentError(cls, message.replace("llama-bench", "llama-cpp-python"))


def time_binding_cell(model, phase, seq_len, past_len, threads, policy, gpu_layers=0, hint=None):
    """One cell through the binding under the agent's protocol: (run times in seconds, stop
    reason, load seconds, settings)."""
    import random

    import agent_timing

    llama_cpp = import_binding(hint)
    n_new = int(seq_len) if phase == "prefill" else 1
    t0 = time.perf_counter()
    llm = _load(llama_cpp, model, int(past_len) + n_new + 64, threads, gpu_layers)
    load_s = time.perf_counter() - t0
    try:
        rng = random.Random(0)
        vocab = llm.n_vocab()
        step = [rng.randrange(vocab) for _ in range(n_new)]
        if past_len:
            llm.eval([rng.randrange(vocab) for _ in range(int(past_len))])  # the context, untimed

        def run():
            llm.n_tokens = int(past_len)  # eval drops the cache past this: the same step each run
            llm.eval(step)

        times, reason = agent_timing.run_protocol(run, policy)
        settings = {"n_ctx": llm.n_ctx(), "n_batch": llm.n_batch, "threads": int(threads), "gpu_layers": int(gpu_layers),
                    "binding": getattr(llama_cpp, "__version__", None)}
    finally:
        close = getattr(llm, "close", None)
        if close is not None:
            close()
    return times, reason, load_s, settings


def materialize_gguf(np, rng, folder, manifest, tmp):
    """The GGUF file of a header-only export: its header, then every tensor filled with
    seeded values valid for its type (quantized blocks get real scales, not random bits that
    could be NaN)."""
    with open(os.path.join(folder, manifest["options"]["header_file"]), "rb") as f:
        header = f.read()
    with open(tmp, "wb") as f:
        f.write(header)
        pos = len(header)
        for t in manifest["tensors"]:
            if t["offset"] > pos:
                f.write(b"\0" * (t["offset"] - pos))
            f.write(_stand_in(np, rng, t).tobytes())
            pos = t["offset"] + t["length"]
        if pos < manifest["weights_bytes"]:
            f.write(b"\0" * (manifest["weights_bytes"] - pos))


def _stand_in(np, rng, t):
    kind = t["dtype"]
    if kind not in GGML_BLOCKS:
        raise AgentError("load_error", "GGUF tensor %s has type %s, which the agent cannot fill" % (t["name"], kind))
    size = GGML_BLOCKS[kind][1]
    nblocks = t["length"] // size
    if kind in ("f32", "f16"):
        base = 1.0 if t["kind"] == "norm" else 0.0
        return (base + 0.02 * rng.standard_normal(nblocks)).astype(np.float32 if kind == "f32" else np.float16)
    def half(values):  # an fp16 field per block: a scale (d) or a minimum (m)
        return values.astype(np.float16).view(np.uint8).reshape(nblocks, 2)

    fields = [half(np.abs(0.01 + 0.002 * rng.standard_normal(nblocks)))]
    if kind in ("q4_1", "q5_1"):
        fields.append(half(-0.02 + 0.002 * rng.standard_normal(nblocks)))
    if kind == "q8_0":
        fields.append(rng.integers(-127, 128, (nblocks, 32), dtype=np.int8).view(np.uint8))
    else:  # the 5th bits (q5_*: 4 bytes), then two 4-bit values a byte
        rest = size - 2 * len(fields)
        fields.append(rng.integers(0, 256, (nblocks, rest), dtype=np.uint8))
    return np.concatenate(fields, axis=1)
