"""The edgenas device agent: the small program copied over SSH onto a board.

It runs with only Python 3.8+, numpy and the runtime on the board, and never imports host
code: ``agent.py`` is the entry point; its sibling ``agent_*.py`` modules are imported by bare
name from the agent's own folder. This ``__init__`` only lets the host (and the tests) import
the same modules as ``device_agents.agent_timing`` etc.; nothing here runs on the board."""

from pathlib import Path

AGENT_DIR = Path(__file__).parent
AGENT_FILES = ("agent.py", "agent_timing.py", "agent_telemetry.py", "agent_runtime.py", "agent_onnxprobe.py",
               "agent_tensorrt.py", "agent_pidfile.py", "agent_llamacpp.py")
