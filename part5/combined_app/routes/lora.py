"""``GET /lora-adapters``: the LoRA adapters the served model has loaded (``--lora NAME=PATH``),
in llama.cpp server's shape (``id``, ``path``, ``scale``) plus the ``name`` a request uses::

    curl http://127.0.0.1:8000/lora-adapters
    [{"id": 0, "name": "json-qa", "path": "runs/json-qa/json-qa.lora.gguf", "scale": 0.0}]

``scale`` is 0: an adapter applies only to the requests that ask for it.
"""

from __future__ import annotations

from fastapi import APIRouter, Request
from pydantic import BaseModel

from part5.combined_app.schemas import TextRoute

router = APIRouter(tags=["system"], route_class=TextRoute)


class LoraAdapter(BaseModel):
    """One loaded adapter."""

    id: int
    name: str
    path: str
    scale: float = 0.0


@router.get("/lora-adapters")
async def lora_adapters(request: Request) -> list[LoraAdapter]:
    """The adapters loaded on the served model, in the order of their ids (empty if none)."""
    adapters = request.app.state.settings.lora
    return [LoraAdapter(id=i, name=n, path=p) for i, (n, p) in enumerate(adapters.items())]
