"""Webhook signing, the SSRF guard on targets, and delivery with retries (against a loopback receiver)."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from sdgate.jobs.webhooks import SIGNATURE_HEADER, WebhookNotAllowed, check_url, deliver, sign, verify

SECRET = "whsec-test"
BODY = b'{"id":"abc","status":"succeeded"}'


# -- sign / verify ---------------------------------------------------------------------------------


def test_signature_verifies_with_the_same_secret_and_body() -> None:
    header = sign(BODY, SECRET)
    assert header.startswith("t=") and ",v1=" in header
    assert verify(BODY, header, SECRET)


def test_tampered_body_fails() -> None:
    header = sign(BODY, SECRET)
    assert not verify(BODY.replace(b"succeeded", b"failed"), header, SECRET)
    assert not verify(BODY + b" ", header, SECRET)


def test_wrong_secret_fails() -> None:
    assert not verify(BODY, sign(BODY, SECRET), "another-secret")


def test_old_timestamp_fails_even_with_a_valid_mac() -> None:
    old = int(time.time()) - 3600
    header = sign(BODY, SECRET, timestamp=old)
    assert not verify(BODY, header, SECRET)
    # The same old signature passes once the receiver tolerates its age: only the age failed it.
    assert verify(BODY, header, SECRET, tolerance_s=7200)


def test_timestamp_from_the_future_fails() -> None:
    assert not verify(BODY, sign(BODY, SECRET, timestamp=int(time.time()) + 3600), SECRET)


def test_timestamp_is_part_of_the_mac() -> None:
    """Moving t forward on a captured signature (to replay it later) breaks the MAC."""
    ts = int(time.time()) - 100
    mac = sign(BODY, SECRET, timestamp=ts).split(",v1=")[1]
    assert verify(BODY, f"t={ts},v1={mac}", SECRET)
    assert not verify(BODY, f"t={ts + 50},v1={mac}", SECRET)


@pytest.mark.parametrize(
    "header",
    ["", "garbage", "t=abc,v1=00", "v1=00", pytest.param(f"t={int(time.time())}", id="t-only"), "t=1=2"],
)
def test_malformed_header_fails_without_raising(header: str) -> None:
    assert not verify(BODY, header, SECRET)


# -- check_url -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:8000/hook",  # loopback
        "http://[::1]/hook",  # IPv6 loopback
        "http://[::ffff:127.0.0.1]/hook",  # IPv4-mapped loopback
        "http://localhost:9000/hook",  # a name that resolves to loopback
        "http://10.1.2.3/hook",  # private
        "http://192.168.0.10/hook",
        "http://172.16.5.4/hook",
        "http://169.254.169.254/latest/meta-data/",  # link-local: cloud metadata
        "http://0.0.0.0/hook",
        "http://100.64.0.1/hook",  # carrier-grade NAT
    ],
)
def test_non_public_targets_are_refused_by_default(url: str) -> None:
    with pytest.raises(WebhookNotAllowed, match="SDGATE_WEBHOOK_ALLOW"):
        check_url(url, "")


@pytest.mark.parametrize("url", ["ftp://example.com/x", "file:///etc/passwd", "http:///nohost", "not a url"])
def test_only_http_urls_with_a_host(url: str) -> None:
    with pytest.raises(WebhookNotAllowed, match="http"):
        check_url(url, "*")


def test_public_address_is_allowed() -> None:
    check_url("https://93.184.216.34/hook", "")
    check_url("http://[2606:4700:4700::1111]:8443/hook", "")


def test_unresolvable_name_is_refused() -> None:
    with pytest.raises(WebhookNotAllowed, match="does not resolve"):
        check_url("https://no-such-host.invalid/hook", "")


def test_allow_list_cidr_opens_only_that_range() -> None:
    allow = "10.0.0.0/8"
    check_url("http://10.20.30.40:8080/hook", allow)
    with pytest.raises(WebhookNotAllowed):
        check_url("http://192.168.1.1/hook", allow)
    with pytest.raises(WebhookNotAllowed):
        check_url("http://169.254.169.254/", allow)


def test_allow_list_single_address_and_host_name() -> None:
    check_url("http://127.0.0.1:9000/hook", "127.0.0.1")
    with pytest.raises(WebhookNotAllowed):
        check_url("http://127.0.0.2:9000/hook", "127.0.0.1")  # another loopback address is still refused
    check_url("http://hooks.internal:9000/hook", " hooks.internal , 10.0.0.0/8")  # listed names are not resolved
    check_url("http://HOOKS.internal/hook", "hooks.internal")  # names compare case-insensitively
    with pytest.raises(WebhookNotAllowed):
        check_url("http://127.0.0.1/hook", "hooks.internal")


def test_star_allows_everything() -> None:
    check_url("http://169.254.169.254/latest/meta-data/", "*")
    check_url("http://127.0.0.1:1/hook", "10.0.0.0/8, *")


# -- deliver ---------------------------------------------------------------------------------------


class Receiver:
    """A loopback HTTP server that answers the statuses in ``script`` in turn, then 200."""

    def __init__(self, script: list[int]):
        self.script = list(script)
        self.requests: list[tuple[dict[str, str], bytes]] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                receiver.requests.append((dict(self.headers.items()), body))
                status = receiver.script.pop(0) if receiver.script else 200
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/hook"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


MakeReceiver = Callable[[list[int]], Receiver]


@pytest.fixture
def make_receiver() -> Iterator[MakeReceiver]:
    made: list[Receiver] = []

    def make(script: list[int]) -> Receiver:
        made.append(Receiver(script))
        return made[-1]

    yield make
    for r in made:
        r.close()


def test_deliver_retries_until_2xx_and_signs_every_attempt(make_receiver: MakeReceiver) -> None:
    rx = make_receiver([500, 503])
    attempts = asyncio.run(deliver(rx.url, BODY, secret=SECRET, allow="127.0.0.1", max_attempts=5, backoff_s=0.01))
    assert [a.status for a in attempts] == [500, 503, 200]
    assert len(rx.requests) == 3
    for headers, body in rx.requests:
        assert body == BODY
        assert verify(body, headers[SIGNATURE_HEADER], SECRET)
        assert headers["Content-Type"] == "application/json"


def test_deliver_gives_up_after_max_attempts(make_receiver: MakeReceiver) -> None:
    rx = make_receiver([500] * 10)
    attempts = asyncio.run(deliver(rx.url, BODY, secret=None, allow="127.0.0.1", max_attempts=3, backoff_s=0.01))
    assert [a.status for a in attempts] == [500, 500, 500]
    assert len(rx.requests) == 3
    assert SIGNATURE_HEADER not in rx.requests[0][0]  # no secret, no signature


def test_deliver_records_connection_errors_and_retries() -> None:
    from tests.server import free_port

    url = f"http://127.0.0.1:{free_port()}/hook"  # nothing listens there
    attempts = asyncio.run(deliver(url, BODY, secret=SECRET, allow="127.0.0.1", max_attempts=2, backoff_s=0.01))
    assert len(attempts) == 2
    assert all(a.error and a.status is None for a in attempts)


def test_deliver_refuses_a_target_off_the_allow_list_without_sending(make_receiver: MakeReceiver) -> None:
    rx = make_receiver([])
    attempts = asyncio.run(deliver(rx.url, BODY, secret=SECRET, allow="", max_attempts=5, backoff_s=0.01))
    assert len(attempts) == 1  # not retried: it would be refused again
    assert "not a public address" in (attempts[0].error or "")
    assert rx.requests == []
