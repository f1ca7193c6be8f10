"""SSH connections with paramiko: known hosts checked, unknown or changed keys refused unless
the user opts in explicitly, every wait bounded."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import paramiko

from profiler.errors import HostError
from profiler.hosts import HostSpec

log = logging.getLogger(__name__)


class _RecordNewKey(paramiko.MissingHostKeyPolicy):
    """The explicit opt-in: accept a host's first key, save it to known_hosts and say so."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def missing_host_key(self, client: paramiko.SSHClient, hostname: str, key: paramiko.PKey) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        hk = paramiko.HostKeys(str(self.path)) if self.path.is_file() else paramiko.HostKeys()
        hk.add(hostname, key.get_name(), key)
        hk.save(str(self.path))
        client.get_host_keys().add(hostname, key.get_name(), key)
        log.warning("accepted NEW host key for %s (%s %s), recorded in %s", hostname, key.get_name(),
                    key.fingerprint if hasattr(key, "fingerprint") else key.get_fingerprint().hex(), self.path)


def _known_hosts_files(spec: HostSpec) -> list[Path]:
    files = [Path(p) for p in spec.known_hosts]
    return files or [Path.home() / ".ssh" / "known_hosts"]


def connect(spec: HostSpec, accept_new_host_key: bool = False, sock: Any = None,
            jump_resolver: Any = None) -> paramiko.SSHClient:
    """An authenticated SSH client to ``spec``; a HostError naming the problem otherwise."""
    client = paramiko.SSHClient()
    files = _known_hosts_files(spec)
    for f in files:
        if f.is_file():
            try:
                client.load_host_keys(str(f))
            except (OSError, paramiko.SSHException) as e:
                raise HostError(f"known_hosts file {f} is unreadable: {e}", "repair or remove the file") from None
    client.set_missing_host_key_policy(_RecordNewKey(files[0]) if accept_new_host_key else paramiko.RejectPolicy())
    jump = None
    if spec.proxy_jump and sock is None:
        if jump_resolver is None:
            raise HostError(f"host {spec.name} needs ProxyJump {spec.proxy_jump}", "resolve it through the profiler")
        jump_spec = jump_resolver(spec.proxy_jump)
        jump = connect(jump_spec, accept_new_host_key, jump_resolver=jump_resolver)
        try:
            sock = jump.get_transport().open_channel("direct-tcpip", (spec.hostname, spec.port), ("127.0.0.1", 0),
                                                     timeout=spec.connect_timeout)
        except (paramiko.SSHException, OSError) as e:
            jump.close()
            raise HostError(f"jump host {spec.proxy_jump} could not reach {spec.hostname}:{spec.port}: {e}",
                            "check the board is up and reachable from the jump host") from None
    keys = [k for k in spec.identity_files if os.path.isfile(k)]
    try:
        client.connect(
            spec.hostname or spec.name, port=spec.port, username=spec.user, key_filename=keys or None,
            timeout=spec.connect_timeout, banner_timeout=spec.connect_timeout, auth_timeout=spec.connect_timeout,
            channel_timeout=spec.connect_timeout, sock=sock, allow_agent=True, look_for_keys=not keys,
        )
    except paramiko.BadHostKeyException as e:
        raise HostError(
            f"the host key of {spec.hostname}:{spec.port} has CHANGED (got {e.key.get_name()}): someone may be "
            "intercepting the connection, or the board was reinstalled",
            f"if the board was reinstalled, remove the old key: ssh-keygen -R '[{spec.hostname}]:{spec.port}'",
        ) from None
    except paramiko.AuthenticationException:
        raise HostError(
            f"authentication refused by {spec.describe()} for user {spec.user or os.environ.get('USER', '?')}",
            "check User and IdentityFile in ~/.ssh/config (or the inventory) and the board's authorized_keys",
        ) from None
    except paramiko.SSHException as e:
        if "not found in known_hosts" in str(e):
            raise HostError(
                f"{spec.hostname}:{spec.port} is not in known_hosts ({', '.join(map(str, _known_hosts_files(spec)))}): "
                "its identity cannot be checked",
                "verify the board's key fingerprint, then rerun once with --accept-new-host-key (it records the key)",
            ) from None
        raise HostError(f"SSH to {spec.describe()} failed: {e}", "check the board's sshd and the network") from None
    except (TimeoutError, OSError) as e:
        raise HostError(f"cannot reach {spec.describe()}: {e.strerror if getattr(e, 'strerror', None) else e}",
                        "check the board is powered, on the network, and sshd listens on that port") from None
    if jump is not None:
        client._edgenas_jump = jump  # keep the jump connection alive as long as this one
    return client
