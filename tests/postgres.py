"""A real, throwaway PostgreSQL server for the tests: Debian's binaries, a temporary cluster, a loopback port.

``SDGATE_TEST_POSTGRES_URL`` points the tests at an existing server instead (each test still gets a
database of its own). Without the binaries the tests skip and say why, except under CI (``CI=true``),
where they fail: ``.ci/run`` installs the ``postgresql`` package.

One cluster serves the whole session; :func:`fresh_database` makes an empty database per use, so no
test sees another's rows.
"""

from __future__ import annotations

import atexit
import os
import shutil
import subprocess
import tempfile
import threading
import uuid
from pathlib import Path

import pytest

from tests.server import free_port

_lock = threading.Lock()
_server: Cluster | None = None


def binaries() -> Path | None:
    """The newest ``/usr/lib/postgresql/<version>/bin`` with initdb, or initdb on PATH."""
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"), key=lambda p: int(p.parts[-3]))
    if found:
        return found[-1].parent
    on_path = shutil.which("initdb")
    return Path(on_path).parent if on_path else None


def missing(what: str) -> None:
    """Skip, saying why; under CI fail instead, since CI installs what the tests need."""
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"{what} (CI=true: .ci/run should have installed it)")
    pytest.skip(what)


class Cluster:
    """initdb into a temporary directory, then ``pg_ctl start`` on a free loopback port.

    As root (CI), the server runs as the ``postgres`` user that Debian's package creates: PostgreSQL
    refuses to run as root. ``durable``: PostgreSQL's own default, every commit flushed to disk (the
    benchmark's, bench/job_stores.py); the tests' cluster skips fsync.
    """

    def __init__(self, bin_dir: Path, durable: bool = False):
        self.bin = bin_dir
        self.root = Path(tempfile.mkdtemp(prefix="sdgate-postgres-"))
        self.data = self.root / "data"
        self.port = free_port()
        self.as_user: list[str] = []
        if os.geteuid() == 0:
            runuser = shutil.which("runuser")
            if runuser is None:
                raise RuntimeError("running as root needs runuser to start PostgreSQL as the postgres user")
            shutil.chown(self.root, "postgres")
            self.as_user = [runuser, "-u", "postgres", "--"]
        self._run("initdb", "-D", str(self.data), "-U", "sdgate", "--auth=trust", "-E", "UTF8", "--no-sync")
        options = f"-c listen_addresses=127.0.0.1 -p {self.port} -k {self.root} -c max_connections=200"
        if not durable:
            options += " -c fsync=off"
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.root / "server.log"), "-o", options, "-w", "start")
        self.url = f"postgresql://sdgate@127.0.0.1:{self.port}/postgres"

    def _run(self, tool: str, *args: str) -> None:
        done = subprocess.run([*self.as_user, str(self.bin / tool), *args], capture_output=True, text=True, timeout=120)
        if done.returncode != 0:
            raise RuntimeError(f"{tool} failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")

    def postmaster_pid(self) -> int:
        """The server's main process (its children are the connections' backends)."""
        return int((self.data / "postmaster.pid").read_text().split()[0])

    def stop(self) -> None:
        try:
            self._run("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "stop")
        finally:
            shutil.rmtree(self.root, ignore_errors=True)


def server_url() -> str:
    """The URL of the session's server (started on first use, stopped at exit): its ``postgres`` database."""
    global _server
    existing = os.environ.get("SDGATE_TEST_POSTGRES_URL")
    if existing:
        return existing
    with _lock:
        if _server is None:
            bin_dir = binaries()
            if bin_dir is None:
                missing("PostgreSQL's server binaries (initdb, pg_ctl) are not installed: apt-get install postgresql")
            assert bin_dir is not None
            try:
                import psycopg  # noqa: F401
            except ImportError:
                missing("psycopg is not installed: make test installs it (the postgres extra)")
            _server = Cluster(bin_dir)
            atexit.register(_server.stop)
        return _server.url


def fresh_database() -> str:
    """The URL of a new, empty database on the session's server."""
    return create_database(server_url(), "t_" + uuid.uuid4().hex[:16])


def create_database(server: str, name: str) -> str:
    """Create database ``name`` on the server of URL ``server``; the new database's URL."""
    import psycopg

    with psycopg.connect(server, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    return server.rpartition("/")[0] + "/" + name
