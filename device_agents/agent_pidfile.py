"""The agent's pid, recorded on the board (stdlib only; Python 3.8+).

After a lost link the host cannot reach the old agent's process: it may still be timing a
cell. The host starts each agent with a token that stays the same across its reconnects;
the agent records its pid under that token, and a new agent with the same token ends the
old one before it answers, so no two cells of one sweep overlap on the board. Agents of
other tokens (another sweep using the same board) are reported, never killed."""

import hashlib
import os
import signal
import subprocess
import time


def _is_agent(pid):
    """True when ``pid`` is a live edgenas agent (not a recycled pid of something else)."""
    try:
        with open("/proc/%d/cmdline" % pid, "rb") as f:
            return b"agent.py" in f.read()
    except FileNotFoundError:
        return False
    except OSError:
        pass
    try:  # no /proc (macOS): ask ps
        out = subprocess.run(["ps", "-p", str(pid), "-o", "command="], capture_output=True, text=True, timeout=5)
        return "agent.py" in out.stdout
    except Exception:
        return False


def _path(root, token):
    return os.path.join(root, "agents", "%s.pid" % hashlib.sha256(token.encode()).hexdigest()[:16])


def _read_pid(path):
    try:
        with open(path) as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def take_over(root, token):
    """End this token's previous agent if it still runs, record ours; returns
    (pid ended or None, pids of live agents of other tokens)."""
    folder = os.path.join(root, "agents")
    os.makedirs(folder, exist_ok=True)
    mine = _path(root, token)
    ended = None
    old = _read_pid(mine)
    if old and old != os.getpid() and _is_agent(old):
        try:
            os.kill(old, signal.SIGKILL)
            ended = old
            for _ in range(50):  # its session's memory is free before ours loads
                if not _is_agent(old):
                    break
                time.sleep(0.02)
        except OSError:
            pass
    tmp = mine + ".tmp%d" % os.getpid()
    with open(tmp, "w") as f:
        f.write("%d\n" % os.getpid())
    os.replace(tmp, mine)
    others = []
    for name in os.listdir(folder):
        path = os.path.join(folder, name)
        pid = _read_pid(path) if name.endswith(".pid") and path != mine else None
        if pid and pid != os.getpid() and _is_agent(pid):
            others.append(pid)
    return ended, others
