"""``GET /metrics`` in the Prometheus text format."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import PlainTextResponse

from sdgate.api.context import Ctx

router = APIRouter(tags=["health"])


@router.get("/metrics", response_class=PlainTextResponse)
async def metrics(ctx: Ctx) -> PlainTextResponse:
    """Engine counters: requests, pipeline calls (fewer than requests when batching works), images, batch sizes."""
    stats = ctx.backend.stats()
    lines = [
        "# HELP sdgate_ready Whether the model is loaded and warmed up.",
        "# TYPE sdgate_ready gauge",
        f"sdgate_ready {int(ctx.backend.ready())}",
    ]
    counters = {
        "requests": "Generation requests that reached the backend.",
        "pipeline_calls": "Pipeline calls made (one per batch).",
        "images": "Images generated.",
        "failures": "Requests failed by the backend.",
        "canceled": "Requests canceled before they finished.",
    }
    for name, help_text in counters.items():
        if name in stats:
            lines += [
                f"# HELP sdgate_{name}_total {help_text}",
                f"# TYPE sdgate_{name}_total counter",
                f"sdgate_{name}_total {stats[name]}",
            ]
    if "queue_depth" in stats:
        lines += [
            "# HELP sdgate_queue_depth Requests waiting for the engine.",
            "# TYPE sdgate_queue_depth gauge",
            f"sdgate_queue_depth {stats['queue_depth']}",
        ]
    if "batch_sizes" in stats:
        lines += [
            "# HELP sdgate_batches_total Pipeline calls by number of images in the batch.",
            "# TYPE sdgate_batches_total counter",
        ]
        lines += [f'sdgate_batches_total{{size="{size}"}} {count}' for size, count in stats["batch_sizes"].items()]
    return PlainTextResponse("\n".join(lines) + "\n", media_type="text/plain; version=0.0.4")
