"""The real ``sdgate`` command line in a subprocess: in process, against a server, and its errors."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sdgate.imaging import read_metadata
from tests import background
from tests.loras import build_lora
from tests.server import ServerProcess, free_port, tiny_model_dir

Completed = subprocess.CompletedProcess[str]


def sdgate(data_dir: Path, *args: str, timeout: float = 180) -> Completed:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SDGATE_")}
    env["SDGATE_DATA_DIR"] = str(data_dir)
    env["SDGATE_MODEL"] = "tiny"  # the fastest model, and the one the session server runs
    return subprocess.run(
        [sys.executable, "-m", "sdgate.cli", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=data_dir.parent,
    )


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    d = tmp_path / "data"
    d.mkdir()
    return d


def with_tiny(data_dir: Path, tiny_model_dir: Path) -> Path:
    """Seed the data directory's model cache with the built-in model (building it takes seconds)."""
    shutil.copytree(tiny_model_dir, data_dir / "models" / tiny_model_dir.name)
    return data_dir


def assert_clean_error(proc: Completed, *words: str) -> None:
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    assert "Traceback" not in proc.stdout
    error_lines = [line for line in proc.stderr.splitlines() if line.startswith("Error")]
    assert len(error_lines) == 1, proc.stderr
    for word in words:
        assert word in error_lines[0], proc.stderr


def pixels(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"), dtype=np.int16)


FOX = ["a red fox", "--width", "64", "--height", "64", "--steps", "2", "--seed", "1"]


# The commands that load a model (seconds of imports each) run in the background, while the modules
# before this one run (tests/background.py); the tests check what they printed and wrote.


def _fox_in_process() -> tuple[Completed, Path]:
    root = background.workdir("cli")
    data_dir = with_tiny(root / "data", tiny_model_dir())
    out = root / "out.png"
    return sdgate(data_dir, "generate", FOX[0], "-o", str(out), *FOX[1:]), out


@pytest.fixture(scope="module")
def in_process() -> tuple[Completed, Path]:
    """``sdgate generate`` in process, once for the module: the command and the image it wrote."""
    made: tuple[Completed, Path] = background.get("cli_fox", _fox_in_process)
    return made


def test_generate_in_process_writes_the_image_and_prints_the_seed(
    in_process: tuple[Completed, Path],
) -> None:
    proc, out = in_process
    assert proc.returncode == 0, proc.stderr
    assert re.search(r"out\.png\s+seed=1\b", proc.stdout), proc.stdout
    assert "Traceback" not in proc.stderr
    with Image.open(out) as im:
        assert im.format == "PNG"
        assert im.size == (64, 64)
    meta = read_metadata(out.read_bytes())
    assert meta is not None
    assert (meta["prompt"], meta["seed"], meta["model"]) == ("a red fox", 1, "tiny")


def test_generate_against_a_server_writes_the_same_images(
    server: ServerProcess, in_process: tuple[Completed, Path], data_dir: Path, tmp_path: Path
) -> None:
    out = tmp_path / "remote.png"
    proc = sdgate(data_dir, "generate", FOX[0], "-o", str(out), "--url", server.url, *FOX[1:], "-n", "2", timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    files = [tmp_path / "remote-0.png", tmp_path / "remote-1.png"]
    for i, path in enumerate(files):
        assert re.search(rf"{path.name}\s+seed={1 + i}\b", proc.stdout), proc.stdout
        with Image.open(path) as im:
            assert (im.format, im.size) == ("PNG", (64, 64))
        meta = read_metadata(path.read_bytes())
        assert meta is not None
        assert (meta["prompt"], meta["seed"]) == ("a red fox", 1 + i)
    # The same built-in model and seed give the same image, in process or on the server
    # (the server ran both images in one batch: within 1 of the single image).
    assert np.abs(pixels(files[0]) - pixels(in_process[1])).max() <= 1
    assert not np.array_equal(pixels(files[0]), pixels(files[1]))
    assert not (data_dir / "models").exists(), "--url must not load a model locally"


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--width", "65"], ["width", "multiple of 8"]),
        (["--steps", "0"], ["num_inference_steps"]),
        (["--scheduler", "karras"], ["karras", "euler_a"]),
        (["--seed", "-1"], ["seed"]),
    ],
)
def test_a_bad_input_is_a_one_line_error_before_any_model_work(
    data_dir: Path, args: list[str], words: list[str]
) -> None:
    proc = sdgate(data_dir, "generate", "a red fox", "-o", str(data_dir / "out.png"), *args, timeout=60)
    assert_clean_error(proc, *words)
    assert proc.returncode == 1
    assert not (data_dir / "out.png").exists()
    assert not (data_dir / "models").exists(), "the model was loaded (or built) for a request that was invalid"


def test_an_unsupported_output_extension_is_a_usage_error(data_dir: Path) -> None:
    proc = sdgate(data_dir, "generate", "a red fox", "--output", str(data_dir / "x.gif"), timeout=60)
    assert proc.returncode == 2  # click's usage error
    assert "Traceback" not in proc.stderr
    assert ".jpg" in proc.stderr
    assert "x.gif" in proc.stderr


def test_a_bad_setting_is_a_usage_error(data_dir: Path) -> None:
    proc = sdgate(data_dir, "generate", "a red fox", "--max-batch-size", "0", timeout=60)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert "max_batch_size" in proc.stderr


def test_a_server_side_rejection_is_a_clean_error(server: ServerProcess, data_dir: Path) -> None:
    proc = sdgate(
        data_dir, "generate", "a red fox", "-o", str(data_dir / "o.jpg"), "--url", server.url, "--width", "4096",
        timeout=60,
    )  # fmt: skip
    assert_clean_error(proc, "width")


def test_generate_against_a_closed_port_is_a_clean_error(data_dir: Path) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    proc = sdgate(data_dir, "generate", "a red fox", "-o", str(data_dir / "o.jpg"), "--url", url, timeout=60)
    assert_clean_error(proc, url)
    assert proc.returncode == 1
    assert not (data_dir / "o.jpg").exists()


# -- image inputs: --image, --mask, --strength ------------------------------------------------------

BOX = (16, 8, 48, 40)  # the repainted rectangle of the mask: left, top, right, bottom
INPAINT = ["a lantern", "--steps", "2", "--seed", "5", "--strength", "0.6"]


def write_inputs(folder: Path) -> tuple[Path, Path]:
    """A 72x64 noise PNG (every pixel its own) and its black mask with a white (repaint) rectangle."""
    rng = np.random.default_rng(7)
    image = Image.fromarray(rng.integers(0, 256, (64, 72, 3), dtype=np.uint8), "RGB")
    mask = Image.new("L", (72, 64), 0)
    mask.paste(255, BOX)
    folder.mkdir(parents=True, exist_ok=True)
    image.save(folder / "in.png")
    mask.save(folder / "m.png")
    return folder / "in.png", folder / "m.png"


def kept() -> np.ndarray:
    """Where the mask keeps the input: all but BOX."""
    keep = np.ones((64, 72), dtype=bool)
    left, top, right, bottom = BOX
    keep[top:bottom, left:right] = False
    return keep


def _inpainted_in_process() -> tuple[Completed, Path]:
    root = background.workdir("cli-inpaint")
    data_dir = with_tiny(root / "data", tiny_model_dir())
    image, mask = write_inputs(root)
    out = root / "out.png"
    args = ["-o", str(out), "--image", str(image), "--mask", str(mask), *INPAINT[1:]]
    return sdgate(data_dir, "generate", INPAINT[0], *args), out


@pytest.fixture(scope="module")
def inpainted_in_process() -> tuple[Completed, Path]:
    """``sdgate generate --image --mask --strength`` in process, once for the module."""
    made: tuple[Completed, Path] = background.get("cli_inpaint", _inpainted_in_process)
    return made


def test_generate_with_image_and_mask_in_process_keeps_the_unmasked_area(
    inpainted_in_process: tuple[Completed, Path],
) -> None:
    proc, out = inpainted_in_process
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    assert re.search(r"out\.png\s+seed=5\b", proc.stdout), proc.stdout
    with Image.open(out) as im:
        assert (im.format, im.size) == ("PNG", (72, 64))  # the input's size
    got, sent = pixels(out), pixels(out.with_name("in.png"))
    assert np.array_equal(got[kept()], sent[kept()])
    assert not np.array_equal(got[~kept()], sent[~kept()])
    meta = read_metadata(out.read_bytes())
    assert meta is not None
    assert (meta["mode"], meta["strength"], meta["seed"]) == ("inpaint", 0.6, 5)


def test_generate_with_image_and_mask_against_a_server_gives_the_same_pixels(
    server: ServerProcess, inpainted_in_process: tuple[Completed, Path], data_dir: Path, tmp_path: Path
) -> None:
    image, mask = write_inputs(tmp_path)
    out = tmp_path / "remote.png"
    args = ["-o", str(out), "--url", server.url, "--image", str(image), "--mask", str(mask), *INPAINT[1:]]
    proc = sdgate(data_dir, "generate", INPAINT[0], *args, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    assert re.search(r"remote\.png\s+seed=5\b", proc.stdout), proc.stdout
    with Image.open(out) as im:
        assert (im.format, im.size) == ("PNG", (72, 64))
    got = pixels(out)
    assert np.array_equal(got[kept()], pixels(image)[kept()])
    # the same model, seed and inputs: the same image in process or on the server (within 1, as above)
    assert np.abs(got - pixels(inpainted_in_process[1])).max() <= 1
    assert not (data_dir / "models").exists(), "--url must not load a model locally"


def test_mask_without_image_is_a_usage_error(data_dir: Path) -> None:
    _, mask = write_inputs(data_dir.parent)
    proc = sdgate(data_dir, "generate", "a lantern", "-o", str(data_dir / "o.png"), "--mask", str(mask), timeout=60)
    assert proc.returncode == 2  # click's usage error
    assert "Traceback" not in proc.stderr
    assert "--mask needs --image" in proc.stderr
    assert not (data_dir / "o.png").exists()
    assert not (data_dir / "models").exists()


def test_a_missing_image_file_is_a_usage_error(data_dir: Path) -> None:
    missing = data_dir.parent / "nowhere.png"
    proc = sdgate(data_dir, "generate", "a lantern", "-o", str(data_dir / "o.png"), "--image", str(missing), timeout=60)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert "nowhere.png" in proc.stderr


def test_a_bad_image_file_in_process_is_a_clean_error(tmp_path: Path, tiny_model_dir: Path) -> None:
    data_dir = with_tiny(tmp_path / "data", tiny_model_dir)
    bad = tmp_path / "bad.png"
    bad.write_text("not a picture")
    proc = sdgate(data_dir, "generate", "a lantern", "-o", str(tmp_path / "o.png"), "--image", str(bad), timeout=120)
    assert_clean_error(proc, "image", "not a PNG, JPEG or WebP")
    assert proc.returncode == 1
    assert not (tmp_path / "o.png").exists()


def test_a_bad_image_file_against_a_server_is_a_clean_error(server: ServerProcess, tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"GIF89a" + b"\x00" * 64)
    out = tmp_path / "o.png"
    proc = sdgate(
        data_dir, "generate", "a lantern", "-o", str(out), "--url", server.url, "--image", str(bad), timeout=60
    )
    assert_clean_error(proc, "image is a GIF")
    assert proc.returncode == 1
    assert not out.exists()


def test_a_bad_image_file_is_refused_before_any_model_work(data_dir: Path) -> None:
    """As every other bad input (above): the image is checked before the model is loaded or built."""
    bad = data_dir.parent / "bad.png"
    bad.write_text("not a picture")
    proc = sdgate(data_dir, "generate", "a lantern", "-o", str(data_dir / "o.png"), "--image", str(bad), timeout=180)
    assert_clean_error(proc, "image")
    assert proc.returncode == 1
    assert not (data_dir / "models").exists(), "the model was loaded (or built) for an image that was invalid"


# -- LoRAs: --lora NAME[:WEIGHT] -------------------------------------------------------------------


def _lora_data_dir() -> Path:
    """A data directory with the tiny model and ``ink``, a LoRA for it, in its default LoRA directory."""
    model = tiny_model_dir()
    data_dir = with_tiny(background.workdir("cli-lora") / "data", model)
    build_lora(model, data_dir / "loras" / "ink.safetensors", seed=3)
    return data_dir


def _lora_runs() -> dict[str, tuple[Completed, Path]]:
    """The fox in process with ``--lora ink:0.8`` and with ``--lora ink:0``, by weight."""
    data_dir: Path = background.get("cli_lora_data", _lora_data_dir)
    runs = {}
    for weight in ("0.8", "0"):
        out = data_dir.parent / f"ink-{weight}.png"
        runs[weight] = sdgate(data_dir, "generate", FOX[0], "-o", str(out), *FOX[1:], "--lora", f"ink:{weight}"), out
    return runs


def _unknown_lora() -> tuple[Completed, Path]:
    data_dir: Path = background.get("cli_lora_data", _lora_data_dir)
    out = data_dir.parent / "unknown.png"
    return sdgate(data_dir, "generate", FOX[0], "-o", str(out), *FOX[1:], "--lora", "nope:1", "--lora", "ink"), out


background.needs(
    __file__,
    cli_fox=_fox_in_process,
    cli_inpaint=_inpainted_in_process,
    cli_lora_data=_lora_data_dir,
    cli_lora_runs=_lora_runs,
    cli_unknown_lora=_unknown_lora,
)


def test_generate_with_a_lora_in_process_changes_the_image_and_records_it(in_process: tuple[Completed, Path]) -> None:
    plain_proc, plain = in_process  # the same command, without --lora
    assert plain_proc.returncode == 0, plain_proc.stderr
    runs: dict[str, tuple[Completed, Path]] = background.get("cli_lora_runs", _lora_runs)
    (inked_proc, inked), (off_proc, off) = runs["0.8"], runs["0"]
    for proc, out in ((inked_proc, inked), (off_proc, off)):
        assert proc.returncode == 0, proc.stderr
        assert "Traceback" not in proc.stderr
        assert re.search(rf"{out.name}\s+seed=1\b", proc.stdout), proc.stdout
    # Weight 0 is the image without the LoRA: the comparison is like for like, and weight 0.8 changes it.
    assert np.array_equal(pixels(off), pixels(plain))
    assert not np.array_equal(pixels(inked), pixels(plain))
    meta = read_metadata(inked.read_bytes())
    assert meta is not None
    assert (meta["model"], meta["seed"], meta["loras"]) == ("tiny", 1, [{"name": "ink", "weight": 0.8}])


def test_generate_with_an_unknown_lora_is_a_clean_error_naming_it() -> None:
    proc, out = background.get("cli_unknown_lora", _unknown_lora)
    assert_clean_error(proc, "'nope'", "offered: ink")
    assert proc.returncode == 1
    assert not out.exists()


def test_a_lora_weight_that_is_not_a_number_is_a_usage_error_before_any_model_work(data_dir: Path) -> None:
    proc = sdgate(data_dir, "generate", "a red fox", "-o", str(data_dir / "o.png"), "--lora", "ink:heavy", timeout=60)
    assert proc.returncode == 2  # click's usage error
    assert "Traceback" not in proc.stderr
    assert "--lora" in proc.stderr and "ink:heavy" in proc.stderr
    assert not (data_dir / "o.png").exists()
    assert not (data_dir / "models").exists()
