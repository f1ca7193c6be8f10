"""A real OpenSSH server on loopback with throwaway host and user keys: the tests' "board"."""

from __future__ import annotations

import getpass
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

SSHD = "/usr/sbin/sshd"


def ensure_sshd() -> str | None:
    """Path of sshd, installing Debian's openssh-server when we may; None if unavailable."""
    if os.path.exists(SSHD):
        return SSHD
    if os.geteuid() == 0 and shutil.which("apt-get"):
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        subprocess.run(["apt-get", "install", "-y", "-qq", "openssh-server"], env=env, capture_output=True, timeout=600)
        if not os.path.exists(SSHD):
            subprocess.run(["apt-get", "update", "-qq"], env=env, capture_output=True, timeout=600)
            subprocess.run(["apt-get", "install", "-y", "-qq", "openssh-server"], env=env, capture_output=True, timeout=600)
    return SSHD if os.path.exists(SSHD) else None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def keygen(path: Path) -> str:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(path)], check=True, capture_output=True)
    return Path(str(path) + ".pub").read_text().strip()


class LoopbackSSHD:
    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self.user = getpass.getuser()
        self.port = free_port()
        self.host_key = root / "ssh_host_ed25519_key"
        self.user_key = root / "id_ed25519"
        host_pub = keygen(self.host_key)
        user_pub = keygen(self.user_key)
        (root / "authorized_keys").write_text(user_pub + "\n")
        self.known_hosts = root / "known_hosts"
        self.known_hosts.write_text(f"[127.0.0.1]:{self.port} {' '.join(host_pub.split()[:2])}\n")
        self.config = root / "sshd_config"
        self.config.write_text(
            f"Port {self.port}\nListenAddress 127.0.0.1\nHostKey {self.host_key}\nPidFile {root / 'sshd.pid'}\n"
            f"AuthorizedKeysFile {root / 'authorized_keys'}\nPasswordAuthentication no\n"
            "KbdInteractiveAuthentication no\nPubkeyAuthentication yes\nPermitRootLogin prohibit-password\n"
            f"UsePAM no\nStrictModes no\nAllowUsers {self.user}\nSubsystem sftp internal-sftp\nLogLevel ERROR\n"
            "MaxStartups 100\nMaxSessions 50\nClientAliveInterval 0\n"
        )
        self.ssh_config = root / "ssh_config"
        self.ssh_config.write_text(
            f"Host board\n  HostName 127.0.0.1\n  Port {self.port}\n  User {self.user}\n"
            f"  IdentityFile {self.user_key}\n  UserKnownHostsFile {self.known_hosts}\n"
        )
        self.proc: subprocess.Popen[bytes] | None = None
        Path("/run/sshd").mkdir(parents=True, exist_ok=True)

    def start(self) -> None:
        self.proc = subprocess.Popen([SSHD, "-D", "-e", "-f", str(self.config)], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1) as s:
                    if s.recv(64).startswith(b"SSH-"):
                        return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"sshd did not start: {self.proc.stderr.read() if self.proc.stderr else ''}")

    def stop(self) -> None:
        """This server goes away with the connections it serves, as in a reboot; other sshd
        servers on the machine, and their sessions, are left alone (ended by pid, not name)."""
        if self.proc is None:
            return
        # sshd forks a process per connection (and those start the agent): found before the
        # server ends, while they are still its descendants
        served = _descendants(self.proc.pid)
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)
        self.proc = None
        for pid in served:
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass

    def drop(self) -> None:
        """The board falls off the network: this server and every connection it serves end
        at once (another server's connections live on)."""
        if self.proc is None:
            return
        tree = _descendants(self.proc.pid)
        for pid in [self.proc.pid, *tree]:
            try:
                os.kill(pid, 9)
            except ProcessLookupError:
                pass
        self.proc.wait(timeout=10)
        self.proc = None

    def inventory_entry(self, name: str, python: str, remote_dir: Path, **extra: object) -> str:
        """An inventory [hosts.NAME] section reaching this server without the ssh config."""
        lines = [f"[hosts.{name}]", 'hostname = "127.0.0.1"', f"port = {self.port}", f'user = "{self.user}"',
                 f'identity_file = "{self.user_key}"', f'known_hosts = "{self.known_hosts}"', f'python = "{python}"',
                 f'remote_dir = "{remote_dir}"']
        lines += [f'{k} = "{v}"' if isinstance(v, str) else f"{k} = {v}" for k, v in extra.items()]
        return "\n".join(lines) + "\n"

    def restart(self) -> None:
        self.stop()
        self.start()

    def inventory(self, path: Path, python: str, remote_dir: Path, **extra: object) -> Path:
        lines = ["[hosts.board]", 'hostname = "board"', f'python = "{python}"', f'remote_dir = "{remote_dir}"']
        lines += [f"{k} = {v!r}" if isinstance(v, str) else f"{k} = {v}" for k, v in extra.items()]
        path.write_text("\n".join(lines).replace("'", '"') + "\n")
        return path


def _descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (from /proc), children first."""
    parents: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            parents.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        kids = parents.get(todo.pop(), [])
        out += kids
        todo += kids
    return out
