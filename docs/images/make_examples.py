"""Make the README's image-to-image and inpainting pictures with the built-in demo model.

Run from the repository root: ``.venv/bin/python docs/images/make_examples.py`` (about 20 s on two
CPU cores, most of it loading the model). It runs sdgate in process, through the same generation service
as the server (the job is recorded and its images stored in a throwaway data directory), on the CPU
in float32, so that the pictures are the ones the README's prompts and seeds give there:

- ``example-input.png``: text to image, the picture the others start from;
- ``example-img2img-0.3.png``, ``example-img2img-1.0.png``: image to image at strength 0.3 and 1.0;
- ``example-mask.png``: white on the left half (repaint), black on the right (keep);
- ``example-inpainted.png``: inpainting the left half.

The model draws at 64x64; each picture is written enlarged 3x (192x192) with nearest-neighbour, so
that every pixel the model made is a visible 3x3 block and nothing is smoothed.
"""

from __future__ import annotations

import asyncio
import base64
import io
import tempfile
from pathlib import Path
from typing import Any

from PIL import Image

from sdgate.config import Settings
from sdgate.generation import Caller, GenerationService
from sdgate.generation.in_process import in_process
from sdgate.schemas import GenerationRequest, Surface

HERE = Path(__file__).resolve().parent
SCALE = 3

INPUT = {"prompt": "a large red circle on the right on a blue background", "seed": 2}
IMG2IMG = {"prompt": "a yellow square on a green background", "seed": 0}
STRENGTHS = (0.3, 1.0)
INPAINT = {"prompt": "a large yellow square on the left on a blue background", "seed": 4}


def left_half_mask(width: int, height: int) -> Image.Image:
    """White (repaint) on the left half, black (keep) on the right."""
    mask = Image.new("L", (width, height), 0)
    mask.paste(255, (0, 0, width // 2, height))
    return mask


def png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def save_enlarged(data: bytes, name: str) -> Path:
    """Write a picture ``SCALE`` times larger (nearest-neighbour), as a compact PNG."""
    with Image.open(io.BytesIO(data)) as im:
        image = im.convert("L" if im.mode == "L" else "RGB")
    big = image.resize((image.width * SCALE, image.height * SCALE), Image.Resampling.NEAREST)
    path = HERE / name
    big.save(path, format="PNG", optimize=True)
    return path


async def make(data_dir: Path) -> list[Path]:
    settings = Settings(data_dir=data_dir, model="demo", device="cpu", dtype="float32", warmup=False)
    async with in_process(settings) as service:
        return await _make(service)


async def _make(service: GenerationService) -> list[Path]:
    async def generate(**fields: Any) -> bytes:
        request = GenerationRequest(output_format="png", **fields)
        generation = await service.generate([request], surface=Surface.cli, caller=Caller(), wait_s=600)
        generation.raise_for_failure()
        data: bytes = generation.job.outputs[0].data
        return data

    await service.jobs.wait_ready(timeout=600)
    written = []
    source = await generate(**INPUT)
    written.append(save_enlarged(source, "example-input.png"))
    for strength in STRENGTHS:
        result = await generate(**IMG2IMG, image=b64(source), strength=strength)
        written.append(save_enlarged(result, f"example-img2img-{strength}.png"))
    with Image.open(io.BytesIO(source)) as im:
        mask = png(left_half_mask(*im.size))
    written.append(save_enlarged(mask, "example-mask.png"))
    inpainted = await generate(**INPAINT, image=b64(source), mask=b64(mask))
    written.append(save_enlarged(inpainted, "example-inpainted.png"))
    return written


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="sdgate-examples-") as tmp:
        for path in asyncio.run(make(Path(tmp))):
            print(f"{path}  {path.stat().st_size} bytes")


if __name__ == "__main__":
    main()
