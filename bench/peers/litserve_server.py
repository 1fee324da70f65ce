"""LitServe serving the pipeline with its dynamic batching on, as its documentation shows.

``predict`` gets up to ``max_batch_size`` decoded requests at once (LitServe collects them for at
most ``batch_timeout`` seconds) and runs them as one pipeline call; each image keeps its own
generator. The answer is the image as base64 JPEG in JSON, as LitServe's image examples do.

    python -m bench.peers.litserve_server --model PIPELINE_DIR --port 8002
"""

from __future__ import annotations

import argparse
import base64
import io
from typing import Any

import litserve as ls

MAX_BATCH_SIZE = 8
BATCH_TIMEOUT_S = 0.05


class DiffusionAPI(ls.LitAPI):  # type: ignore[misc]  # litserve ships no type hints
    """Load once in ``setup``; decode → predict (batched) → encode for each request."""

    def __init__(self, model_dir: str, **kwargs: Any):
        super().__init__(**kwargs)
        self.model_dir = model_dir

    def setup(self, device: str) -> None:
        import torch
        from diffusers import StableDiffusionPipeline

        self.torch = torch
        self.pipe = StableDiffusionPipeline.from_pretrained(self.model_dir).to(device)
        self.pipe.set_progress_bar_config(disable=True)

    # No annotation on ``request``: LitServe reads it to build the route, and unannotated means the JSON body.
    def decode_request(self, request):  # type: ignore[no-untyped-def]
        return request

    def predict(self, batch: list[dict[str, Any]]) -> list[Any]:
        # The load sends one size per run; a batch of mixed sizes would need grouping first.
        first = batch[0]
        generators = [self.torch.Generator("cpu").manual_seed(int(r.get("seed", 0))) for r in batch]
        images: list[Any] = self.pipe(
            [r["prompt"] for r in batch],
            width=first.get("width", 512),
            height=first.get("height", 512),
            num_inference_steps=first.get("num_inference_steps", 4),
            guidance_scale=first.get("guidance_scale", 7.5),
            generator=generators,
        ).images
        return images

    def encode_response(self, image: Any) -> dict[str, str]:
        buf = io.BytesIO()
        image.save(buf, format="JPEG", quality=90)
        return {"image": base64.b64encode(buf.getvalue()).decode("ascii")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--model", required=True, help="A diffusers pipeline directory.")
    parser.add_argument("--port", type=int, default=8002)
    args = parser.parse_args()
    api = DiffusionAPI(args.model, max_batch_size=MAX_BATCH_SIZE, batch_timeout=BATCH_TIMEOUT_S)
    # timeout: as sdgate's SDGATE_SYNC_TIMEOUT in the suite, long enough that a slow machine still gets answers.
    server = ls.LitServer(api, accelerator="cpu", timeout=600)
    server.run(host="127.0.0.1", port=args.port, generate_client_file=False, log_level="warning")


if __name__ == "__main__":
    main()
