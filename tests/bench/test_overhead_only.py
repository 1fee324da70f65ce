"""``bench.overhead_only`` measures the real server with a pipeline that costs nothing.

What is checked: the instant engine answers like sdgate (a stored JPEG of the asked size at the URL it
gives, its batches counted in /metrics), and a turn of load gives requests/s and CPU per request for
the loop, the other threads and the client. Its numbers mean nothing here.
"""

from __future__ import annotations

import io
from pathlib import Path

import httpx
import pytest
from PIL import Image

from bench import servers
from bench.context import engine_counters
from bench.overhead_only import Turns, start_server, turn
from bench.pipeline import Shape


@pytest.mark.slow
def test_the_instant_engine_serves_stored_images_and_a_turn_measures_it(tmp_path: Path) -> None:
    models = servers.tiny_model_dir(tmp_path / "models").parent
    server = start_server(models, tmp_path, "instant", None, instant=True)
    try:
        server.wait_ready()
        shape = Shape(128, 64)
        answer = httpx.post(server.generate_url, json=shape.body(0), timeout=60)
        assert answer.status_code == 200, answer.text
        [image] = answer.json()["images"]
        picture = Image.open(io.BytesIO(httpx.get(image["url"], timeout=10).content))
        assert (picture.format, picture.size) == ("JPEG", (128, 64))

        turns = Turns()
        turn(server, Shape(64, 64), clients=4, window_s=1.0, into=turns)
        [rate], [(loop, threads, client)] = turns.rate, turns.cpu
        assert rate > 0
        assert loop > 0 and threads > 0 and client > 0  # every part of a request costs some CPU
        server.resume()  # a turn leaves its server paused, for the next one's turn
        images, calls = engine_counters(server)  # the engine's own thread and batching ran them
        assert images >= 2 and 1 <= calls <= images
    finally:
        server.stop()
