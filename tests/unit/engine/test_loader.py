"""Model loading decisions that need no model: checkpoint kind, device/dtype, clear load errors."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
safetensors_torch = pytest.importorskip("safetensors.torch")

from sdgate.engine.loader import (  # noqa: E402
    ModelLoadError,
    check_spec,
    load_model,
    pick_device,
    pick_dtype,
    single_file_kind,
)

SDXL_KEYS = ["conditioner.embedders.1.model.ln_final.weight", "model.diffusion_model.input_blocks.0.0.weight"]
SD_KEYS = ["cond_stage_model.transformer.text_model.final_layer_norm.weight", "model.diffusion_model.out.2.bias"]


def tiny_state(keys: list[str]) -> dict[str, object]:
    return {k: torch.zeros(2) for k in keys}


@pytest.mark.parametrize(("keys", "kind"), [(SDXL_KEYS, "sdxl"), (SD_KEYS, "sd")])
def test_single_file_kind_from_safetensors_keys(tmp_path: Path, keys: list[str], kind: str) -> None:
    path = tmp_path / "model.safetensors"
    safetensors_torch.save_file(tiny_state(keys), str(path))
    assert single_file_kind(path) == kind


@pytest.mark.parametrize(("keys", "kind"), [(SDXL_KEYS, "sdxl"), (SD_KEYS, "sd")])
def test_single_file_kind_from_a_ckpt_with_a_state_dict(tmp_path: Path, keys: list[str], kind: str) -> None:
    path = tmp_path / "model.ckpt"
    torch.save({"state_dict": tiny_state(keys)}, str(path))
    assert single_file_kind(path) == kind


def test_single_file_kind_ignores_the_key_prefix_elsewhere_in_a_name(tmp_path: Path) -> None:
    # Only the original SDXL layout starts keys with the second text encoder's prefix.
    path = tmp_path / "model.safetensors"
    safetensors_torch.save_file(tiny_state(["model.conditioner.embedders.1.x", *SD_KEYS]), str(path))
    assert single_file_kind(path) == "sd"


def test_cpu_device_and_dtypes() -> None:
    assert pick_device("cpu") == "cpu"
    assert pick_dtype("auto", "cpu") == torch.float32
    assert pick_dtype("auto", "cuda") == torch.float16
    assert pick_dtype("bfloat16", "cpu") == torch.bfloat16


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_asking_for_cuda_without_it_is_a_load_error() -> None:
    with pytest.raises(ModelLoadError, match="cuda"):
        pick_device("cuda")


def load(spec: str, tmp_path: Path) -> None:
    load_model(spec, device="cpu", dtype="float32", models_dir=tmp_path / "models")


@pytest.mark.parametrize("spec", ["/no/such/model", "./no-such-dir", "missing.safetensors", "~/no-such-sdgate-model"])
def test_a_missing_path_is_a_clear_error(tmp_path: Path, spec: str) -> None:
    with pytest.raises(ModelLoadError, match="does not exist") as info:
        load(spec, tmp_path)
    assert spec in str(info.value)


def test_a_file_that_is_no_checkpoint_is_refused_by_its_suffix(tmp_path: Path) -> None:
    path = tmp_path / "weights.bin"
    path.write_bytes(b"\0" * 16)
    with pytest.raises(ModelLoadError, match=r"\.safetensors or \.ckpt"):
        load(str(path), tmp_path)


def test_a_bad_spec_is_refused_before_diffusers_is_imported(tmp_path: Path) -> None:
    """A mistyped path answers at once: in a fresh interpreter, the error comes with diffusers never imported."""
    bad = tmp_path / "weights.bin"
    bad.write_bytes(b"\0" * 16)
    code = (
        "import sys; from pathlib import Path; from sdgate.engine.loader import ModelLoadError, load_model\n"
        "for spec in sys.argv[1:]:\n"
        "    try:\n"
        "        load_model(spec, device='cpu', dtype='float32', models_dir=Path('/nonexistent'))\n"
        "    except ModelLoadError as e:\n"
        "        print(e)\n"
        "print('diffusers' in sys.modules)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, "/no/such/model", str(bad)], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    missing, suffix, imported = proc.stdout.splitlines()
    assert "does not exist" in missing
    assert ".safetensors or .ckpt" in suffix
    assert imported == "False"


def test_a_builtin_name_is_not_mistaken_for_a_file_of_that_name(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A file called ``tiny`` in the working directory is no checkpoint to refuse: ``tiny`` is the built-in."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "tiny").write_text("not a model")
    (tmp_path / "other").write_text("not a model")
    assert check_spec("tiny") == Path("tiny")
    with pytest.raises(ModelLoadError, match=r"\.safetensors or \.ckpt"):
        check_spec("other")
