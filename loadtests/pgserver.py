"""A throwaway PostgreSQL server for tests and benchmarks: initdb into a temporary directory, on a free loopback port.

PostgreSQL refuses to run as root; when the tests do, the server runs as `nobody` (its directory is
handed to that user). `.ci/run` installs the server from Debian's packages; without it the tests
that need one are skipped, unless ATTRIBUTION_REQUIRE_SYSTEM=1 (as CI sets) makes that a failure.
"""
from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import uuid

USER = "attribution"


def binary(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    candidates = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    return candidates[-1] if candidates else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PostgresServer:
    """One server for a test session; `database()` makes a fresh, empty database per test."""

    def __init__(self, durable: bool = False) -> None:
        """durable: fsync as a production server does (benchmarks); off, tests run faster."""
        self.initdb, self.pg_ctl = binary("initdb"), binary("pg_ctl")
        if not (self.initdb and self.pg_ctl):
            raise FileNotFoundError("PostgreSQL's initdb/pg_ctl are not installed (apt-get install postgresql)")
        self.root = tempfile.mkdtemp(prefix="attribution-pg-")
        self.data = os.path.join(self.root, "data")
        self.port = _free_port()
        self._as_root = os.geteuid() == 0
        if self._as_root:
            nobody = pwd.getpwnam("nobody")
            os.chown(self.root, nobody.pw_uid, nobody.pw_gid)
        self._run([self.initdb, "-D", self.data, "-U", USER, "--auth=trust", "-E", "UTF8", "--no-sync",
                   "--no-instructions"])
        options = (f"-c listen_addresses=127.0.0.1 -c port={self.port} -c unix_socket_directories={self.root} "
                   f"-c fsync={'on' if durable else 'off'} -c max_connections=200")
        self._run([self.pg_ctl, "-D", self.data, "-l", os.path.join(self.root, "server.log"), "-w", "-t", "60",
                   "-o", options, "start"])
        self.url = f"postgresql://{USER}@127.0.0.1:{self.port}/postgres"

    def _run(self, argv: list[str]) -> None:
        if self._as_root:
            argv = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", "--", *argv]
        done = subprocess.run(argv, capture_output=True, text=True, timeout=120, cwd=self.root)
        if done.returncode != 0:
            log = os.path.join(self.root, "server.log")
            tail = open(log).read()[-2000:] if os.path.exists(log) else ""
            raise RuntimeError(f"{argv[-1]} failed ({done.returncode}): {done.stderr.strip()} {tail}")

    def database(self) -> str:
        """A new empty database's URL."""
        import psycopg

        name = f"t_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(self.url, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return f"postgresql://{USER}@127.0.0.1:{self.port}/{name}"

    def drop(self, url: str) -> None:
        import psycopg

        name = url.rsplit("/", 1)[1]
        with psycopg.connect(self.url, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    def stop(self) -> None:
        try:
            self._run([self.pg_ctl, "-D", self.data, "-m", "immediate", "-w", "-t", "60", "stop"])
        finally:
            shutil.rmtree(self.root, ignore_errors=True)
