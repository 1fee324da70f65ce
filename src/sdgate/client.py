"""A small HTTP client for a running sdgate server, used by ``sdgate generate --url`` and ``sdgate jobs``."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx

from sdgate.errors import BackendError, SdgateError

TERMINAL_EVENTS = ("succeeded", "failed", "canceled")


class RemoteError(SdgateError):
    """The server answered with an error."""

    def __init__(self, status: int, body: Any):
        err = body.get("error", {}) if isinstance(body, dict) else {}
        message = err.get("message") or f"HTTP {status}"
        super().__init__(f"server answered {status}: {message}")
        self.status = status
        self.type = str(err.get("type", "remote_error"))


def _json(resp: httpx.Response) -> Any:
    try:
        return resp.json()
    except ValueError:
        return {"error": {"message": resp.text[:200]}}


def _checked(resp: httpx.Response) -> Any:
    data = _json(resp)
    if resp.status_code >= 400:
        raise RemoteError(resp.status_code, data)
    return data


class Client:
    """Talks to one sdgate server. Connection failures become a clean :class:`BackendError`."""

    def __init__(self, url: str, timeout: float = 600.0, api_key: str | None = None):
        self.base = url.rstrip("/")
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._http = httpx.Client(timeout=timeout, headers=headers)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self._http.close()

    def _call(self, method: str, path: str, **kwargs: Any) -> Any:
        try:
            return _checked(self._http.request(method, f"{self.base}{path}", **kwargs))
        except httpx.HTTPError as e:
            raise BackendError(f"could not reach {self.base}: {e}") from None

    def generate(self, body: dict[str, Any]) -> dict[str, Any]:
        """Sync generation; a job that outlasts the server's sync timeout comes back as 202 (queued/running)."""
        result: dict[str, Any] = self._call("POST", "/v1/generations", json=body)
        return result

    def submit(self, body: dict[str, Any]) -> dict[str, Any]:
        result: dict[str, Any] = self._call("POST", "/v1/generations", json=body, headers={"Prefer": "respond-async"})
        return result

    def job(self, job_id: str) -> dict[str, Any]:
        result: dict[str, Any] = self._call("GET", f"/v1/jobs/{job_id}")
        return result

    def jobs(self, limit: int = 20) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = self._call("GET", "/v1/jobs", params={"limit": limit})["data"]
        return result

    def cancel(self, job_id: str) -> dict[str, Any]:
        result: dict[str, Any] = self._call("POST", f"/v1/jobs/{job_id}/cancel")
        return result

    def events(self, job_id: str) -> Iterator[tuple[str, dict[str, Any]]]:
        """(event name, job) pairs from the server-sent event stream, ending with the terminal one."""
        try:
            with self._http.stream("GET", f"{self.base}/v1/jobs/{job_id}/events") as resp:
                if resp.status_code >= 400:
                    resp.read()
                    raise RemoteError(resp.status_code, _json(resp))
                name, data = "message", ""
                for line in resp.iter_lines():
                    if line.startswith("event:"):
                        name = line[6:].strip()
                    elif line.startswith("data:"):
                        data += line[5:].strip()
                    elif line == "" and data:
                        yield name, json.loads(data)
                        if name in TERMINAL_EVENTS:
                            return
                        name, data = "message", ""
        except httpx.HTTPError as e:
            raise BackendError(f"lost the event stream from {self.base}: {e}") from None

    def download(self, images: list[dict[str, Any]], output: Path) -> list[tuple[Path, int]]:
        """Write each image next to ``output`` (``out.jpg``, or ``out-0.jpg``, ``out-1.jpg``, ...)."""
        paths = (
            [output]
            if len(images) == 1
            else [output.with_name(f"{output.stem}-{i}{output.suffix}") for i in range(len(images))]
        )
        for path, img in zip(paths, images, strict=True):
            try:
                got = self._http.get(img["url"])
            except httpx.HTTPError as e:
                raise BackendError(f"could not download {img['url']}: {e}") from None
            if got.status_code != 200:
                raise RemoteError(got.status_code, _json(got))
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(got.content)
        return [(p, int(img["seed"])) for p, img in zip(paths, images, strict=True)]


def generate_remote(
    url: str,
    body: dict[str, Any],
    output: Path,
    *,
    use_async: bool = False,
    on_progress: Callable[[int, int], None] | None = None,
) -> list[tuple[Path, int]]:
    """Generate on a server and download the images. With ``use_async`` the job is submitted and
    its server-sent events drive ``on_progress``; otherwise one sync request (with a fallback to
    the events when the server answers 202 after its sync timeout)."""
    with Client(url) as client:
        job = client.submit(body) if use_async else client.generate(body)
        if job["status"] not in TERMINAL_EVENTS:
            for _name, event_job in client.events(job["id"]):
                job = event_job
                if on_progress is not None:
                    p = job.get("progress", {})
                    on_progress(int(p.get("step", 0)), int(p.get("total_steps", 0)))
        if job["status"] != "succeeded":
            err = job.get("error") or {}
            raise RemoteError(409 if job["status"] == "canceled" else 500, {"error": err})
        return client.download(job["images"], output)
