"""Export and quantization: a sub-network's weights as the files runtimes load (ONNX prefill
and decode graphs, plain or with onnxruntime's fused operators; llama.cpp GGUF files) and
the arithmetic of each deployed precision. Above the core (``subnets``), below the profiler."""
