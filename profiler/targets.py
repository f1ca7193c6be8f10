"""A measurement target: where the agent runs (this machine, or a board over SSH), how files
get there, and how the agent is started, checked and restarted.

Both kinds share one flow: deploy the agent into a folder versioned by the hash of its
files; upload each model by content hash into a ``.partial`` folder, have the agent verify
every file's sha256 and publish it; never send what the board already has."""

from __future__ import annotations

import hashlib
import logging
import os
import shlex
import shutil
import signal
import subprocess
import time
import uuid
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from device_agents import AGENT_DIR, AGENT_FILES
from export.artifact import MANIFEST, ExportedSubnet
from profiler.agent_client import AgentClient, AgentProcess
from profiler.errors import ErrorClass, HostError, MeasureError
from profiler.hosts import HostSpec, resolve_host
from subnets.paths import sha256_file

log = logging.getLogger(__name__)


def agent_version_hash() -> str:
    h = hashlib.sha256()
    for f in AGENT_FILES:
        h.update(f.encode())
        h.update((AGENT_DIR / f).read_bytes())
    return h.hexdigest()[:12]


@dataclass
class Timeouts:
    connect: float = 15.0
    handshake: float = 120.0  # importing onnxruntime on a Raspberry Pi takes seconds
    upload_stall: float = 60.0  # no byte moved for this long: the upload is dead
    measure: float = 300.0  # one measure verb, session load included
    verify: float = 120.0



class Target:
    """Base: file operations and process start are the subclass's; the flow is shared."""

    spec: HostSpec
    root: str  # absolute agent root on the target

    def __init__(self, spec: HostSpec, timeouts: Timeouts) -> None:
        self.spec = spec
        self.timeouts = timeouts
        self.client: AgentClient | None = None
        self.hello: dict[str, Any] | None = None
        self.bytes_uploaded = 0
        # the same across reconnects: the board ends this target's orphaned agent by it
        self.token = uuid.uuid4().hex

    # subclass API -----------------------------------------------------------------------
    def open(self) -> None: ...
    def close_link(self) -> None: ...
    def mkdirs(self, path: str) -> None: raise NotImplementedError
    def exists(self, path: str) -> bool: raise NotImplementedError
    def put(self, local: Path, remote: str) -> None: raise NotImplementedError
    def write_text(self, remote: str, text: str) -> None: raise NotImplementedError
    def spawn(self, argv: list[str], memory_mb: int | None) -> AgentProcess: raise NotImplementedError
    def kill_pid(self, pid: int) -> None: raise NotImplementedError

    # shared flow ------------------------------------------------------------------------
    def join(self, *parts: str) -> str:
        return str(PurePosixPath(self.root, *parts))

    @property
    def agent_dir(self) -> str:
        return self.join(f"agent-{agent_version_hash()}")

    def deploy_agent(self) -> None:
        marker = str(PurePosixPath(self.agent_dir, ".complete"))
        if self.exists(marker):
            return
        self.mkdirs(self.agent_dir)
        self.mkdirs(self.join("models"))
        for f in AGENT_FILES:
            self.put(AGENT_DIR / f, str(PurePosixPath(self.agent_dir, f)))
        self.write_text(marker, agent_version_hash())
        log.info("deployed agent %s to %s:%s", agent_version_hash(), self.spec.name, self.agent_dir)

    def start(self) -> dict[str, Any]:
        """Open the link, deploy, start the agent and shake hands. Returns the handshake."""
        self.open()
        self.deploy_agent()
        argv = [self.spec.python, str(PurePosixPath(self.agent_dir, "agent.py")), "--root", self.root,
                "--token", self.token] + (["--llama-cpp", self.spec.llama_cpp] if self.spec.llama_cpp else [])
        proc = self.spawn(argv, self.spec.agent_memory_mb)
        self.client = AgentClient(proc, self.spec.name)
        try:
            hello = self.client.call("hello", timeout=self.timeouts.handshake)
        except MeasureError as e:
            tail, status = self._exit_evidence(proc)
            if "not found" in tail or "No such file" in tail or status == 127:
                raise HostError(f"{self.spec.name} has no Python at {self.spec.python!r}",
                                "install python3 (3.8+) on the board, or set python = \"/path/to/python3\" in the inventory") from None
            if "SyntaxError" in tail:
                raise HostError(f"the Python on {self.spec.name} ({self.spec.python}) is too old for the agent",
                                "install Python 3.8 or newer on the board") from None
            raise HostError(f"the agent on {self.spec.name} did not answer the handshake: {e.message}",
                            "run with -v and check the board's Python can start") from None
        if hello.get("missing"):
            raise HostError(
                f"{self.spec.name} lacks {', '.join(sorted(hello['missing']))} for {hello.get('python_executable')}",
                f"on the board: {hello.get('python_executable', 'python3')} -m pip install {' '.join(sorted(hello['missing']))}",
            )
        self.client.pid = hello.get("pid")
        if hello.get("ended_orphan"):
            log.warning("%s: ended the agent (pid %s) left running by the lost link", self.spec.name, hello["ended_orphan"])
        if hello.get("other_agents"):
            log.warning("%s: %d other edgenas agent(s) run on this board (pids %s): another sweep shares it, and "
                        "its cells will disturb these timings", self.spec.name, len(hello["other_agents"]),
                        ", ".join(map(str, hello["other_agents"])))
        self.hello = hello
        return hello

    def _exit_evidence(self, proc: AgentProcess) -> tuple[str, int | None]:
        """The failed agent's stderr and exit status: on a busy host its stdout can end before
        its status and its last stderr lines arrive (a board without Python read as a hang)."""
        deadline = time.monotonic() + 3.0
        while proc.exit_status() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.2)  # the stderr reader drains after the exit
        return self.client.stderr_tail if self.client else "", proc.exit_status()

    def restart(self) -> dict[str, Any]:
        """After a timeout or a lost link: kill what is left, reconnect, shake hands again."""
        self.stop(graceful=False)
        return self.start()

    def stop(self, graceful: bool = True) -> None:
        if self.client is not None:
            if graceful:
                self.client.close()
            else:
                pid = self.client.pid
                try:
                    if pid:
                        self.kill_pid(pid)
                except Exception:
                    pass
                self.client.abandon()
            self.client = None
        self.close_link()

    def call(self, verb: str, args: dict[str, Any] | None = None, timeout: float = 60.0) -> dict[str, Any]:
        if self.client is None:
            raise MeasureError(ErrorClass.CONNECTION_LOST, f"no agent running on {self.spec.name}")
        return self.client.call(verb, args, timeout)

    def models_on_board(self) -> set[str]:
        return set(self.call("models", timeout=self.timeouts.verify)["models"])

    def ensure_model(self, exported: ExportedSubnet, on_board: set[str] | None = None) -> bool:
        """Upload ``exported`` unless the board has it; verify by sha256. True if sent."""
        key = exported.key
        if on_board is None:
            on_board = self.models_on_board()
        if key in on_board:
            return False
        files = [exported.graphs[p] for p in sorted(exported.graphs)] + [MANIFEST]
        if exported.weights_sha256 is not None:
            files.append(exported.weights_file)
        files = list(dict.fromkeys(files))  # a GGUF file serves both phases (and holds the weights)
        digests = {f: sha256_file(exported.folder / f) for f in files}
        partial = self.join("models", f"{key}.partial-{self.token[:16]}")
        self.mkdirs(partial)
        for f in files:
            self.put(exported.folder / f, str(PurePosixPath(partial, f)))
            self.bytes_uploaded += (exported.folder / f).stat().st_size
        self.call("verify", {"key": key, "files": digests, "uploader": self.token[:16]}, timeout=self.timeouts.verify)
        on_board.add(key)
        return True


class LocalTarget(Target):
    """The agent as a subprocess of this machine: same agent, same protocol."""

    def __init__(self, spec: HostSpec, timeouts: Timeouts) -> None:
        super().__init__(spec, timeouts)
        self.root = str(Path(os.path.expanduser(spec.remote_dir)).resolve())
        self._popen: subprocess.Popen[bytes] | None = None

    def mkdirs(self, path: str) -> None:
        Path(path).mkdir(parents=True, exist_ok=True)

    def exists(self, path: str) -> bool:
        return Path(path).exists()

    def put(self, local: Path, remote: str) -> None:
        tmp = f"{remote}.tmp-{self.token[:8]}"  # atomic: a second sweep never sees a half-written file
        shutil.copyfile(local, tmp)
        os.replace(tmp, remote)

    def write_text(self, remote: str, text: str) -> None:
        Path(remote).write_text(text)

    def spawn(self, argv: list[str], memory_mb: int | None) -> AgentProcess:
        def limit() -> None:
            if memory_mb:
                import resource

                b = memory_mb * 1024 * 1024
                resource.setrlimit(resource.RLIMIT_AS, (b, b))

        p = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             start_new_session=True, preexec_fn=limit if memory_mb else None)
        self._popen = p
        assert p.stdin and p.stdout and p.stderr

        def kill() -> None:
            if p.poll() is None:
                p.kill()
            p.wait(timeout=10)

        return AgentProcess(p.stdin, p.stdout, p.stderr, p.poll, kill, lambda: True)

    def kill_pid(self, pid: int) -> None:
        if self._popen is not None and self._popen.pid == pid and self._popen.poll() is None:
            os.kill(pid, signal.SIGKILL)


def _link_faults(fn: Any) -> Any:
    """SFTP/SSH failures inside a sweep are a lost connection (retried after reconnecting),
    not a crash of the host process."""
    import functools

    @functools.wraps(fn)
    def wrapper(self: SSHTarget, *args: Any, **kwargs: Any) -> Any:
        import paramiko

        if self.sftp is None:
            raise MeasureError(ErrorClass.CONNECTION_LOST, f"no connection to {self.spec.name}")
        try:
            return fn(self, *args, **kwargs)
        except MeasureError:
            raise
        except (FileNotFoundError, PermissionError) as e:
            # The link works but the board's folder is not what we left there (a cache
            # wiped, a full or read-only disk): the file must be sent again.
            raise MeasureError(ErrorClass.LOAD_ERROR, f"{fn.__name__} on {self.spec.name} failed: {e}") from None
        except (OSError, EOFError, paramiko.SSHException) as e:
            raise MeasureError(ErrorClass.CONNECTION_LOST, f"{fn.__name__} on {self.spec.name} failed: {e}") from None

    return wrapper


class SSHTarget(Target):
    """A board over SSH: SFTP for files, an exec channel for the agent."""

    def __init__(self, spec: HostSpec, timeouts: Timeouts, accept_new_host_key: bool = False,
                 inventory: Path | None = None, ssh_config: Path | None = None) -> None:
        super().__init__(spec, timeouts)
        self.accept_new_host_key = accept_new_host_key
        self._resolve = lambda name: resolve_host(name, inventory, ssh_config)
        self.ssh: Any = None
        self.sftp: Any = None
        self.root = spec.remote_dir

    def open(self) -> None:
        from profiler.ssh import connect

        if self.ssh is not None and self.ssh.get_transport() is not None and self.ssh.get_transport().is_active():
            return
        self.ssh = connect(self.spec, self.accept_new_host_key, jump_resolver=self._resolve)
        transport = self.ssh.get_transport()
        transport.set_keepalive(15)
        self.sftp = self.ssh.open_sftp()
        self.sftp.get_channel().settimeout(self.timeouts.upload_stall)
        home = self.sftp.normalize(".")
        rd = self.spec.remote_dir
        if rd == "~" or rd.startswith("~/"):
            rd = str(PurePosixPath(home, rd[2:]))
        elif not rd.startswith("/"):
            rd = str(PurePosixPath(home, rd))
        self.root = rd

    def close_link(self) -> None:
        for obj in (self.sftp, self.ssh):
            try:
                if obj is not None:
                    obj.close()
            except Exception:
                pass
        jump = getattr(self.ssh, "_edgenas_jump", None)
        if jump is not None:
            jump.close()
        self.sftp = self.ssh = None

    @_link_faults
    def mkdirs(self, path: str) -> None:
        parts = PurePosixPath(path).parts
        cur = PurePosixPath(parts[0])
        for p in parts[1:]:
            cur = cur / p
            try:
                self.sftp.stat(str(cur))
            except FileNotFoundError:
                self.sftp.mkdir(str(cur), mode=0o700)

    @_link_faults
    def exists(self, path: str) -> bool:
        try:
            self.sftp.stat(path)
            return True
        except FileNotFoundError:
            return False

    @_link_faults
    def put(self, local: Path, remote: str) -> None:
        self.sftp.put(str(local), remote, confirm=True)  # a stall past upload_stall raises socket.timeout

    @_link_faults
    def write_text(self, remote: str, text: str) -> None:
        with self.sftp.open(remote, "w") as f:
            f.write(text)

    def _exec(self, command: str) -> Any:
        import paramiko

        transport = self.ssh.get_transport() if self.ssh is not None else None
        if transport is None or not transport.is_active():
            raise MeasureError(ErrorClass.CONNECTION_LOST, f"no connection to {self.spec.name}")
        try:
            chan = transport.open_session(timeout=self.timeouts.connect)
        except (paramiko.SSHException, OSError, EOFError) as e:
            raise MeasureError(ErrorClass.CONNECTION_LOST, f"cannot open a channel to {self.spec.name}: {e}") from None
        chan.exec_command(command)
        return chan

    def spawn(self, argv: list[str], memory_mb: int | None) -> AgentProcess:
        # Every word is quoted: host names, paths and arguments never reach the remote shell raw.
        cmd = " ".join(shlex.quote(a) for a in argv)
        if memory_mb:
            cmd = f"ulimit -v {int(memory_mb) * 1024} && exec {cmd}"
        else:
            cmd = f"exec {cmd}"
        chan = self._exec(cmd)
        transport = self.ssh.get_transport()

        def status() -> int | None:
            return chan.recv_exit_status() if chan.exit_status_ready() else None

        def kill() -> None:
            chan.close()

        return AgentProcess(chan.makefile_stdin("wb"), chan.makefile("rb"), chan.makefile_stderr("rb"), status, kill,
                            lambda: transport.is_active())

    def kill_pid(self, pid: int) -> None:
        if self.ssh is None or not self.ssh.get_transport() or not self.ssh.get_transport().is_active():
            return
        chan = self._exec(f"kill -9 {int(pid)}")
        deadline = time.monotonic() + 10
        while not chan.exit_status_ready() and time.monotonic() < deadline:
            time.sleep(0.05)
        chan.close()


def make_target(spec: HostSpec, timeouts: Timeouts | None = None, accept_new_host_key: bool = False,
                inventory: Path | None = None, ssh_config: Path | None = None) -> Target:
    timeouts = timeouts or Timeouts(connect=spec.connect_timeout)
    if spec.kind == "local":
        return LocalTarget(spec, timeouts)
    return SSHTarget(spec, timeouts, accept_new_host_key, inventory, ssh_config)
