"""The combined app: OpenAI-compatible API, document QA, batch jobs, metrics and the web page.

Built by a factory, so tests and notebooks can make as many as they like::

    from part5.combined_app import ServerSettings, create_app
    app = create_app(ServerSettings(parallel=2, api_key="secret"))
    # uvicorn.run(app, host="127.0.0.1", port=8000)   (scripts/server.py does this)

The chat model loads in the lifespan hook, in a worker thread: the server accepts
connections at once, ``GET /health`` says ``loading`` until the model is ready, and model
routes answer 503 with ``Retry-After`` until then. The same holds while a new engine loads
after a failed one (``recovering``); if none can be loaded, ``on_fatal`` gets the reason.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from pathlib import Path

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

from llmlab import registry
from part5.combined_app.cache import ResponseCache
from part5.combined_app.config import ServerSettings
from part5.combined_app.errors import install_handlers
from part5.combined_app.metrics import Metrics
from part5.combined_app.middleware import LabMiddleware
from part5.combined_app.models import ModelPool, read_models_file
from part5.combined_app.routes import (
    batches,
    documents,
    lora,
    openai_api,
    responses,
    system,
    tokens,
)
from part5.combined_app.schemas import install_openapi
from part5.combined_app.service import ModelService

STATIC = Path(__file__).resolve().parent / "static"
log = logging.getLogger("llmlab.server")


def create_app(
    settings: ServerSettings | None = None,
    on_fatal: Callable[[str], object] | None = None,
    spec: registry.ModelSpec | None = None,
) -> FastAPI:
    """A new app with its own model service, metrics and batch jobs (nothing loads until startup).

    Raises ``RegistryError`` or ``ValueError`` for a model, alias or models file that is wrong.

    ``spec``, if given, is the resolved entry to serve for ``settings.model`` (the server
    script passes the batch-friendly file ``llmlab.registry.batch_format`` chose); by
    default the catalog's file of ``settings.model`` is served.

    ``on_fatal(reason)`` is called if the engine fails and no new one can be loaded (the
    server script stops the process there); without it the app goes on answering 500s and
    ``/health`` shows the reason.
    """
    settings = settings or ServerSettings()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        service: ModelService = app.state.service
        jobs = app.state.batch_jobs
        jobs.update(batches.load_jobs(settings.batches_dir))
        loading = asyncio.get_running_loop().run_in_executor(None, service.load)
        loading.add_done_callback(_log_load_result(service))
        loading.add_done_callback(_resume_batches(jobs, service, settings.retry_after))
        reaper = asyncio.create_task(app.state.models.reap_forever())
        try:
            yield
        finally:
            reaper.cancel()
            await app.state.models.close()
            batches.stop_jobs(jobs)
            with contextlib.suppress(Exception):
                await asyncio.wait_for(asyncio.shield(loading), timeout=60)
            service.close()
            batches.join_jobs(jobs)

    app = FastAPI(
        title="Local LLM Lab server",
        description="OpenAI-compatible API, document QA and batch jobs on a local model.",
        version="1.0",
        lifespan=lifespan,
    )
    service = ModelService(settings, spec)
    app.state.settings = settings
    app.state.service = service
    app.state.metrics = Metrics(queue_depth=service.queue_depth, busy_slots=service.busy_slots)
    app.state.cache = ResponseCache(
        settings.cache_entries, settings.cache_ttl, settings.cache_bytes
    )
    app.state.metrics.watch_cache(app.state.cache)
    models_file = read_models_file(settings.models_file) if settings.models_file else None
    app.state.models = ModelPool(settings, service, app.state.metrics, models_file)
    app.state.models.check()
    service.on_rejected = app.state.metrics.rejected.inc
    service.on_engine_failure = app.state.metrics.engine_failures.inc
    if on_fatal is not None:
        service.on_fatal = on_fatal
    app.state.batch_jobs = {}

    install_handlers(app)
    install_openapi(app, settings)
    routers = (
        system.router,
        openai_api.router,
        responses.router,
        tokens.router,
        documents.router,
        batches.router,
        lora.router,
    )
    for router in routers:
        app.include_router(router)

    @app.get("/", include_in_schema=False)
    async def index() -> FileResponse:
        return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache"})

    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    # Added last, so it runs first: the key and size checks see every request.
    app.add_middleware(LabMiddleware, settings=lambda: settings, metrics=lambda: app.state.metrics)
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["*"],
            allow_headers=["*"],
            expose_headers=["Retry-After"],
        )
    return app


def _resume_batches(jobs: dict, service: ModelService, retry_after: float):
    """Once the model is ready, resume the batch jobs an earlier server run left unfinished."""

    def done(future: asyncio.Future) -> None:
        if not future.cancelled() and future.exception() is None:
            batches.resume_jobs(jobs, service, retry_after)

    return done


def _log_load_result(service: ModelService):
    def done(future: asyncio.Future) -> None:
        if future.exception() is not None:
            log.error("The model could not be loaded: %s", service.error)
        else:
            log.info("Model %s ready (%s slots)", service.model_id, service.settings.parallel)

    return done
