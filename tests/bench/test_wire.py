"""The load's lean HTTP client against a real HTTP/1.1 server on a loopback port."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from bench.load import closed_loop
from bench.wire import AsyncConnection, Wire


class _Echo(BaseHTTPRequestHandler):
    """Answers a POST with its JSON body and the client's port; the path picks how the answer is framed."""

    protocol_version = "HTTP/1.1"
    seen_ports: list[int] = []

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.seen_ports.append(self.client_address[1])
        data = json.dumps({"got": body, "port": self.client_address[1], "accept": self.headers.get("Accept")}).encode()
        status = 500 if self.path == "/fail" else 200
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        if self.path == "/chunked":
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            half = len(data) // 2
            for part in (data[:half], data[half:]):
                self.wfile.write(f"{len(part):x}\r\n".encode() + part + b"\r\n")
            self.wfile.write(b"0\r\n\r\n")
            return
        self.send_header("Content-Length", str(len(data)))
        if self.path == "/close":
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def echo() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Echo)
    server.daemon_threads = True
    _Echo.seen_ports = []
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_requests_share_one_kept_alive_connection_and_bodies_round_trip(echo: str) -> None:
    with Wire() as wire:
        first = wire.post(echo + "/x", json={"seed": 1, "prompt": "é"}, headers={"Accept": "image/png"})
        second = wire.post(echo + "/x", json={"seed": 2})
    assert first.status_code == 200 and first.headers["content-type"] == "application/json"
    assert first.json()["got"] == {"seed": 1, "prompt": "é"}
    assert first.json()["accept"] == "image/png"
    assert second.json()["got"] == {"seed": 2}
    assert first.json()["port"] == second.json()["port"]  # the same connection


def test_chunked_answers_are_joined_and_a_closed_connection_is_opened_again(echo: str) -> None:
    with Wire() as wire:
        chunked = wire.post(echo + "/chunked", json={"n": 1})
        closing = wire.post(echo + "/close", json={"n": 2})
        after = wire.post(echo + "/x", json={"n": 3})
    assert chunked.json()["got"] == {"n": 1}
    assert closing.json()["got"] == {"n": 2}
    assert after.json()["got"] == {"n": 3}
    assert after.json()["port"] != closing.json()["port"]  # the server closed it: a new connection


def test_an_error_status_is_reported_not_hidden(echo: str) -> None:
    with Wire() as wire:
        answer = wire.post(echo + "/fail", json={})
    assert answer.status_code == 500
    with pytest.raises(RuntimeError, match="500"):
        answer.raise_for_status()


def test_the_async_connection_and_the_closed_loop_over_it(echo: str) -> None:
    async def two() -> list[dict[str, Any]]:
        connection = AsyncConnection(echo + "/chunked")
        try:
            return [(await connection.post({"i": i})).json() for i in range(2)]
        finally:
            await connection.close()

    answers = asyncio.run(two())
    assert [a["got"] for a in answers] == [{"i": 0}, {"i": 1}]
    assert answers[0]["port"] == answers[1]["port"]

    _Echo.seen_ports = []
    result = closed_loop(echo + "/x", lambda i: {"i": i}, clients=3, warmup_s=0, window_s=0.3)
    assert len(result.latencies.values) >= 3 and result.images_per_s > 0
    assert len(set(_Echo.seen_ports)) == 3  # each client kept its own connection
