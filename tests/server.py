"""Start real sdgate processes on loopback ports for end-to-end tests."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from tests import background


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@dataclass
class ServerProcess:
    url: str
    port: int
    proc: subprocess.Popen[bytes]
    data_dir: Path
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        return self.proc.returncode

    def kill(self) -> None:
        """kill -9: no cleanup, as in a crash."""
        self.stop(signal.SIGKILL)


def start_server(
    data_dir: Path,
    *args: str,
    env: dict[str, str] | None = None,
    ready: bool = True,
    timeout: float = 120,
    python: str = sys.executable,
    model: str | None = "tiny",
) -> ServerProcess:
    """Run ``sdgate serve`` on a free loopback port and wait for /readyz (or /healthz when ``ready`` is False).

    The model is ``model`` — the random-weight ``tiny``, the fastest, unless a test asks for another;
    None leaves sdgate's own default — or what ``env`` (``SDGATE_MODEL``) or ``args`` (``--model``) say.

    ``python`` is the interpreter to run it with (another virtual environment's, say).
    """
    port = free_port()
    data_dir.mkdir(parents=True, exist_ok=True)
    log_path = data_dir / f"server-{port}.log"
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("SDGATE_")}
    full_env.update({"SDGATE_DATA_DIR": str(data_dir), "SDGATE_HOST": "127.0.0.1", "SDGATE_PORT": str(port)})
    if model is not None:
        full_env["SDGATE_MODEL"] = model
    # The suite runs several servers and test processes on two cores at once: one thread each keeps
    # OpenMP's spinning threads from taking the CPU from each other (see README, "How it works").
    full_env["SDGATE_TORCH_THREADS"] = "1"
    full_env.update(env or {})
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [python, "-m", "sdgate.cli", "serve", *args], env=full_env, stdout=log, stderr=subprocess.STDOUT
        )
    server = ServerProcess(f"http://127.0.0.1:{port}", port, proc, data_dir, log_path)
    path = "/readyz" if ready else "/healthz"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"sdgate exited with {proc.returncode}:\n{server.log()}")
        try:
            if httpx.get(server.url + path, timeout=2).status_code == 200:
                return server
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    server.stop()
    raise RuntimeError(f"sdgate did not become ready in {timeout}s:\n{server.log()}")


def build_tiny_model(target: Path, seed: int = 0) -> Path:
    """Build the built-in tiny architecture with weights from ``seed`` into ``target``, in a process of its own.

    Not in this one: a resource made in the background would import torch and diffusers in a thread,
    and imports in a thread race the test's own (``dictionary changed size during iteration``).
    """
    code = "import sys; from pathlib import Path; from sdgate.engine.builtin import build_tiny; "
    code += "build_tiny(Path(sys.argv[1]), seed=int(sys.argv[2]))"
    subprocess.run([sys.executable, "-c", code, str(target), str(seed)], check=True, capture_output=True, timeout=300)
    return target


def _build_tiny_data() -> Path:
    code = "import sys; from pathlib import Path; from sdgate.engine.builtin import ensure_builtin; "
    code += "ensure_builtin('tiny', Path(sys.argv[1]))"
    root = background.workdir("tiny-data")
    subprocess.run([sys.executable, "-c", code, str(root / "models")], check=True, capture_output=True, timeout=300)
    return root


def tiny_data() -> Path:
    """A data directory whose ``models/`` holds the built-in tiny model, built once per session.

    Servers and in-process engines only read models: they may share it (symlink its ``models/``).
    """
    path: Path = background.get("tiny-data", _build_tiny_data)
    return path


def tiny_model_dir() -> Path:
    """The saved diffusers directory of the session's built tiny model (read-only: copy it to change it)."""
    [built] = [p for p in (tiny_data() / "models").iterdir() if p.name.startswith("tiny-")]
    return built


def with_tiny_models(data_dir: Path) -> Path:
    """``data_dir``, created, its ``models/`` the session's built tiny model."""
    data_dir.mkdir(parents=True, exist_ok=True)
    (data_dir / "models").symlink_to(tiny_data() / "models")
    return data_dir
