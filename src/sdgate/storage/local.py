"""Images on the local disk, served by the API at ``/images/{key}``; their sidecars under ``private/``, not served."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from sdgate.errors import StorageError
from sdgate.storage import StoredObject, is_valid_key


class LocalStorage:
    """A directory of images. Writes are atomic: temp file in the same directory, fsync, rename.

    A write that need not be durable skips the fsync (about a millisecond on a local SSD): the rename
    still makes it appear whole or not at all to readers, but a power cut may lose it.
    """

    name = "local"

    def __init__(self, root: Path, public_base_url: str | None = None):
        self.root = root
        self.public_base_url = public_base_url

    def path_for(self, key: str) -> Path | None:
        """The file of ``key``, or None when the key is not one sdgate could have made (no traversal)."""
        if not is_valid_key(key):
            return None
        return self.root / key

    def url_for(self, key: str) -> str:
        if self.public_base_url:
            return f"{self.public_base_url}/{key}"
        return f"/images/{key}"

    def put(self, data: bytes, key: str, content_type: str, *, durable: bool = True) -> StoredObject:
        path = self.path_for(key)
        if path is None:
            raise ValueError(f"invalid storage key {key!r}")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".part")
            try:
                with os.fdopen(fd, "wb") as f:
                    f.write(data)
                    if durable:
                        f.flush()
                        os.fsync(f.fileno())
                os.replace(tmp, path)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
        except OSError as e:
            raise StorageError(f"could not store image: {e.strerror or e}") from e
        return StoredObject(key=key, url=self.url_for(key))

    def get(self, key: str) -> bytes:
        path = self.path_for(key)
        if path is None:
            raise ValueError(f"invalid storage key {key!r}")
        try:
            return path.read_bytes()
        except OSError as e:
            raise StorageError(f"could not read {key}: {e.strerror or e}") from e

    def delete(self, key: str) -> None:
        path = self.path_for(key)
        if path is None:
            raise ValueError(f"invalid storage key {key!r}")
        try:
            path.unlink(missing_ok=True)
        except OSError as e:
            raise StorageError(f"could not delete image: {e.strerror or e}") from e

    def check(self) -> None:
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryFile(dir=self.root):
                pass
        except OSError as e:
            raise StorageError(f"image directory {self.root} is not writable: {e.strerror or e}") from e
