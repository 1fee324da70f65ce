"""Servers under test: started as child processes on free loopback ports, stopped afterwards.

Each server gets its own process group, so that stopping it also stops the processes it started
(LitServe runs its API server and inference worker as separate processes).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

MODEL = "tiny"
ROOT = Path(__file__).resolve().parent.parent
_PAGE = os.sysconf("SC_PAGE_SIZE")
_TICKS = os.sysconf("SC_CLK_TCK")
_PR_SET_PDEATHSIG = 1


def proc_stat(path: Path) -> list[str]:
    """The fields of a ``/proc/<pid>/stat`` (or ``task/<tid>/stat``) file after the command name.

    Index 1 is the parent's pid, 2 the process group, 11 and 12 user and system time in clock ticks
    (``proc(5)``'s fields 4, 5, 14 and 15). Raises ``OSError`` when the process is gone.
    """
    return path.read_text().rsplit(")", 1)[1].split()


def cpu_seconds_of(fields: list[str]) -> float:
    """User + system CPU seconds from the fields :func:`proc_stat` read."""
    return (int(fields[11]) + int(fields[12])) / _TICKS


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def tiny_model_dir(models_dir: Path) -> Path:
    """Build the built-in ``tiny`` pipeline once under ``models_dir``; every server loads that copy."""
    from sdgate.engine.builtin import ensure_builtin

    model_dir: Path = ensure_builtin(MODEL, models_dir)
    return model_dir


SWITCH_MODELS = ("a", "b")
"""The names the switching scenario's servers offer their two models under (``a``, the default: the tiny one)."""
SWITCH_LORAS = ("x", "y")
"""The two LoRAs (for the tiny model's architecture) the switching scenario alternates between."""


@dataclass(frozen=True)
class SwitchAssets:
    """What the switching scenario's servers offer besides the tiny model: a second model and LoRA files."""

    other_model: Path
    """The tiny model's architecture and configs with other random weights (seed 1)."""
    lora_dir: Path
    """``SDGATE_LORA_DIR``: one file per name of :data:`SWITCH_LORAS`, rank 4, on the UNet's attention."""

    @property
    def models_env(self) -> str:
        """``SDGATE_MODELS`` for them: the tiny model, then the other one."""
        a, b = SWITCH_MODELS
        return f"{a}={MODEL},{b}={self.other_model}"

    def lora_path(self, name: str) -> Path:
        return self.lora_dir / f"{name}.safetensors"


_BUILD_SWITCH_ASSETS = """
import sys
from pathlib import Path
from sdgate.engine.builtin import build_tiny
from tests.loras import make_lora
model, other, loras = (Path(a) for a in sys.argv[1:4])
build_tiny(other, seed=1)
for seed, name in enumerate(sys.argv[4:], 1):
    make_lora(model, loras / f"{name}.safetensors", seed=seed)
"""


def switch_assets(model_dir: Path, work: Path) -> SwitchAssets:
    """Build the second model and the LoRA files under ``work``, in a process of its own (a few seconds).

    The LoRAs are made by ``tests/loras.py`` from the tiny model itself: nothing is downloaded.
    """
    assets = SwitchAssets(work / "tiny-seed1", work / "loras")
    argv = [sys.executable, "-c", _BUILD_SWITCH_ASSETS, str(model_dir), str(assets.other_model), str(assets.lora_dir)]
    proc = subprocess.run([*argv, *SWITCH_LORAS], cwd=ROOT, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        raise RuntimeError(f"building the second model and the LoRAs failed:\n{proc.stderr[-4000:]}")
    return assets


@dataclass
class Server:
    """One server process: its name, base URL, the route it generates on, and its log."""

    name: str
    url: str
    proc: subprocess.Popen[bytes]
    log_path: Path
    generate_path: str
    ready_path: str
    tmp: tempfile.TemporaryDirectory[str] | None = field(default=None, repr=False)

    @property
    def generate_url(self) -> str:
        return self.url + self.generate_path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_ready(self, timeout: float = 300) -> None:
        """Until its readiness route answers 200 (model loaded, warmed up where the server does that)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self.stop()
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}:\n{self.log()[-4000:]}")
            try:
                if httpx.get(self.url + self.ready_path, timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        tail = self.log()[-4000:]
        self.stop()
        raise RuntimeError(f"{self.name} was not ready in {timeout:.0f} s:\n{tail}")

    def rss_bytes(self) -> int:
        """Resident memory of the server's main process."""
        fields = Path(f"/proc/{self.proc.pid}/statm").read_text().split()
        return int(fields[1]) * _PAGE

    def cpu_seconds(self) -> float:
        """User + system CPU time of the server's main process so far."""
        return cpu_seconds_of(proc_stat(Path(f"/proc/{self.proc.pid}/stat")))

    def pause(self) -> None:
        """SIGSTOP its process group: a paused server takes no CPU from the one being measured."""
        self._signal_group(signal.SIGSTOP)

    def resume(self) -> None:
        self._signal_group(signal.SIGCONT)

    def _signal_group(self, sig: int) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.proc.pid, sig)

    def stop(self, timeout: float = 30) -> None:
        """SIGTERM to the server's process group, SIGKILL if it lingers."""
        if self.proc.poll() is None:
            self.resume()
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
            except ProcessLookupError:
                pass
        with contextlib.suppress(ProcessLookupError, PermissionError):  # children that outlived their parent
            os.killpg(self.proc.pid, signal.SIGKILL)
        if self.tmp is not None:
            self.tmp.cleanup()
            self.tmp = None


class Fleet:
    """Servers started together (their models load in parallel) and stopped together."""

    def __init__(self) -> None:
        self.servers: list[Server] = []

    def __enter__(self) -> Fleet:
        return self

    def __exit__(self, *exc: object) -> None:
        for server in self.servers:
            server.stop()

    def add(self, server: Server) -> Server:
        self.servers.append(server)
        return server

    def wait_ready(self) -> None:
        for server in self.servers:
            server.resume()
            server.wait_ready()

    def cpu_seconds(self) -> float:
        """CPU time of every process of every server so far (LitServe's workers included)."""
        groups = {server.proc.pid for server in self.servers}
        total = 0.0
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                fields = proc_stat(entry / "stat")
            except OSError:
                continue  # gone meanwhile
            if int(fields[2]) in groups:
                total += cpu_seconds_of(fields)
        return total

    def focus(self, chosen: Server | None) -> None:
        """Let only ``chosen`` run (None: no server, while the pipeline runs in process); pause the others.

        An idle server is not always idle: LitServe's loops poll and take about a fifth of a core.
        """
        for server in self.servers:
            if server is not chosen:
                server.pause()
        if chosen is not None:
            chosen.resume()


def _die_with_parent() -> None:
    """In the child before exec: SIGKILL when the benchmark process dies, however it dies (Linux only)."""
    with contextlib.suppress(Exception):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def _spawn(
    name: str,
    argv: list[str],
    env: dict[str, str],
    port: int,
    log_dir: Path,
    *,
    generate_path: str,
    ready_path: str,
    tmp: tempfile.TemporaryDirectory[str] | None = None,
) -> Server:
    log_path = log_dir / f"{name}-{port}.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(argv, env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    return Server(name, f"http://127.0.0.1:{port}", proc, log_path, generate_path, ready_path, tmp)


# The environment the run started with, which every server gets: not what this process sets for itself
# later (importing sdgate's model loader sets logging variables such as TRANSFORMERS_VERBOSITY).
_ENV_AT_START = dict(os.environ)


def _base_env() -> dict[str, str]:
    # None of the caller's SDGATE_* settings leak in: every server runs on the documented defaults
    # plus what the scenario sets.
    return {k: v for k, v in _ENV_AT_START.items() if not k.startswith("SDGATE_")}


def sdgate(
    models_dir: Path,
    log_dir: Path,
    *,
    max_batch_size: int = 8,
    name: str = "sdgate",
    extra: dict[str, str] | None = None,
    module: str = "sdgate.cli",
) -> Server:
    """Launch ``sdgate serve`` with the tiny model, a fresh data directory, and a queue with room for any load.

    ``module``: what ``python -m`` runs with ``serve`` (``bench.instant_engine``: the same server on a pipeline
    that costs nothing).
    """
    tmp = tempfile.TemporaryDirectory(prefix="sdgate-bench-")
    data_dir = Path(tmp.name)
    # The prebuilt tiny model is shared; everything else (jobs, images, keys) is fresh.
    (data_dir / "models").symlink_to(models_dir.resolve(), target_is_directory=True)
    port = free_port()
    env = _base_env() | {
        "SDGATE_MODEL": MODEL,
        "SDGATE_HOST": "127.0.0.1",
        "SDGATE_PORT": str(port),
        "SDGATE_DATA_DIR": str(data_dir),
        "SDGATE_DEVICE": "cpu",
        "SDGATE_MAX_BATCH_SIZE": str(max_batch_size),
        "SDGATE_QUEUE_SIZE": "10000",
        # A sync request answers 202 (job still running) after this long; on a machine slowed down by
        # other work the load must still get its images.
        "SDGATE_SYNC_TIMEOUT": "600",
    }
    env |= extra or {}
    argv = [sys.executable, "-m", module, "serve"]
    return _spawn(name, argv, env, port, log_dir, generate_path="/v1/generations", ready_path="/readyz", tmp=tmp)


def plain(model_dir: Path, log_dir: Path) -> Server:
    """Launch the tutorial pattern: a FastAPI route calling the pipeline under a lock (:mod:`bench.peers.plain`)."""
    port = free_port()
    argv = [sys.executable, "-m", "bench.peers.plain", "--model", str(model_dir), "--port", str(port)]
    return _spawn("plain", argv, _base_env(), port, log_dir, generate_path="/generate", ready_path="/health")


def litserve(model_dir: Path, log_dir: Path) -> Server:
    """Launch LitServe with batching (:mod:`bench.peers.litserve_server`)."""
    port = free_port()
    argv = [sys.executable, "-m", "bench.peers.litserve_server", "--model", str(model_dir), "--port", str(port)]
    return _spawn("litserve", argv, _base_env(), port, log_dir, generate_path="/predict", ready_path="/health")
