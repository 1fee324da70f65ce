"""Load generation: closed-loop HTTP clients in this process, and latency statistics.

The clients speak through :mod:`bench.wire`, a lean HTTP/1.1 client, so that the load takes as little
as it can of the CPU it shares with the server it measures.

Closed loop: each client sends its next request as soon as the previous one is answered, so a
server is measured at exactly N requests in flight. Throughput follows from Little's law,
``images/s = N * images per request / mean latency``, over the requests started inside the
measurement window. Unlike counting completions in a window, this is not thrown off by batching,
where answers come in bursts of up to eight: a burst just inside or just outside a short window
would move the count by eight images.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from bench.wire import Answer, AsyncConnection, Wire

Body = Callable[[int], dict[str, Any]]
"""Request body for the i-th request of a run (i gives each request its own seed)."""


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0..100), linear between closest ranks; NaN for no values."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


@dataclass
class Latencies:
    """Seconds per request (or per call) of one measured series."""

    values: list[float] = field(default_factory=list)

    @property
    def p50(self) -> float:
        return percentile(self.values, 50)

    @property
    def p95(self) -> float:
        return percentile(self.values, 95)

    @property
    def mean(self) -> float:
        return statistics.fmean(self.values) if self.values else float("nan")

    def extend(self, other: Latencies) -> None:
        self.values.extend(other.values)


@dataclass
class LoadResult:
    """What a closed-loop run measured: the latency of each request started in the window."""

    clients: int
    images_per_request: int
    latencies: Latencies = field(default_factory=Latencies)
    window_s: float = 0.0
    completed_in_window: int = 0
    engine_images: float = 0.0
    """Images and pipeline calls the server reported for the run (sdgate's /metrics), else 0."""
    engine_calls: float = 0.0

    @property
    def mean_batch(self) -> float:
        """Images per pipeline call, as the server reported them; NaN when it did not."""
        return self.engine_images / self.engine_calls if self.engine_calls else float("nan")

    @property
    def images_per_s(self) -> float:
        """Little's law: N in flight / mean time in flight."""
        if not self.latencies.values:
            return 0.0
        return self.clients * self.images_per_request / self.latencies.mean

    def merge(self, other: LoadResult) -> None:
        """Add another window of the same load (interleaved rounds) to this one."""
        self.latencies.extend(other.latencies)
        self.window_s += other.window_s
        self.completed_in_window += other.completed_in_window
        self.engine_images += other.engine_images
        self.engine_calls += other.engine_calls


class LoadError(RuntimeError):
    """A server answered a benchmark request with an error: the numbers would mean nothing."""


def _check(resp: Answer, url: str) -> None:
    if resp.status_code != 200:
        raise LoadError(f"POST {url} answered {resp.status_code}: {resp.text[:500]}")


async def _closed_loop(
    url: str, body: Body, clients: int, warmup_s: float, window_s: float, images_per_request: int
) -> LoadResult:
    result = LoadResult(clients, images_per_request)
    counter = iter(range(10**9))
    begin = time.perf_counter()
    measure_from = begin + warmup_s
    stop = measure_from + window_s

    async def one_client() -> None:
        measured = False
        connection = AsyncConnection(url)  # each client its own kept-alive connection
        try:
            # Until the window closes, and at least one measured request each (a slow server, a short window).
            while (t0 := time.perf_counter()) < stop or not measured:
                resp = await connection.post(body(next(counter)))
                t1 = time.perf_counter()
                _check(resp, url)
                if t0 >= measure_from:
                    result.latencies.values.append(t1 - t0)
                    measured = True
                if measure_from <= t1 < stop:
                    result.completed_in_window += 1
        finally:
            await connection.close()

    await asyncio.gather(*(one_client() for _ in range(clients)))
    result.window_s = window_s
    return result


def closed_loop(
    url: str, body: Body, *, clients: int, warmup_s: float, window_s: float, images_per_request: int = 1
) -> LoadResult:
    """Run ``clients`` closed-loop clients against ``url`` for ``warmup_s + window_s`` seconds."""
    return asyncio.run(_closed_loop(url, body, clients, warmup_s, window_s, images_per_request))


async def _count_loop(url: str, body: Body, clients: int, total: int, start: int) -> int:
    counter = iter(range(start, start + total))
    done = 0

    async def one_client() -> None:
        nonlocal done
        connection = AsyncConnection(url)
        try:
            for i in counter:
                _check(await connection.post(body(i)), url)
                done += 1
        finally:
            await connection.close()

    await asyncio.gather(*(one_client() for _ in range(clients)))
    return done


def requests_total(url: str, body: Body, *, clients: int, total: int, start: int = 0) -> int:
    """Send exactly ``total`` requests (bodies ``start``, ``start + 1``, ...) from ``clients`` closed-loop clients."""
    return asyncio.run(_count_loop(url, body, clients, total, start))


def sequential(
    client: Wire, url: str, body: Body, n: int, start: int = 0, answers: list[Any] | None = None
) -> Latencies:
    """``n`` requests one after another on one kept-alive connection; their latencies.

    With ``answers``, each JSON answer is appended to it.
    """
    out = Latencies()
    for i in range(start, start + n):
        t0 = time.perf_counter()
        resp = client.post(url, json=body(i))
        out.values.append(time.perf_counter() - t0)
        _check(resp, url)
        if answers is not None:
            answers.append(resp.json())
    return out
