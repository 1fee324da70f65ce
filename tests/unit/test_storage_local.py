"""Keys and the local image directory: unguessable, collision-free, atomic, no path traversal, private sidecars."""

from __future__ import annotations

import datetime as dt
import os
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from fastapi.testclient import TestClient

from sdgate.config import Settings
from sdgate.errors import SdgateError, StorageError
from sdgate.storage import create_storage, input_key, is_public_key, is_valid_key, new_key, sidecar_key
from sdgate.storage.local import LocalStorage

KEY = re.compile(r"^(\d{4})/(\d{2})/(\d{2})/([0-9a-f]{32})\.(\w+)$")


def test_key_has_a_date_prefix_and_128_random_bits() -> None:
    key = new_key("jpeg", now=dt.datetime(2026, 3, 7, 23, 59, tzinfo=dt.UTC))
    m = KEY.match(key)
    assert m, key
    assert m.group(1, 2, 3) == ("2026", "03", "07")
    assert m.group(5) == "jpeg"
    assert is_valid_key(key)


def test_key_date_is_utc() -> None:
    # 01:30 in UTC+9 is still the previous day in UTC.
    now = dt.datetime(2026, 1, 1, 1, 30, tzinfo=dt.timezone(dt.timedelta(hours=9))).astimezone(dt.UTC)
    assert new_key("png", now=now).startswith("2025/12/31/")
    assert KEY.match(new_key("png"))


def test_keys_never_repeat() -> None:
    # The original design's timestamp keys collide under load; these must not, even within one instant.
    now = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
    keys = {new_key("jpeg", now=now) for _ in range(5000)}
    assert len(keys) == 5000


@pytest.fixture
def storage(tmp_path: Path) -> LocalStorage:
    return LocalStorage(tmp_path / "images")


def test_put_writes_the_bytes_under_the_key_and_answers_a_local_url(storage: LocalStorage) -> None:
    key = new_key("png")
    stored = storage.put(b"\x89PNG-bytes", key, "image/png")
    assert stored.key == key
    assert stored.url == f"/images/{key}"
    assert (storage.root / key).read_bytes() == b"\x89PNG-bytes"
    assert storage.path_for(key) == storage.root / key


def test_url_uses_the_public_base_url_when_set(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path, public_base_url="https://cdn.example.com/img")
    key = new_key("webp")
    assert storage.put(b"x", key, "image/webp").url == f"https://cdn.example.com/img/{key}"


def test_create_storage_uses_the_data_dir_and_strips_the_trailing_slash(tmp_path: Path) -> None:
    storage = create_storage(Settings(data_dir=tmp_path, public_base_url="https://cdn.example.com/"))
    assert isinstance(storage, LocalStorage)
    assert storage.root == tmp_path / "images"
    key = new_key("jpeg")
    assert storage.put(b"x", key, "image/jpeg").url == f"https://cdn.example.com/{key}"


def leftovers(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file() and (p.name.startswith(".") or p.suffix == ".part")]


def test_writes_leave_no_temporary_files(storage: LocalStorage) -> None:
    keys = [new_key("jpeg") for _ in range(20)]
    for i, key in enumerate(keys):
        storage.put(bytes([i]) * 100, key, "image/jpeg")
    # overwrite one: still atomic, still no leftovers
    storage.put(b"new", keys[0], "image/jpeg")
    assert leftovers(storage.root) == []
    files = sorted(p.relative_to(storage.root).as_posix() for p in storage.root.rglob("*") if p.is_file())
    assert files == sorted(keys)
    assert (storage.root / keys[0]).read_bytes() == b"new"


def test_a_failed_write_leaves_neither_the_file_nor_a_temporary(
    storage: LocalStorage, monkeypatch: pytest.MonkeyPatch
) -> None:
    key = new_key("jpeg")

    def broken_fsync(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", broken_fsync)
    with pytest.raises(StorageError, match="No space left"):
        storage.put(b"data", key, "image/jpeg")
    assert not (storage.root / key).exists()
    assert leftovers(storage.root) == []


def test_a_new_key_is_written_in_place_fsynced_and_an_existing_one_replaced_after_its_fsync(
    storage: LocalStorage, monkeypatch: pytest.MonkeyPatch
) -> None:
    events: list[str] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        events.append("fsync")
        real_fsync(fd)

    def replace(src: str, dst: str) -> None:
        events.append("rename")
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    image, sidecar = new_key("jpeg"), new_key("jpeg")
    storage.put(b"image", image, "image/jpeg")
    assert events == ["fsync"]  # a new key: its URL is not out yet, so no temporary file is needed
    events.clear()
    storage.put(b"{}", sidecar, "application/json", durable=False)
    assert events == []
    storage.put(b"image 2", image, "image/jpeg")
    assert events == ["fsync", "rename"]  # an existing key: replaced whole, never seen half written
    assert (storage.root / image).read_bytes() == b"image 2"
    assert (storage.root / sidecar).read_bytes() == b"{}"
    assert leftovers(storage.root) == []


def test_a_directory_removed_after_a_write_is_made_again(storage: LocalStorage) -> None:
    first, second = new_key("jpeg"), new_key("jpeg")
    storage.put(b"one", first, "image/jpeg")
    folder = (storage.root / first).parent
    (storage.root / first).unlink()
    folder.rmdir()  # an operator's clean-up between two writes of the same day
    storage.put(b"two", second, "image/jpeg")
    assert (storage.root / second).read_bytes() == b"two"


def test_a_failed_write_keeps_the_previous_bytes(storage: LocalStorage, monkeypatch: pytest.MonkeyPatch) -> None:
    key = new_key("png")
    storage.put(b"old", key, "image/png")

    def broken_replace(src: str, dst: str) -> None:
        raise OSError(5, "I/O error")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(StorageError):
        storage.put(b"new", key, "image/png")
    assert (storage.root / key).read_bytes() == b"old"
    assert leftovers(storage.root) == []


GOOD = "2026/01/02/" + "0123456789abcdef" * 2


@pytest.mark.parametrize(
    "key",
    [
        "../etc/passwd",
        "../../../../etc/passwd",
        "/etc/passwd",
        "//etc/passwd",
        f"/{GOOD}.jpeg",
        f"{GOOD}.jpeg/../../../../etc/passwd",
        f"2026/01/02/../../{'0' * 32}.jpeg",
        f"2026/01/02/..\\..\\{'0' * 32}.jpeg",
        f"{GOOD}.jpeg\x00.png",
        f"{GOOD}.jpeg\n",
        f"{GOOD.upper()}.jpeg",
        f"{GOOD}.gif",
        f"{GOOD}.jpeg.part",
        f"{GOOD[:-1]}.jpeg",
        "2026/1/2/" + "0" * 32 + ".jpeg",
        "%2e%2e/%2e%2e/etc/passwd",
        "",
        ".",
        "server.log",
    ],
)
def test_keys_sdgate_could_not_have_made_are_rejected(storage: LocalStorage, key: str) -> None:
    assert storage.path_for(key) is None
    assert not is_valid_key(key)
    with pytest.raises(ValueError):
        storage.put(b"x", key, "image/jpeg")


@pytest.mark.parametrize(
    "key",
    [
        f"private/{GOOD}.gif",  # an input image is a PNG, JPEG or WebP
        f"private/private/{GOOD}.json",
        f"private/../{GOOD}.json",
        f"private//{GOOD}.json",
        f"/private/{GOOD}.json",
        f"Private/{GOOD}.json",
        f"private/{GOOD}.json\n",
        f"private/{GOOD[:-1]}.json",
    ],
)
def test_private_keys_sdgate_could_not_have_made_are_rejected(storage: LocalStorage, key: str) -> None:
    assert storage.path_for(key) is None
    assert not is_valid_key(key)
    assert not is_public_key(key)
    with pytest.raises(ValueError):
        storage.put(b"x", key, "application/json")
    with pytest.raises(ValueError):
        storage.delete(key)


@pytest.mark.parametrize("key", [f"{GOOD}.jpeg", f"{GOOD}.png", f"{GOOD}.webp", f"{GOOD}.json", f"private/{GOOD}.json"])
def test_keys_sdgate_makes_are_accepted(storage: LocalStorage, key: str) -> None:
    path = storage.path_for(key)
    assert path is not None
    assert path.resolve().is_relative_to(storage.root.resolve())


# -- sidecars: the prompt of an image whose URL is shared stays private ---------------------------


@pytest.mark.parametrize("ext", ["jpeg", "png", "webp"])
def test_the_sidecar_of_an_image_is_under_the_private_prefix(ext: str) -> None:
    assert sidecar_key(f"{GOOD}.{ext}") == f"private/{GOOD}.json"
    key = new_key(ext)
    assert is_public_key(key) and is_valid_key(key)
    sidecar = sidecar_key(key)
    assert is_valid_key(sidecar)
    assert not is_public_key(sidecar)


@pytest.mark.parametrize("key", [f"private/{GOOD}.json", f"{GOOD}.json", "../etc/passwd", f"{GOOD}.gif", ""])
def test_only_an_image_key_has_a_sidecar(key: str) -> None:
    with pytest.raises(ValueError, match="not an image key"):
        sidecar_key(key)


@pytest.mark.parametrize("ext", ["jpeg", "png", "webp"])
def test_an_input_image_is_stored_under_the_private_prefix_and_read_back(storage: LocalStorage, ext: str) -> None:
    key = input_key(ext)
    assert key.startswith("private/") and key.endswith(f".{ext}")
    assert is_valid_key(key) and not is_public_key(key)
    storage.put(b"the user's picture", key, f"image/{ext}")
    assert storage.get(key) == b"the user's picture"
    storage.delete(key)
    with pytest.raises(StorageError, match="could not read"):
        storage.get(key)


def test_a_sidecar_beside_its_image_is_valid_but_not_public() -> None:
    # Where sidecars were stored before they moved under private/: they can still be deleted.
    assert is_valid_key(f"{GOOD}.json")
    assert not is_public_key(f"{GOOD}.json")


def test_put_and_delete_an_image_and_its_sidecar(storage: LocalStorage) -> None:
    key = new_key("jpeg")
    sidecar = sidecar_key(key)
    storage.put(b"jpeg", key, "image/jpeg")
    assert storage.put(b"{}", sidecar, "application/json").key == sidecar
    assert (storage.root / "private" / key.replace(".jpeg", ".json")).read_bytes() == b"{}"
    assert (storage.root / key).read_bytes() == b"jpeg"
    storage.delete(sidecar)
    storage.delete(sidecar)  # missing: not an error
    assert not (storage.root / sidecar).exists()
    assert (storage.root / key).is_file()
    storage.delete(key)
    assert not [p for p in storage.root.rglob("*") if p.is_file()]


@pytest.fixture
def images(storage: LocalStorage) -> TestClient:
    """``GET /images/{key}`` alone: its router in a bare app, the storage in the context it reads."""
    # Imported here: the route's own module, not the app factory, is all this needs.
    from sdgate.api.images import router

    app = FastAPI()
    app.include_router(router)
    app.state.ctx = SimpleNamespace(storage=storage)

    async def sdgate_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, SdgateError)
        return JSONResponse(exc.body(), status_code=exc.status)

    app.add_exception_handler(SdgateError, sdgate_error)
    return TestClient(app)


def test_images_serves_an_image_but_never_its_sidecar(storage: LocalStorage, images: TestClient) -> None:
    key = new_key("png")
    storage.put(b"\x89PNG-bytes", key, "image/png")
    storage.put(b'{"prompt": "a secret"}', sidecar_key(key), "application/json")
    legacy = key.removesuffix(".png") + ".json"  # a sidecar stored beside its image by an earlier version
    storage.put(b'{"prompt": "an old secret"}', legacy, "application/json")

    got = images.get(f"/images/{key}")
    assert got.status_code == 200
    assert got.content == b"\x89PNG-bytes"
    assert got.headers["content-type"] == "image/png"
    for path in (f"/images/{sidecar_key(key)}", f"/images/{legacy}", "/images/private/", "/images/private"):
        refused = images.get(path)
        assert refused.status_code == 404, path
        assert refused.json()["error"]["type"] == "not_found"
        assert b"secret" not in refused.content


def test_check_passes_on_a_writable_directory_and_creates_it(storage: LocalStorage) -> None:
    storage.check()
    assert storage.root.is_dir()
    assert list(storage.root.iterdir()) == []  # the probe file is gone


def test_check_fails_clearly_when_the_directory_cannot_exist(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    storage = LocalStorage(blocker / "images")
    with pytest.raises(StorageError, match="not writable"):
        storage.check()
    with pytest.raises(StorageError):
        storage.put(b"x", new_key("jpeg"), "image/jpeg")
