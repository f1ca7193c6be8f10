"""Runtimes of the edgenas agent: onnxruntime with the CPU, CUDA or TensorRT execution
provider (numpy and onnxruntime only; Python 3.8+)."""

import os
import re

BACKENDS = {
    "ort-cpu": "CPUExecutionProvider",
    "ort-cuda": "CUDAExecutionProvider",
    "ort-trt": "TensorrtExecutionProvider",
}


class AgentError(Exception):
    """A failure with an error class the host understands (TVM-style)."""

    def __init__(self, error_class, message):
        Exception.__init__(self, message)
        self.error_class = error_class
        self.message = message


def classify_exception(exc, default):
    text = str(exc)
    if isinstance(exc, MemoryError) or re.search(r"bad_alloc|out of memory|Failed to allocate|std::bad_alloc|OOM|cudaErrorMemoryAllocation", text, re.I):
        return "out_of_memory"
    return default


def current_peak_rss_mb():
    """Peak resident memory since the last ``reset_peak_rss`` (VmHWM), in MB."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    except (OSError, IOError):
        pass
    try:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    except Exception:
        return None


def reset_peak_rss():
    """Reset VmHWM so the next reading is this cell's peak (Linux >= 4.0); False if not."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except (OSError, IOError):
        return False


def rss_mb():
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 1048576.0
    except (OSError, IOError, ValueError):
        return None


def graph_inputs(ort, path):
    """[(name, shape)] of a graph's inputs, read through onnxruntime (no onnx package)."""
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
    return [(i.name, list(i.shape)) for i in sess.get_inputs()]


GRAPH_OPT = {"all": "ORT_ENABLE_ALL", "extended": "ORT_ENABLE_EXTENDED", "basic": "ORT_ENABLE_BASIC",
             "disabled": "ORT_DISABLE_ALL"}


class OrtSession(object):
    """One onnxruntime session with threads, spinning, affinity and graph optimization set
    explicitly."""

    def __init__(self, ort, path, backend="ort-cpu", threads=1, spinning=False, affinity=None, device_id=0,
                 graph_opt="all"):
        if backend not in BACKENDS:
            raise AgentError("compile_error", "unknown back-end %r; this agent runs %s" % (backend, ", ".join(sorted(BACKENDS))))
        provider = BACKENDS[backend]
        if provider not in ort.get_available_providers():
            raise AgentError(
                "compile_error",
                "back-end %s needs %s, which this onnxruntime lacks (it has %s); install onnxruntime-gpu "
                "built for this board" % (backend, provider, ", ".join(ort.get_available_providers())),
            )
        so = ort.SessionOptions()
        so.intra_op_num_threads = int(threads)
        so.inter_op_num_threads = 1
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        if graph_opt not in GRAPH_OPT:
            raise AgentError("compile_error", "unknown graph optimization %r; use one of %s" % (graph_opt, ", ".join(GRAPH_OPT)))
        so.graph_optimization_level = getattr(ort.GraphOptimizationLevel, GRAPH_OPT[graph_opt])
        so.log_severity_level = 3
        so.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
        if affinity and int(threads) > 1:
            # onnxruntime pins threads 2..n (the caller's thread is the first); ';' separates threads.
            so.add_session_config_entry("session.intra_op_thread_affinities", ";".join(str(c + 1) for c in affinity[1:threads]))
        providers = [provider]
        if provider != "CPUExecutionProvider":
            opts = {"device_id": str(device_id)}
            providers = [(provider, opts), "CPUExecutionProvider"]
        self.settings = {"backend": backend, "provider": provider, "threads": int(threads), "inter_op_threads": 1,
                         "spinning": bool(spinning), "affinity": list(affinity) if affinity else None,
                         "graph_opt": graph_opt}
        self.backend = backend
        try:
            self.sess = ort.InferenceSession(path, so, providers=providers)
        except Exception as e:
            cls = classify_exception(e, "compile_error")
            if cls == "compile_error" and re.search(r"does not exist|No such file|NO_SUCHFILE", str(e)):
                cls = "load_error"  # the files went missing (a wiped cache): send them again
            raise AgentError(cls, "onnxruntime could not load %s: %s" % (os.path.basename(path), str(e)[:500]))
        self.inputs = [(i.name, i.shape, i.type) for i in self.sess.get_inputs()]
        self.outputs = [o.name for o in self.sess.get_outputs()]
        self.ort = ort
        self._binding = None

    def make_feeds(self, np, batch, seq_len, past_len, vocab_size, seed=0):
        rng = np.random.RandomState(seed)
        feeds = {}
        for name, shape, typ in self.inputs:
            dims = []
            for d in shape:
                if isinstance(d, int):
                    dims.append(d)
                elif d == "batch":
                    dims.append(batch)
                elif d == "sequence":
                    dims.append(seq_len)
                elif d == "past_sequence":
                    dims.append(past_len)
                elif d in ("total_sequence", "max_sequence"):  # a shared KV buffer: just long enough
                    dims.append(past_len + seq_len)
                else:
                    raise AgentError("runtime_error", "input %s has an unknown dynamic axis %r" % (name, d))
            if name == "attention_mask":
                feeds[name] = np.ones(dims, dtype=np.int64)
            elif "int64" in typ:
                feeds[name] = rng.randint(0, vocab_size, size=dims).astype(np.int64)
            else:  # a KV cache, of the graph's precision
                feeds[name] = rng.standard_normal(dims).astype(np.float16 if "float16" in typ else np.float32)
        return feeds

    def prepare(self, feeds):
        """Bind inputs once so the timed call is the model alone; on GPU back-ends IOBinding
        keeps inputs and outputs on the device, so no host-device copy is timed."""
        if self.backend == "ort-cpu":
            if any("max_sequence" in shape for _, shape, _ in self.inputs):
                self._binding = self._shared_kv_binding(feeds)
            else:
                self._feeds = feeds
            return
        binding = self.sess.io_binding()
        for name, arr in feeds.items():
            binding.bind_ortvalue_input(name, self.ort.OrtValue.ortvalue_from_numpy(arr, "cuda", 0))
        for name in self.outputs:
            binding.bind_output(name, "cuda", 0)
        self._binding = binding

    def _shared_kv_binding(self, feeds):
        """onnxruntime-genai's past_present_share_buffer: each layer's past buffer is bound as
        its present output too, so GroupQueryAttention appends in place (every timed step
        writes the same slot: the lengths come from attention_mask)."""
        binding = self.sess.io_binding()
        values = {}
        for name, arr in feeds.items():
            values[name] = self.ort.OrtValue.ortvalue_from_numpy(arr)
            binding.bind_ortvalue_input(name, values[name])
        for name in self.outputs:
            past = name.replace("present.", "past_key_values.", 1)
            if name.startswith("present.") and past in values:
                binding.bind_ortvalue_output(name, values[past])
            else:
                binding.bind_output(name)
        self._values = values  # the buffers live as long as the binding
        return binding

    def run_once(self):
        if self._binding is not None:
            self.sess.run_with_iobinding(self._binding)
            return None
        return self.sess.run(None, self._feeds)

    def check_outputs(self, np, outputs, batch):
        if outputs is None:
            outputs = [o.numpy() for o in self._binding.get_outputs()]
        logits = outputs[0]
        if logits.shape[0] != batch:
            raise AgentError("wrong_answer", "logits have batch %d, expected %d" % (logits.shape[0], batch))
        if not np.all(np.isfinite(logits)):
            raise AgentError("wrong_answer", "logits contain NaN or infinity")
