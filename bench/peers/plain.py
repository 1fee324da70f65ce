"""The plain pattern: a FastAPI route that calls the diffusers pipeline under a lock.

This is the server most Stable Diffusion tutorials show: the pipeline is loaded once at import, a
synchronous route runs it (FastAPI runs ``def`` routes in its thread pool), a lock keeps two
requests from using the pipeline at once, and the answer is the JPEG itself.

    python -m bench.peers.plain --model PIPELINE_DIR --port 8001
"""

from __future__ import annotations

import argparse
import io
import threading

import torch
import uvicorn
from diffusers import StableDiffusionPipeline
from fastapi import FastAPI, Response
from pydantic import BaseModel


class GenerateRequest(BaseModel):
    prompt: str
    width: int = 512
    height: int = 512
    num_inference_steps: int = 4
    guidance_scale: float = 7.5
    seed: int = 0


def create_app(model_dir: str) -> FastAPI:
    """The app around one pipeline loaded from ``model_dir``."""
    pipe = StableDiffusionPipeline.from_pretrained(model_dir).to("cpu")
    pipe.set_progress_bar_config(disable=True)
    lock = threading.Lock()
    app = FastAPI()

    @app.get("/health")
    def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.post("/generate")
    def generate(req: GenerateRequest) -> Response:
        generator = torch.Generator("cpu").manual_seed(req.seed)
        with lock:
            image = pipe(
                req.prompt,
                width=req.width,
                height=req.height,
                num_inference_steps=req.num_inference_steps,
                guidance_scale=req.guidance_scale,
                generator=generator,
            ).images[0]
        buf = io.BytesIO()
        image.save(buf, format="JPEG", quality=90)
        return Response(buf.getvalue(), media_type="image/jpeg")

    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--model", required=True, help="A diffusers pipeline directory.")
    parser.add_argument("--port", type=int, default=8001)
    args = parser.parse_args()
    uvicorn.run(create_app(args.model), host="127.0.0.1", port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
