"""A Ray cluster of the test process's own on this machine: a temp dir, a token, and nothing left behind.

The test process is the cluster's head (``ray.init``): servers join it by its address. Its token lives in the
environment, not in ``~/.ray``; its sessions, sockets and logs live under a temp dir of its own, removed at the
end; and every process started under that dir (raylet, GCS, workers, replicas) is gone when it stops.

Import this module before ``ray``: Ray reads its authentication settings once, when it is imported, so the
token goes into the environment here, at import (it stays there for the session: processes the tests start
inherit it, and only Ray reads it).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

RAY_ENV = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(16)}
"""What a process needs in its environment to join the cluster (its token)."""
os.environ.update(RAY_ENV)


@dataclass
class LocalCluster:
    address: str
    """The GCS address: ``SDGATE_RAY_ADDRESS`` for servers that join it."""
    temp_dir: Path

    def pids(self) -> list[int]:
        """The processes of this cluster still alive (their command lines name its temp dir)."""
        return _pids_mentioning(str(self.temp_dir))

    def logs(self, pattern: str = "*.err") -> str:
        """Its processes' log files matching ``pattern``, concatenated (for failure messages)."""
        paths = sorted(self.temp_dir.glob(f"session_*/logs/{pattern}"))
        return "\n".join(f"== {p.name}\n{p.read_text(errors='replace')[-4000:]}" for p in paths)


@contextlib.contextmanager
def local_cluster(num_cpus: int) -> Iterator[LocalCluster]:
    """Start a one-node cluster with ``num_cpus`` CPUs; stop it, kill what outlived it, remove its dir."""
    import ray

    # Short: Ray puts Unix sockets under it (at most 107 characters to a socket's path).
    temp_dir = Path(tempfile.mkdtemp(prefix="sdray-", dir="/tmp"))
    try:
        ray.init(
            num_cpus=num_cpus,
            _temp_dir=str(temp_dir),
            namespace=f"sdgate-test-{temp_dir.name}",
            include_dashboard=False,
            log_to_driver=False,
        )
        yield LocalCluster(ray.get_runtime_context().gcs_address, temp_dir)
    finally:
        with contextlib.suppress(Exception):
            ray.shutdown()
        _reap(str(temp_dir))
        shutil.rmtree(temp_dir, ignore_errors=True)


def _reap(marker: str, grace_s: float = 10.0) -> None:
    """Wait for the cluster's processes to exit after ``ray.shutdown``; SIGKILL those that do not."""
    deadline = time.monotonic() + grace_s
    while (left := _pids_mentioning(marker)) and time.monotonic() < deadline:
        time.sleep(0.2)
    for pid in left:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def _pids_mentioning(marker: str) -> list[int]:
    """Processes (other than this one) whose command line contains ``marker``, and all their descendants.

    Descendants too: Ray renames its workers (``ray::ServeReplica:...``), so only their raylet names the dir.
    """
    parents: dict[int, int] = {}
    named = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        pid = int(entry.name)
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        parents[pid] = int(stat.rsplit(")", 1)[1].split()[1])  # the field after the state: the parent's pid
        if marker in cmdline:
            named.add(pid)
    found = set(named)
    grew = True
    while grew:
        children = {pid for pid, parent in parents.items() if parent in found} - found
        found |= children
        grew = bool(children)
    return sorted(found)
