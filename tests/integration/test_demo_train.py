"""The demo trainer end to end at a toy size: every stage runs, reports and saves a loadable pipeline.

The shipped weights took 75 CPU minutes; this checks the code path (a few steps of each stage), not
the quality, which tests/e2e/test_demo_model.py measures on the shipped model.
"""

from __future__ import annotations

import json
from pathlib import Path

from sdgate.demo.train import TrainConfig, train_demo

TOY = TrainConfig(
    vae_steps=2,
    vae_batch=2,
    decoder_steps=2,
    decoder_batch=2,
    unet_steps=3,
    unet_batch=2,
    latent_pool=4,
    threads=1,
    sample_steps=1,
)


def test_a_toy_run_trains_every_stage_and_saves_a_pipeline(tmp_path: Path) -> None:
    lines: list[str] = []
    report = train_demo(tmp_path / "out", TOY, log=lines.append)

    for stage, steps in (("vae", TOY.vae_steps), ("decoder", TOY.decoder_steps), ("unet", TOY.unet_steps)):
        assert getattr(report, f"{stage}_loss") > 0, stage
        assert getattr(report, f"{stage}_seconds") > 0 and getattr(report, f"{stage}_cpu_seconds") > 0, stage
        # Logged and kept at the first and the last step.
        assert [step for step, _ in report.history[stage]] == [0, steps - 1], stage
        assert any(line.startswith(f"{stage} step {steps - 1}/{steps} ") for line in lines), (stage, lines)
    summary = json.loads((tmp_path / "out" / "training.json").read_text())
    assert summary["unet_loss"] == report.unet_loss
    assert (tmp_path / "out" / "model_index.json").is_file() and (tmp_path / "out" / "samples.png").is_file()
