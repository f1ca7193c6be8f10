"""Talking to a running device agent: JSON lines over its stdin/stdout, every wait bounded.

The process may be local (``subprocess``) or remote (an SSH exec channel); both are wrapped
as an ``AgentProcess`` so the client, the deployment and the sweep do not care which."""

from __future__ import annotations

import json
import logging
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import IO, Any

from profiler.errors import ErrorClass, MeasureError

log = logging.getLogger(__name__)


@dataclass
class AgentProcess:
    stdin: IO[bytes]
    stdout: IO[bytes]
    stderr: IO[bytes]
    exit_status: Callable[[], int | None]  # None while running
    kill: Callable[[], None]
    transport_alive: Callable[[], bool]  # False once the link itself is gone


class AgentClient:
    def __init__(self, proc: AgentProcess, name: str) -> None:
        self.proc = proc
        self.name = name
        self._lines: queue.Queue[bytes | None] = queue.Queue()
        self._stderr_tail = bytearray()
        self._next_id = 0
        self.pid: int | None = None
        threading.Thread(target=self._pump, daemon=True, name=f"agent-out-{name}").start()
        threading.Thread(target=self._pump_err, daemon=True, name=f"agent-err-{name}").start()

    def _pump(self) -> None:
        try:
            for line in iter(self.proc.stdout.readline, b""):
                self._lines.put(line)
        except Exception:  # the channel died under us; the reader below reports it
            pass
        self._lines.put(None)

    def _pump_err(self) -> None:
        try:
            for line in iter(self.proc.stderr.readline, b""):
                self._stderr_tail += line
                del self._stderr_tail[:-4000]
        except Exception:
            pass

    @property
    def stderr_tail(self) -> str:
        return self._stderr_tail.decode(errors="replace")[-1500:]

    def _dead(self, what: str) -> MeasureError:
        if not self.proc.transport_alive():
            return MeasureError(ErrorClass.CONNECTION_LOST, f"connection to {self.name} lost {what}")
        status = self.proc.exit_status()
        tail = self.stderr_tail.strip().splitlines()[-3:]
        return MeasureError(ErrorClass.RUNTIME_ERROR,
                            f"agent on {self.name} exited {what} (status {status}){': ' + ' | '.join(tail) if tail else ''}")

    def call(self, verb: str, args: dict[str, Any] | None = None, timeout: float = 60.0) -> dict[str, Any]:
        self._next_id += 1
        rid = self._next_id
        data = (json.dumps({"id": rid, "verb": verb, "args": args or {}}) + "\n").encode()
        try:
            self.proc.stdin.write(data)
            self.proc.stdin.flush()
        except (OSError, EOFError, ValueError) as e:
            raise self._dead(f"before {verb} ({type(e).__name__})") from None
        import time

        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise MeasureError(ErrorClass.TIMEOUT, f"{verb} on {self.name} gave no answer within {timeout:.0f} s")
            try:
                line = self._lines.get(timeout=left)
            except queue.Empty:
                continue
            if line is None:
                self._lines.put(None)  # keep reporting EOF to later calls
                raise self._dead(f"during {verb}")
            try:
                resp = json.loads(line)
            except json.JSONDecodeError:
                raise MeasureError(ErrorClass.PROTOCOL_ERROR, f"agent on {self.name} wrote a non-JSON line: {line[:200]!r}") from None
            if resp.get("id") != rid:
                continue  # the late answer to a request that timed out earlier
            if resp.get("ok"):
                return resp["result"]
            err = resp.get("error") or {}
            raise MeasureError(ErrorClass.parse(err.get("class")), str(err.get("message", "unknown agent error")))

    def close(self, timeout: float = 5.0) -> None:
        try:
            self.call("shutdown", timeout=timeout)
        except MeasureError:
            pass
        self.abandon()

    def abandon(self) -> None:
        """Kill the agent and let go of its pipes (an SSH channel's file left open complains
        when it is collected after the link closed)."""
        for step in (self.proc.kill, self.proc.stdin.close):
            try:
                step()
            except Exception:
                pass
