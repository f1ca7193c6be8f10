"""Resolving ``--host NAME``: ``local``, an inventory entry (TOML), or an ``~/.ssh/config``
alias."""

from __future__ import annotations

import fnmatch
import os
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from export.llama_cpp_tools import local_llama_cpp
from profiler.errors import HostError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

INVENTORY_KEYS = {"hostname", "user", "port", "identity_file", "proxy_jump", "known_hosts", "python",
                  "remote_dir", "backend", "threads", "connect_timeout", "agent_memory_mb", "llama_cpp"}


@dataclass(frozen=True)
class HostSpec:
    name: str
    kind: str  # "local" | "ssh"
    hostname: str | None = None
    user: str | None = None
    port: int = 22
    identity_files: tuple[str, ...] = ()
    proxy_jump: str | None = None
    known_hosts: tuple[str, ...] = ()
    python: str = "python3"
    remote_dir: str = "~/.edgenas"
    backend: str = "ort-cpu"
    threads: int | None = None
    connect_timeout: float = 15.0
    agent_memory_mb: int | None = None  # ulimit -v for the agent (protects a small board)
    llama_cpp: str | None = None  # the board's llama.cpp tools folder (or llama-bench), if not on PATH
    extra: dict[str, Any] = field(default_factory=dict)

    def describe(self) -> str:
        if self.kind == "local":
            return "local"
        via = f" via {self.proxy_jump}" if self.proxy_jump else ""
        return f"{self.user + '@' if self.user else ''}{self.hostname}:{self.port}{via}"


def default_inventory() -> Path:
    env = os.environ.get("EDGENAS_INVENTORY")
    if env:
        return Path(env)
    xdg = os.environ.get("XDG_CONFIG_HOME")
    return (Path(xdg) if xdg else Path.home() / ".config") / "edgenas" / "inventory.toml"


def default_ssh_config() -> Path:
    return Path(os.environ.get("EDGENAS_SSH_CONFIG", str(Path.home() / ".ssh" / "config")))


def _read_inventory(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        return tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise HostError(f"inventory {path} is not valid TOML: {e}", "fix its syntax (see README, 'Inventory')") from None


def _load_groups(path: Path) -> dict[str, list[str]]:
    """``[groups] orin = ["jetson-1", "jetson-2"]``: names for sets of boards."""
    groups = _read_inventory(path).get("groups", {})
    if not isinstance(groups, dict) or not all(
            isinstance(v, list) and v and all(isinstance(x, str) for x in v) for v in groups.values()):
        raise HostError(f"inventory {path}: [groups] must map names to lists of host names",
                        'write e.g. orin = ["jetson-1", "jetson-2"] under [groups]')
    return groups


def resolve_hosts(text: str, inventory: Path | None = None,
                  ssh_config: Path | None = None) -> tuple[list[HostSpec], str | None]:
    """``--host``: one board, a comma-separated list, or an inventory group; (boards, the
    group's name if one was named)."""
    inventory = inventory or default_inventory()
    names = [n.strip() for n in text.split(",")] if text else [text]
    if any(not n for n in names):
        raise HostError(f"--host {text!r} has an empty name", "separate board names with single commas")
    groups = _load_groups(inventory)
    group = names[0] if len(names) == 1 and names[0] in groups and names[0] not in _load_inventory(inventory) else None
    if group is not None:
        names = groups[group]
    if len(set(names)) != len(names):
        raise HostError(f"--host {text!r} names a board twice", "name each board once")
    try:
        return [resolve_host(n, inventory, ssh_config) for n in names], group
    except HostError as e:
        if len(names) == 1 and groups and "unknown host" in e.problem:
            raise HostError(f"{e.problem}; nor is it one of the inventory's groups ({', '.join(sorted(groups))})",
                            e.fix) from None
        raise


def _load_inventory(path: Path) -> dict[str, dict[str, Any]]:
    data = _read_inventory(path)
    hosts = data.get("hosts", {})
    if not isinstance(hosts, dict):
        raise HostError(f"inventory {path}: 'hosts' must be a table", "write [hosts.NAME] sections")
    for name, entry in hosts.items():
        if not isinstance(entry, dict):
            raise HostError(f"inventory {path}: hosts.{name} must be a table", "write [hosts.NAME] with key = value lines")
        unknown = set(entry) - INVENTORY_KEYS
        if unknown:
            raise HostError(f"inventory {path}: hosts.{name} has unknown keys {sorted(unknown)}",
                            f"use only {sorted(INVENTORY_KEYS)}")
    return hosts


def _ssh_config_entry(name: str, path: Path) -> dict[str, Any] | None:
    """The merged ``~/.ssh/config`` options for ``name``, or None if no Host block other than
    a catch-all names it."""
    if not path.is_file():
        return None
    import paramiko

    try:
        cfg = paramiko.SSHConfig.from_path(str(path))
    except Exception as e:
        raise HostError(f"{path} could not be parsed: {e}", "fix the ssh config file") from None
    patterns = [p for p in cfg.get_hostnames() if p != "*"]
    if not any(fnmatch.fnmatch(name, p) for p in patterns if not p.startswith("!")):
        return None
    return dict(cfg.lookup(name))


def resolve_host(name: str, inventory: Path | None = None, ssh_config: Path | None = None) -> HostSpec:
    if not name or any(c in name for c in "\n\r\0"):
        raise HostError(f"host name {name!r} is not valid", "pass an ~/.ssh/config alias, an inventory entry, or 'local'")
    inventory = inventory or default_inventory()
    ssh_config = ssh_config or default_ssh_config()
    inv = _load_inventory(inventory).get(name)
    if name == "local" and inv is None:
        return HostSpec("local", "local", python=sys.executable, remote_dir=str(_local_root()),
                        llama_cpp=local_llama_cpp())
    ssh = None
    alias = name
    if inv is not None and inv.get("hostname"):
        alias = str(inv["hostname"])
    ssh = _ssh_config_entry(alias, ssh_config)
    if inv is None and ssh is None:
        raise HostError(
            f"unknown host {name!r}: it is neither in {ssh_config} nor in the inventory {inventory}",
            f"add a 'Host {name}' block with HostName/User/IdentityFile to {ssh_config}, or a [hosts.{name}] "
            "section to the inventory, or use --host local",
        )
    ssh = ssh or {}
    inv = inv or {}
    if inv.get("hostname") == "local" or name == "local":
        spec = HostSpec(name, "local", python=str(inv.get("python", sys.executable)),
                        remote_dir=str(inv.get("remote_dir", _local_root())))
    else:
        proxy = inv.get("proxy_jump") or ssh.get("proxyjump")
        idents = inv.get("identity_file") or ssh.get("identityfile") or []
        if isinstance(idents, str):
            idents = [idents]
        known = inv.get("known_hosts") or ssh.get("userknownhostsfile") or []
        if isinstance(known, str):
            known = known.split()
        try:
            port = int(inv.get("port") or ssh.get("port") or 22)
        except ValueError:
            raise HostError(f"host {name!r} has a non-numeric port", "set Port to a number") from None
        spec = HostSpec(
            name, "ssh",
            hostname=str(ssh.get("hostname") or alias),
            user=inv.get("user") or ssh.get("user"),
            port=port,
            identity_files=tuple(os.path.expanduser(i) for i in idents),
            proxy_jump=None if proxy in (None, "none") else str(proxy),
            known_hosts=tuple(os.path.expanduser(k) for k in known),
            python=str(inv.get("python", "python3")),
            remote_dir=str(inv.get("remote_dir", "~/.edgenas")),
            connect_timeout=float(inv.get("connect_timeout") or ssh.get("connecttimeout") or 15.0),
        )
    return replace(spec, backend=str(inv.get("backend", spec.backend)),
                   threads=int(inv["threads"]) if "threads" in inv else None,
                   agent_memory_mb=int(inv["agent_memory_mb"]) if "agent_memory_mb" in inv else None,
                   llama_cpp=str(inv["llama_cpp"]) if "llama_cpp" in inv else
                   (local_llama_cpp() if spec.kind == "local" else None))


def _local_root() -> Path:
    from subnets.paths import cache_dir

    return cache_dir() / "local-agent"
