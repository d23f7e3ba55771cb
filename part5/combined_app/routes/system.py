"""``GET /health`` (no key needed) and ``GET /metrics`` (Prometheus text)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse, PlainTextResponse
from pydantic import BaseModel

from part5.combined_app.schemas import TextRoute

router = APIRouter(tags=["system"], route_class=TextRoute)


class Health(BaseModel):
    """What ``/health`` answers, whatever its status."""

    status: str
    model: str
    parallel: int | None = None
    busy_slots: int | None = None
    queue_depth: int | None = None
    error: str | None = None


_HEALTH = {
    200: {"model": Health, "description": "The model is loaded and answers."},
    500: {"model": Health, "description": "The model failed to load (see error)."},
    503: {"model": Health, "description": "The model is still loading."},
}


@router.get("/health", responses=_HEALTH)
async def health(request: Request) -> JSONResponse:
    """``ok`` (200) when the model can answer; ``loading`` (503) while it loads, ``recovering``
    (503, with the failure in ``error``) while a new engine replaces a failed one, ``error``
    (500, with the reason) if it could not be loaded."""
    service = request.app.state.service
    body: dict[str, Any] = {"status": service.status, "model": service.model_id}
    if service.engine is not None:
        body.update(
            parallel=service.engine.parallel,
            busy_slots=service.busy_slots(),
            queue_depth=service.queue_depth(),
        )
    if service.error:
        body["error"] = service.error
    status = {"ok": 200, "loading": 503, "recovering": 503}.get(service.status, 500)
    headers = {"Retry-After": str(service.settings.retry_after)} if status == 503 else None
    return JSONResponse(body, status, headers=headers)


@router.get("/metrics", response_class=PlainTextResponse)
async def metrics(request: Request) -> Response:
    """Requests, tokens, queue depth, busy slots, engine failures and latency histograms, for
    Prometheus."""
    payload, content_type = request.app.state.metrics.render()
    return Response(payload, media_type=content_type)
