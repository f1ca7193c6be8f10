"""A throwaway PostgreSQL server for the tests: initdb in a temporary directory, started with
pg_ctl on a free loopback port, trust authentication, stopped and deleted afterwards."""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from tests.sshd import free_port


def find_postgres() -> Path | None:
    """Debian's server binaries (/usr/lib/postgresql/<major>/bin), installed when we may."""
    def found() -> Path | None:
        hits = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"))
        return Path(hits[-1]).parent if hits else None

    if found() is None and os.geteuid() == 0 and shutil.which("apt-get"):
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        for cmd in (["apt-get", "install", "-y", "-qq", "postgresql"], ["apt-get", "update", "-qq"],
                    ["apt-get", "install", "-y", "-qq", "postgresql"]):
            subprocess.run(cmd, env=env, capture_output=True, timeout=900)
            if found() is not None:
                break
    return found()


class PostgresServer:
    def __init__(self, bindir: Path) -> None:
        self.bindir = bindir
        self.root = Path(tempfile.mkdtemp(prefix="edgenas-pg-"))
        self.data = self.root / "data"
        self.port = free_port()
        self.url = f"postgresql://edgenas@127.0.0.1:{self.port}/postgres"
        self.as_user: list[str] = []
        if os.geteuid() == 0:  # postgres will not run as root
            shutil.chown(self.root, "postgres", "postgres")
            self.as_user = ["runuser", "-u", "postgres", "--"]

    def _run(self, *args: str) -> None:
        res = subprocess.run([*self.as_user, *args], capture_output=True, text=True, timeout=120)
        if res.returncode != 0:
            raise RuntimeError(f"{args[0]} failed: {res.stdout[-1000:]} {res.stderr[-2000:]}")

    def start(self) -> None:
        self._run(str(self.bindir / "initdb"), "-D", str(self.data), "-U", "edgenas", "--auth=trust", "-E", "UTF8",
                  "--no-sync")
        self._run(str(self.bindir / "pg_ctl"), "-D", str(self.data), "-l", str(self.root / "log"), "-w", "-o",
                  f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c fsync=off", "start")

    def stop(self) -> None:
        try:
            self._run(str(self.bindir / "pg_ctl"), "-D", str(self.data), "-m", "immediate", "-w", "stop")
        finally:
            shutil.rmtree(self.root, ignore_errors=True)

    def new_database(self, name: str) -> str:
        """A database of its own for one test on the session's server; its URL."""
        import psycopg

        with psycopg.connect(self.url, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url.rsplit("/", 1)[0] + f"/{name}"
