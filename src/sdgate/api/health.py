"""Liveness and readiness."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from sdgate.api.context import Ctx
from sdgate.backends import BackendState

router = APIRouter(tags=["health"])


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    """The process is up and serving HTTP."""
    return {"status": "ok"}


@router.get("/readyz", responses={503: {"description": "model still loading or failed"}})
async def readyz(ctx: Ctx) -> JSONResponse:
    """200 once the model is loaded and warmed up; 503 before, or if it failed to load."""
    ready = ctx.backend.state() is BackendState.ready
    body: dict[str, Any] = {
        "status": "ready" if ready else "not_ready",
        "model": ctx.backend.model_name,
        "backend": ctx.backend.name,
        "detail": ctx.backend.status_detail(),
    }
    return JSONResponse(body, status_code=200 if ready else 503)
