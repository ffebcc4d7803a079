"""A real PostgreSQL server for tests, from Debian's packages (``postgresql``), in a temporary folder.

As root (CI machines) the server runs as the ``postgres`` system user, which initdb requires.
"""

from __future__ import annotations

import glob
import importlib.util
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from orthanc_fixture import free_port


def _bin(name: str) -> str | None:
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    return found[-1] if found else shutil.which(name)


def postgres_missing() -> str | None:
    if not _bin("initdb") or not _bin("pg_ctl"):
        return "PostgreSQL server (Debian postgresql) is not installed"
    if importlib.util.find_spec("psycopg") is None:
        return "psycopg (PyPI) is not installed"
    return None


class Postgres:
    """``initdb`` + ``pg_ctl start`` on a free port; ``database()`` gives a fresh, empty database."""

    def __init__(self, fsync: bool = False) -> None:
        self.fsync = fsync  # off for tests (speed); on for benchmarks (what production runs)
        self.dir = Path(tempfile.mkdtemp(prefix="pacs-pg-"))
        self.port = free_port()
        self.url = f"postgresql://pacs@127.0.0.1:{self.port}/postgres"
        self._n = 0

    def _run(self, *args: str) -> None:
        cmd = list(args)
        if os.geteuid() == 0:  # initdb refuses root
            cmd = ["runuser", "-u", "postgres", "--", *cmd]
        subprocess.run(cmd, check=True, capture_output=True, timeout=120)

    def start(self) -> None:
        if os.geteuid() == 0:
            shutil.chown(self.dir, "postgres", "postgres")
        self._run(_bin("initdb"), "-D", str(self.dir / "data"), "-A", "trust", "-U", "pacs", "--no-sync")
        self._start()

    def resume(self) -> None:
        """Start the server again after :meth:`stop`."""
        self._start()

    def _start(self) -> None:
        # the log to a file: a server writing to our pipe would keep subprocess.run waiting
        options = f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1 -c fsync={'on' if self.fsync else 'off'}"
        data, log = str(self.dir / "data"), str(self.dir / "log")
        self._run(_bin("pg_ctl"), "-D", data, "-o", options, "-l", log, "-w", "start")

    def stop(self, mode: str = "fast") -> None:
        self._run(_bin("pg_ctl"), "-D", str(self.dir / "data"), "-m", mode, "-w", "stop")

    def restart(self) -> None:
        self.stop()
        self._start()

    def database(self) -> str:
        import psycopg

        self._n += 1
        name = f"queue_{self._n}"
        with psycopg.connect(self.url, autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {name}")
        return self.url.rsplit("/", 1)[0] + f"/{name}"

    def remove(self) -> None:
        try:
            self.stop("immediate")
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)
