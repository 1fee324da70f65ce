"""The load's HTTP client: HTTP/1.1 on kept-alive connections, JSON bodies, and nothing else.

Why not httpx, which users use: the load generator shares the machine's two cores with the server it
measures, and whatever it spends there is taken from the server. ``httpx`` costs about 1.4-1.8 ms of
CPU per request (its request and response models, header normalisation, its transport layers); at one
client that is added to every latency, at eight it takes CPU from the server between two batches. This
client writes one request with one ``send`` and parses the answer's status line, headers and body
(``Content-Length`` or chunked), about a tenth of that. Every system measured gets the same client.

The end-to-end tests keep the real clients (httpx, boto3, openai, webuiapi): this is for load only.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit


class WireError(RuntimeError):
    """The server closed the connection or answered something that is not HTTP/1.1."""


@dataclass
class Answer:
    """A response: status, headers (names lowercased) and the whole body."""

    status_code: int
    headers: dict[str, str] = field(default_factory=dict)
    content: bytes = b""

    @property
    def text(self) -> str:
        return self.content.decode("utf-8", "replace")

    def json(self) -> Any:
        return json.loads(self.content)

    def raise_for_status(self) -> None:
        if self.status_code >= 400:
            raise WireError(f"answered {self.status_code}: {self.text[:500]}")


def _target(url: str) -> tuple[str, int, str]:
    parts = urlsplit(url)
    if parts.scheme != "http" or parts.hostname is None:
        raise ValueError(f"only http:// URLs: {url}")
    path = parts.path or "/"
    return parts.hostname, parts.port or 80, path + (f"?{parts.query}" if parts.query else "")


def request_bytes(host: str, port: int, path: str, body: Any, headers: dict[str, str] | None = None) -> bytes:
    """One POST with a JSON body, head and body in one buffer (one ``send``, one segment on loopback)."""
    data = json.dumps(body).encode()
    lines = [f"POST {path} HTTP/1.1", f"Host: {host}:{port}", "Content-Type: application/json"]
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    lines.append(f"Content-Length: {len(data)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + data


class _Parser:
    """Reads one response at a time out of the bytes a connection received."""

    def __init__(self) -> None:
        self.buffer = bytearray()

    def response(self) -> tuple[Answer, bool] | None:
        """The next complete response and whether the server keeps the connection, or None: more bytes needed."""
        end = self.buffer.find(b"\r\n\r\n")
        if end < 0:
            return None
        head = self.buffer[:end].decode("latin-1").split("\r\n")
        version, _, rest = head[0].partition(" ")
        if not version.startswith("HTTP/1."):
            raise WireError(f"not an HTTP/1.x answer: {head[0]!r}")
        status = int(rest.split(" ", 1)[0])
        headers = {}
        for line in head[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        start = end + 4
        if headers.get("transfer-encoding", "").lower() == "chunked":
            found = self._chunked(start)
            if found is None:
                return None
            content, used = found
        else:
            length = int(headers.get("content-length", "0"))
            if len(self.buffer) < start + length:
                return None
            content, used = bytes(self.buffer[start : start + length]), start + length
        del self.buffer[:used]
        keep = headers.get("connection", "").lower() != "close" and version == "HTTP/1.1"
        return Answer(status, headers, content), keep

    def _chunked(self, at: int) -> tuple[bytes, int] | None:
        chunks: list[bytes] = []
        while True:
            eol = self.buffer.find(b"\r\n", at)
            if eol < 0:
                return None
            size = int(bytes(self.buffer[at:eol]).split(b";", 1)[0], 16)
            if len(self.buffer) < eol + 2 + size + 2:
                return None
            if size == 0:  # no trailers from the servers measured here
                return b"".join(chunks), eol + 4
            chunks.append(bytes(self.buffer[eol + 2 : eol + 2 + size]))
            at = eol + 2 + size + 2


class Wire:
    """A blocking client with one kept-alive connection per host and port (like ``httpx.Client``'s ``post``)."""

    def __init__(self, timeout: float = 300.0):
        self.timeout = timeout
        self._socks: dict[tuple[str, int], tuple[socket.socket, _Parser]] = {}

    def __enter__(self) -> Wire:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        for sock, _ in self._socks.values():
            sock.close()
        self._socks.clear()

    def post(self, url: str, *, json: Any, headers: dict[str, str] | None = None) -> Answer:
        host, port, path = _target(url)
        request = request_bytes(host, port, path, json, headers)
        try:
            return self._exchange(host, port, request)
        except (ConnectionError, WireError):
            # A kept-alive connection the server closed meanwhile: once more, on a new one.
            self._drop(host, port)
            return self._exchange(host, port, request)

    def _exchange(self, host: str, port: int, request: bytes) -> Answer:
        if (host, port) not in self._socks:
            sock = socket.create_connection((host, port), timeout=self.timeout)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._socks[(host, port)] = (sock, _Parser())
        sock, parser = self._socks[(host, port)]
        sock.sendall(request)
        while (got := parser.response()) is None:
            data = sock.recv(1 << 20)
            if not data:
                raise WireError("the server closed the connection")
            parser.buffer += data
        answer, keep = got
        if not keep:
            self._drop(host, port)
        return answer

    def _drop(self, host: str, port: int) -> None:
        entry = self._socks.pop((host, port), None)
        if entry is not None:
            entry[0].close()


class AsyncConnection:
    """One kept-alive connection for one closed-loop client of the event loop: a request at a time."""

    def __init__(self, url: str):
        self.host, self.port, self.path = _target(url)
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._parser = _Parser()

    async def post(self, body: Any, headers: dict[str, str] | None = None) -> Answer:
        """POST ``body`` as JSON to the connection's URL; reconnects when the server closed it."""
        request = request_bytes(self.host, self.port, self.path, body, headers)
        if self._writer is None:
            await self._connect()
        try:
            return await self._exchange(request)
        except (ConnectionError, WireError):
            await self.close()
            await self._connect()
            return await self._exchange(request)

    async def _connect(self) -> None:
        self._reader, self._writer = await asyncio.open_connection(self.host, self.port)
        self._parser = _Parser()

    async def _exchange(self, request: bytes) -> Answer:
        assert self._reader is not None and self._writer is not None
        self._writer.write(request)
        while (got := self._parser.response()) is None:
            data = await self._reader.read(1 << 20)
            if not data:
                raise WireError("the server closed the connection")
            self._parser.buffer += data
        answer, keep = got
        if not keep:
            await self.close()
        return answer

    async def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            with contextlib.suppress(ConnectionError):
                await self._writer.wait_closed()
        self._reader = self._writer = None
