"""Images on the local disk, served by the API at ``/images/{key}``; their sidecars under ``private/``, not served."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from sdgate.errors import StorageError
from sdgate.storage import StoredObject, is_valid_key


class LocalStorage:
    """A directory of images. A write is whole or absent for readers, and durable (fsynced) before it returns.

    A new key is written in place: nobody can read it before ``put`` returns, because its URL is not
    out yet. An existing key is replaced atomically (temporary file in the same directory, rename).
    A write that need not be durable skips the fsync (a fraction of a millisecond on a local SSD);
    a power cut may lose it.
    """

    name = "local"

    def __init__(self, root: Path, public_base_url: str | None = None):
        self.root = root
        self.public_base_url = public_base_url
        self._made: set[Path] = set()
        """Directories this process made or found (a date's folder): not made again for every image."""

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
            if not self._create(path, data, durable):  # the key exists: replace it atomically
                self._replace(path, data, durable)
        except OSError as e:
            raise StorageError(f"could not store image: {e.strerror or e}") from e
        return StoredObject(key=key, url=self.url_for(key))

    def _create(self, path: Path, data: bytes, durable: bool) -> bool:
        """Write a new file in place; False when ``path`` exists already.

        No temporary file and rename for a new key: its URL is not out yet (it is answered only after
        this returns), so nobody can read it half written, and a failed write removes it. That is one
        file operation in the directory instead of three, which eight concurrent writes contend for.
        """
        parent = path.parent
        for attempt in (1, 2):
            if parent not in self._made:
                parent.mkdir(parents=True, exist_ok=True)
                self._made.add(parent)
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
                break
            except FileExistsError:
                return False
            except FileNotFoundError:  # its directory was removed since it was made: make it again, once
                self._made.discard(parent)
                if attempt == 2:
                    raise
        try:
            _write_all(fd, data, durable)
        except BaseException:
            path.unlink(missing_ok=True)
            raise
        finally:
            os.close(fd)
        return True

    def _replace(self, path: Path, data: bytes, durable: bool) -> None:
        """Overwrite an existing file atomically: temporary file in the same directory, rename."""
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".part")
        try:
            try:
                _write_all(fd, data, durable)
            finally:
                os.close(fd)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

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


def _write_all(fd: int, data: bytes, durable: bool) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]
    if durable:
        os.fsync(fd)
