"""A small HTTP client for a running sdgate server, used by ``sdgate generate --url``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx

from sdgate.errors import BackendError, SdgateError


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


def generate_remote(url: str, body: dict[str, Any], output: Path, timeout: float = 600.0) -> list[tuple[Path, int]]:
    """POST the request, then download every image it names next to ``output``."""
    from tqdm import tqdm

    base = url.rstrip("/")
    try:
        with httpx.Client(timeout=timeout) as client:
            with tqdm(desc=f"generating on {base}", bar_format="{desc} {elapsed}") as bar:
                resp = client.post(f"{base}/v1/generations", json=body)
                bar.update()
            data = _json(resp)
            if resp.status_code >= 400:
                raise RemoteError(resp.status_code, data)
            images = data["images"]
            paths = (
                [output]
                if len(images) == 1
                else [output.with_name(f"{output.stem}-{i}{output.suffix}") for i in range(len(images))]
            )
            for path, img in zip(paths, images, strict=True):
                got = client.get(img["url"])
                if got.status_code != 200:
                    raise RemoteError(got.status_code, _json(got))
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(got.content)
    except httpx.HTTPError as e:
        raise BackendError(f"could not reach {base}: {e}") from None
    return [(p, int(img["seed"])) for p, img in zip(paths, images, strict=True)]
