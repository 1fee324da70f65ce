"""Settings: environment variables, flags, and the validators that refuse contradictions."""

from __future__ import annotations

from pathlib import Path

import click
import pytest
from click.testing import CliRunner
from pydantic import ValidationError

from sdgate.cli import build_settings, main
from sdgate.config import Settings


def test_every_setting_is_an_sdgate_environment_variable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SDGATE_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("SDGATE_MAX_BATCH_WAIT_MS", "50")
    monkeypatch.setenv("SDGATE_OUTPUT_FORMAT", "webp")
    monkeypatch.setenv("SDGATE_WARMUP", "false")
    s = Settings()
    assert (s.data_dir, s.max_batch_wait_ms, s.output_format, s.warmup) == (tmp_path, 50.0, "webp", False)
    assert s.paths.images == tmp_path / "images"
    assert s.paths.models == tmp_path / "models"


def test_unknown_settings_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValidationError):
        Settings(data_dir=tmp_path, max_batch_wait=5)  # type: ignore[call-arg]


@pytest.mark.parametrize(
    ("fields", "words"),
    [
        ({"storage": "s3"}, "SDGATE_S3_BUCKET"),
        ({"backend": "sagemaker"}, "SDGATE_SAGEMAKER_ENDPOINT"),
        ({"backend": "http"}, "SDGATE_BACKEND_URL"),
        ({"public_base_url": "cdn.example.com"}, "http://"),
        ({"max_batch_size": 0}, "max_batch_size"),
        ({"port": 70000}, "port"),
    ],
)
def test_contradictory_or_bad_settings_say_how_to_fix_them(
    tmp_path: Path, fields: dict[str, object], words: str
) -> None:
    with pytest.raises(ValidationError, match=words):
        Settings(data_dir=tmp_path, **fields)  # type: ignore[arg-type]


def test_every_setting_is_a_serve_flag() -> None:
    result = CliRunner().invoke(main, ["serve", "--help"], terminal_width=200)
    assert result.exit_code == 0
    for name in Settings.model_fields:
        assert f"--{name.replace('_', '-')}" in result.output, name
        assert f"SDGATE_{name.upper()}" in result.output, name


def test_flags_win_over_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SDGATE_MAX_BATCH_SIZE", "3")
    monkeypatch.setenv("SDGATE_DATA_DIR", str(tmp_path))
    assert build_settings({}).max_batch_size == 3
    assert build_settings({"max_batch_size": "5", "port": None}).max_batch_size == 5


def test_a_bad_flag_value_is_a_usage_error_naming_it(tmp_path: Path) -> None:
    with pytest.raises(click.UsageError, match="max_batch_wait_ms"):
        build_settings({"data_dir": str(tmp_path), "max_batch_wait_ms": "-1"})
