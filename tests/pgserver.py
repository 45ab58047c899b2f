"""A throw-away PostgreSQL server of a test's own (Debian's postgresql binaries, which .ci/run
installs): for tests that stop and restart the server, or need one when $TTL_SEARCH_TEST_POSTGRES
is not set, and for benchmarks/reliability.py. Tests skip locally when the binaries are absent
(:func:`server_or_skip`); under CI that is a failure."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

import pytest


class ServerUnavailable(RuntimeError):
    """No PostgreSQL server can be started here; the message says why."""


def skip_or_fail(reason: str) -> None:
    """Skip locally; under CI a missing service is a failure (CI must run these tests)."""
    if os.environ.get("CI"):
        pytest.fail(f"CI must run this test, but {reason}")
    pytest.skip(reason)


def _bindir() -> Path | None:
    dirs = sorted(Path("/usr/lib/postgresql").glob("*/bin"),
                  key=lambda p: [int(x) for x in p.parent.name.split(".") if x.isdigit()])
    return dirs[-1] if dirs else None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PostgresServer:
    """A server on 127.0.0.1 with one database; :meth:`stop` and :meth:`start` make an outage."""

    def __init__(self, database: str = "ttl") -> None:
        bindir = _bindir()
        if bindir is None or not (bindir / "initdb").is_file():
            raise ServerUnavailable("the PostgreSQL server binaries are absent "
                                    "(apt-get install postgresql, or run .ci/run)")
        self.bin = bindir
        self.as_postgres: list[str] = []
        if os.geteuid() == 0:  # initdb refuses root
            if not shutil.which("runuser"):
                raise ServerUnavailable("running as root without runuser: cannot start PostgreSQL as the postgres user")
            self.as_postgres = ["runuser", "-u", "postgres", "--"]
        self.dir = Path(tempfile.mkdtemp(prefix="ttl-test-pg-"))
        if self.as_postgres:
            shutil.chown(self.dir, "postgres", "postgres")
        self.port = free_port()
        self.running = False
        self._run("initdb", "-D", str(self.dir / "db"), "-A", "trust", "-U", "postgres")
        self.start()
        self._run("createdb", "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres", database)
        self.url = f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/{database}"

    def _run(self, tool: str, *args: str) -> None:
        subprocess.run([*self.as_postgres, str(self.bin / tool), *args], check=True, capture_output=True, cwd="/")

    def start(self) -> None:
        self._run("pg_ctl", "-D", str(self.dir / "db"), "-l", str(self.dir / "server.log"), "-w",
                  "-o", f"-h 127.0.0.1 -p {self.port} -k {self.dir}", "start")
        self.running = True

    def stop(self) -> None:
        """``pg_ctl stop -m fast``: clients lose their connections at once."""
        self._run("pg_ctl", "-D", str(self.dir / "db"), "-m", "fast", "stop")
        self.running = False

    def close(self) -> None:
        if self.running:
            try:
                self.stop()
            except subprocess.CalledProcessError:
                pass
        shutil.rmtree(self.dir, ignore_errors=True)


def server_or_skip(database: str = "ttl") -> PostgresServer:
    """A started server, or the test skips (fails under CI) saying why there is none."""
    try:
        return PostgresServer(database)
    except ServerUnavailable as e:
        skip_or_fail(str(e))
        raise
