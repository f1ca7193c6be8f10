"""This machine's llama.cpp tools: where they are, and running one of them.

The host needs them for what only upstream writes (``llama-quantize``'s K-quant presets) and
for profiling ``--host local`` on llama.cpp; a board has its own (its inventory entry)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

from subnets.errors import ConfigError

# the llama-cpp-python release whose vendored llama.cpp scripts/build_llama_cpp.sh builds
LLAMA_CPP_BUILD = "0.3.36"


def local_llama_cpp() -> str | None:
    """This machine's llama.cpp tools: $EDGENAS_LLAMA_CPP, llama-bench on PATH, or the folder
    ``scripts/build_llama_cpp.sh`` builds into (None: none of them)."""
    from subnets.paths import cache_dir

    env = os.environ.get("EDGENAS_LLAMA_CPP")
    if env:
        return env
    on_path = shutil.which("llama-bench")
    if on_path:
        return str(Path(on_path).parent)
    built = cache_dir() / "llama.cpp" / LLAMA_CPP_BUILD / "bin"
    return str(built) if (built / "llama-bench").is_file() else None


def tool(name: str, why: str) -> Path:
    """The path of llama.cpp tool ``name``, or a clear error naming what needs it (``why``)."""
    folder = local_llama_cpp()
    path = Path(folder) / name if folder else None
    if path is None or not path.is_file():
        where = f"not in {folder}" if folder else "no llama.cpp tools found ($EDGENAS_LLAMA_CPP, PATH, the build cache)"
        raise ConfigError(f"{why} needs llama.cpp's {name} ({where})",
                          "build the tools with `bash scripts/build_llama_cpp.sh`, or set EDGENAS_LLAMA_CPP to the "
                          "folder holding them")
    return path


def run_tool(name: str, args: list[str], why: str, timeout: float = 1800) -> str:
    """Run ``name`` with ``args``; its output, or a clear error with the tail of what it said."""
    cmd = [str(tool(name, why)), *args]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).strip().splitlines()[-5:]
        raise ConfigError(f"{name} failed ({done.returncode}) for {why}: {' | '.join(tail)}",
                          "check the input file, or rebuild the tools (bash scripts/build_llama_cpp.sh)")
    return done.stdout + done.stderr
