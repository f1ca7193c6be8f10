"""Who holds a lease or a claim: a process named ``host:pid:id``, and whether it is gone.

Sweeps lease jobs in the measurement store, search workers claim perplexities and trials, all
under such a name. A holder on this host whose process is gone lets go at once; one on another
host cannot be asked, and lets go when its lease or claim runs out."""

from __future__ import annotations

import os
import socket
import uuid


def owner_id() -> str:
    """This process, unique even across restarts that reuse its pid."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


def owner_alive(owner: str) -> bool:
    """False only for a process on this host that is gone."""
    host, _, rest = owner.partition(":")
    pid = rest.partition(":")[0]
    if host != socket.gethostname() or not pid.isdigit():
        return True
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, someone else's
        return True
    return True
