"""How big is one image on the wire: JumpStart's RGB lists against base64 JPEG.

Starts a real ``sdgate serve`` (the built-in tiny model unless ``--model`` says otherwise), asks its
``/invocations`` for the same 768x768 image (same seed) with ``Accept: application/json`` and with
``Accept: application/json;jpeg``, and prints the size of each response body.

    python bench/payload_sizes.py [--size 768] [--steps 1] [--model tiny]

The tiny model's images are noise-like, which JPEG compresses worst: a real Stable Diffusion image
of the same size gives a much smaller JPEG, while the RGB form's size hardly depends on content.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _start(data_dir: Path, model: str) -> tuple[subprocess.Popen[bytes], str]:
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("SDGATE_")}
    env.update(SDGATE_DATA_DIR=str(data_dir), SDGATE_HOST="127.0.0.1", SDGATE_PORT=str(port), SDGATE_MODEL=model)
    log = open(data_dir / "server.log", "wb")  # noqa: SIM115 - lives as long as the server
    proc = subprocess.Popen([sys.executable, "-m", "sdgate.cli", "serve"], env=env, stdout=log, stderr=log)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"sdgate exited:\n{(data_dir / 'server.log').read_text()}")
        try:
            if httpx.get(f"{url}/ping", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    proc.terminate()
    raise SystemExit("sdgate did not become ready")


def _kb(n: int) -> str:
    return f"{n:>12,} B  {n / 1024:>9,.1f} KiB"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--size", type=int, default=768, help="Width and height (default 768).")
    parser.add_argument("--steps", type=int, default=1, help="Denoising steps (default 1: the size is the point).")
    parser.add_argument("--model", default="tiny", help="Model to serve (default: the built-in tiny model).")
    args = parser.parse_args()

    payload = {"prompt": "astronaut on a horse", "width": args.size, "height": args.size}
    payload |= {"num_inference_steps": args.steps, "seed": 1}
    with tempfile.TemporaryDirectory() as tmp:
        proc, url = _start(Path(tmp), args.model)
        try:
            sizes = {}
            for accept in ("application/json", "application/json;jpeg"):
                resp = httpx.post(
                    f"{url}/invocations", json=payload, headers={"Accept": accept}, timeout=600
                ).raise_for_status()
                sizes[accept] = resp.content
        finally:
            proc.terminate()
            proc.wait(60)

    rgb, jpeg = sizes["application/json"], sizes["application/json;jpeg"]
    jpeg_bytes = base64.b64decode(json.loads(jpeg)["generated_images"][0])
    print(f"{args.size}x{args.size} image, model {args.model}, {args.steps} step(s), seed 1")
    print(f"  Accept: application/json       (RGB lists)   {_kb(len(rgb))}")
    print(f"  Accept: application/json;jpeg  (base64 JPEG) {_kb(len(jpeg))}")
    print(f"  the JPEG itself, as stored                   {_kb(len(jpeg_bytes))}")
    print(f"  RGB lists / base64 JPEG: {len(rgb) / len(jpeg):.1f}x")


if __name__ == "__main__":
    main()
