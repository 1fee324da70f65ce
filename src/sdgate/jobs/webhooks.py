"""Webhooks: signed POSTs of a finished job, retried with backoff, only to allowed targets.

Signature: ``X-Sdgate-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256 of "<t>.<body>">`` with
``SDGATE_WEBHOOK_SECRET``. A receiver recomputes the HMAC over the raw body and compares in
constant time, and rejects old timestamps to stop replays (see :func:`verify`).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import ipaddress
import logging
import socket
import time
from urllib.parse import urlsplit

import httpx

from sdgate.schemas import WebhookAttempt

log = logging.getLogger("sdgate.webhooks")

SIGNATURE_HEADER = "X-Sdgate-Signature"


class WebhookNotAllowed(ValueError):
    """The target is not on the allow-list (or resolves to a private address)."""


def sign(body: bytes, secret: str, timestamp: int | None = None) -> str:
    ts = int(time.time()) if timestamp is None else timestamp
    mac = hmac.new(secret.encode(), f"{ts}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={ts},v1={mac}"


def verify(body: bytes, header: str, secret: str, tolerance_s: int = 300) -> bool:
    """What a receiver runs: True when ``header`` signs ``body`` with ``secret`` and is recent."""
    try:
        parts = dict(p.split("=", 1) for p in header.split(","))
        ts = int(parts["t"])
    except (ValueError, KeyError):
        return False
    if abs(time.time() - ts) > tolerance_s:
        return False
    expected = hmac.new(secret.encode(), f"{ts}.".encode() + body, hashlib.sha256).hexdigest()
    return hmac.compare_digest(expected, parts.get("v1", ""))


def _parse_allow(allow: str) -> tuple[list[ipaddress.IPv4Network | ipaddress.IPv6Network], set[str], bool]:
    nets, hosts, everything = [], set(), False
    for item in (s.strip() for s in allow.split(",")):
        if not item:
            continue
        if item == "*":
            everything = True
            continue
        try:
            nets.append(ipaddress.ip_network(item, strict=False))
        except ValueError:
            hosts.add(item.lower())
    return nets, hosts, everything


def check_url(url: str, allow: str, resolve: bool = True) -> None:
    """Raise :class:`WebhookNotAllowed` unless ``url`` may receive webhooks.

    By default only public addresses are allowed: loopback, private, link-local (cloud metadata)
    and reserved ranges are refused unless the allow-list names them. Names are resolved and every
    address is checked, so a public name that points inside is refused too.
    """
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise WebhookNotAllowed(f"webhook_url must be an http(s) URL, got {url!r}")
    host = parts.hostname.lower()
    nets, hosts, everything = _parse_allow(allow)
    if everything or host in hosts:
        return
    try:
        addresses = [ipaddress.ip_address(host)]
    except ValueError:
        if not resolve:
            return
        try:
            infos = socket.getaddrinfo(host, parts.port or 443, type=socket.SOCK_STREAM)
        except OSError as e:
            raise WebhookNotAllowed(f"webhook host {host!r} does not resolve: {e}") from None
        addresses = [ipaddress.ip_address(str(info[4][0])) for info in infos]
    for addr in addresses:
        if any(addr in net for net in nets):
            continue
        if not addr.is_global:
            raise WebhookNotAllowed(
                f"webhook target {host} ({addr}) is not a public address; add it to SDGATE_WEBHOOK_ALLOW to allow it"
            )


async def deliver(
    url: str,
    body: bytes,
    *,
    secret: str | None,
    allow: str,
    max_attempts: int,
    backoff_s: float,
    timeout_s: float = 10.0,
) -> list[WebhookAttempt]:
    """POST ``body`` until a 2xx or ``max_attempts``; returns one record per attempt."""
    attempts: list[WebhookAttempt] = []
    async with httpx.AsyncClient(timeout=timeout_s, follow_redirects=False) as client:
        for n in range(max_attempts):
            attempt = WebhookAttempt(at=time.time())
            attempts.append(attempt)
            try:
                # Checked at every attempt, after resolution: DNS can change between submit and delivery.
                await asyncio.to_thread(check_url, url, allow)
                headers = {"Content-Type": "application/json", "User-Agent": "sdgate-webhook"}
                if secret:
                    headers[SIGNATURE_HEADER] = sign(body, secret)
                resp = await client.post(url, content=body, headers=headers)
                attempt.status = resp.status_code
                if 200 <= resp.status_code < 300:
                    return attempts
            except WebhookNotAllowed as e:
                attempt.error = str(e)
                return attempts
            except httpx.HTTPError as e:
                attempt.error = f"{type(e).__name__}: {e}"
            if n + 1 < max_attempts:
                await asyncio.sleep(backoff_s * 2**n)
    log.warning("webhook to %s failed after %d attempts", url, len(attempts))
    return attempts
