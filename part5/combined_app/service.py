"""The models behind the app: the chat engine every request shares, and embedding models.

The lifespan hook calls :meth:`ModelService.load` in a worker thread, so ``/health`` says
``loading`` until the chat model is ready. Routes then submit generations, which the
engine decodes together (continuous batching), and read them as async iterators::

    generation = service.submit(messages=[{"role": "user", "content": "Hi"}], params=params)
    async for chunk in generation:        # llmlab Chunk objects; the last has usage
        ...
    generation.cancel()                   # frees the engine slot (client went away)
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

from llmlab import registry
from llmlab.backends.base import (
    Backend,
    BackendError,
    Chunk,
    ContextOverflowError,
    GenerationParams,
    Message,
    Result,
    collect,
)
from llmlab.engine import Engine, EngineError, Handle, QueueFullError, Request
from llmlab.settings import get_settings
from part5.combined_app.config import ServerSettings
from part5.combined_app.errors import APIError


class Generation:
    """One submitted request, read from asyncio. Iterate for chunks; :meth:`cancel` frees its slot.

    The engine calls :meth:`_put` on its own thread with every chunk; the chunk is handed
    to the event loop, so no thread waits per request and a slow model blocks nobody.
    """

    def __init__(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue[Chunk] = asyncio.Queue()
        self._done = False
        self.handle: Handle | None = None

    def _put(self, chunk: Chunk) -> None:
        try:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, chunk)
        except RuntimeError:  # the event loop has closed (server shutting down)
            self.cancel()

    async def __aiter__(self) -> AsyncIterator[Chunk]:
        while not self._done:
            chunk = await self._queue.get()
            if chunk.finish_reason == "error":  # the engine failed this request
                self._done = True
                try:
                    await asyncio.to_thread(self.handle.result, 10)
                except Exception as exc:
                    raise _as_api_error(exc) from exc
                raise APIError(500, "The model failed on this request.", code="engine_error")
            if chunk.finish_reason is not None:
                self._done = True
            yield chunk

    def cancel(self) -> None:
        """Stop decoding and free the slot (no effect once finished)."""
        if self.handle is not None:
            self.handle.cancel()


def _as_api_error(exc: BaseException) -> BaseException:
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, ContextOverflowError):
        return APIError(400, str(exc), param="messages", code="context_length_exceeded")
    if isinstance(exc, (EngineError, BackendError)):
        return APIError(500, f"The model failed: {exc}", code="engine_error")
    return exc


class ModelService:
    """The served chat model (on the shared engine) and the embedding models, loaded once."""

    def __init__(self, settings: ServerSettings):
        self.settings = settings
        self.status = "loading"
        self.error: str | None = None
        self.spec: registry.ModelSpec | None = None
        self.engine: Engine | None = None
        self._embedders: dict[str, Any] = {}
        self._embed_lock = threading.Lock()
        self.on_rejected: Callable[[], Any] = lambda: None  # the app counts 503s here

    # --- lifecycle ------------------------------------------------------------------

    def load(self) -> None:
        """Resolve and load the chat model into a new engine (blocking; seconds)."""
        try:
            self.spec = registry.resolve(self.settings.model)
            if "chat" not in self.spec.capabilities:
                raise registry.RegistryError(
                    f"{self.spec.ref} is not a chat model (capabilities: "
                    f"{', '.join(self.spec.capabilities)}). Serve a chat model with --model."
                )
            self.engine = Engine(
                self.spec,
                parallel=self.settings.parallel,
                n_ctx=self.settings.n_ctx,
                threads=self.settings.threads,
                max_queue=self.settings.queue_size,
            )
            self.status = "ok"
        except Exception as exc:  # reported by /health and every model route
            self.error = str(exc)
            self.status = "error"
            raise

    def close(self) -> None:
        """Stop the engine: what runs or waits ends ``interrupted``, and memory is freed."""
        if self.engine is not None:
            self.engine.close()

    def require_ready(self) -> Engine:
        """The engine, or a 503 that says the model is still loading (or failed to)."""
        if self.status == "ok" and self.engine is not None:
            return self.engine
        if self.status == "loading":
            raise APIError(
                503,
                "The model is still loading; try again in a few seconds (GET /health says ok when ready).",
                code="model_loading",
                headers={"Retry-After": str(self.settings.retry_after)},
            )
        raise APIError(
            500, f"The model could not be loaded: {self.error}", code="model_load_failed"
        )

    # --- names ----------------------------------------------------------------------

    @property
    def model_id(self) -> str:
        """The name clients use for the chat model (its catalog name)."""
        return (
            self.spec.name if self.spec else (self.settings.model or get_settings().default_model)
        )

    def check_chat_model(self, name: str | None) -> None:
        """Accept the served model's name or ``name:tag`` (or no name); 404 for anything else."""
        if name in (None, "", self.model_id) or (self.spec and name == self.spec.ref):
            return
        raise APIError(
            404,
            f"Unknown model {name!r}: this server serves {self.model_id!r} for chat. "
            "GET /v1/models lists what it serves; start it with --model NAME for another.",
            param="model",
            code="model_not_found",
        )

    # --- limits ---------------------------------------------------------------------

    def prompt_ids(
        self, messages: list[Message] | None = None, prompt: str | None = None
    ) -> list[int]:
        """Token ids the model will read for ``messages`` (chat template) or a raw ``prompt``."""
        return self.require_ready().prompt_tokens(Request(messages=messages, prompt=prompt))

    def check_limits(self, prompt_tokens: int, max_tokens: int, param: str) -> None:
        """400 when ``max_tokens`` or the prompt is over the server's limits."""
        limit = self.settings.max_tokens_limit
        if max_tokens > limit:
            raise APIError(
                400,
                f"max_tokens is {max_tokens}, over this server's limit of {limit}. Ask for fewer.",
                param="max_tokens",
                code="max_tokens_too_large",
            )
        context = self.require_ready().n_ctx
        allowed = self.settings.max_prompt_tokens or context
        if prompt_tokens > allowed or prompt_tokens + max_tokens > context:
            raise APIError(
                400,
                f"The prompt is {prompt_tokens} tokens; with max_tokens {max_tokens} that is "
                f"{prompt_tokens + max_tokens}, and this server allows prompts up to {allowed} "
                f"tokens and {context} tokens in all. Shorten the prompt or the history, or ask "
                "for fewer max_tokens.",
                param=param,
                code="context_length_exceeded",
            )

    # --- generation -----------------------------------------------------------------

    def submit(
        self,
        *,
        params: GenerationParams,
        messages: list[Message] | None = None,
        prompt: str | None = None,
        grammar: str | None = None,
    ) -> Generation:
        """Queue one generation on the shared engine (``grammar``: GBNF the reply must follow);
        503 with Retry-After when the queue is full."""
        engine = self.require_ready()
        generation = Generation()
        try:
            generation.handle = engine.submit(
                Request(messages=messages, prompt=prompt, params=params, grammar=grammar),
                on_chunk=generation._put,
            )
        except ContextOverflowError as exc:
            raise _as_api_error(exc) from exc
        except ValueError as exc:  # an empty prompt
            raise APIError(400, f"Nothing to answer: {exc}.", param="prompt") from exc
        except QueueFullError as exc:
            self.on_rejected()
            raise APIError(
                503,
                f"The server is busy: all {engine.parallel} slots are decoding and "
                f"{self.settings.queue_size} requests are waiting. Retry after "
                f"{self.settings.retry_after} s.",
                code="queue_full",
                headers={"Retry-After": str(self.settings.retry_after)},
            ) from exc
        return generation

    def queue_depth(self) -> int:
        """Requests waiting for a slot."""
        return self.engine.queued if self.engine else 0

    def busy_slots(self) -> int:
        """Slots decoding now."""
        return self.engine.active if self.engine else 0

    def chat_backend(self) -> Backend:
        """The engine behind the :class:`Backend` interface (for llmlab.rag's QuestionAnswerer)."""
        return EngineBackend(self)

    # --- embeddings -----------------------------------------------------------------

    def embedder(self, name: str | None) -> Any:
        """A loaded embedding model by catalog name (default: the lab's); 404 if unknown."""
        wanted = name or self.settings.embedding_model or get_settings().embedding_model
        try:
            spec = registry.find(wanted)
        except registry.UnknownModelError as exc:
            raise APIError(404, str(exc), param="model", code="model_not_found") from exc
        if "embeddings" not in spec.capabilities:
            raise APIError(
                404,
                f"{spec.ref} is not an embedding model. Use {self.embedding_model_id} for /v1/embeddings.",
                param="model",
                code="model_not_found",
            )
        from llmlab.rag.embeddings import get_embedder

        with self._embed_lock:  # one load at a time; later calls reuse it
            if spec.ref not in self._embedders:
                embedder = get_embedder(spec.ref)
                embedder.model  # noqa: B018 - load the weights now, inside the lock
                self._embedders[spec.ref] = embedder
        return self._embedders[spec.ref]

    @property
    def embedding_model_id(self) -> str:
        """The default embedding model's catalog name."""
        return self.settings.embedding_model or get_settings().embedding_model


class EngineBackend(Backend):
    """The shared engine seen through the :class:`Backend` interface, from worker threads.

    Document QA (``llmlab.rag.QuestionAnswerer``) takes a Backend; this one routes its
    requests through the same engine and queue as the API, so they are batched together.
    """

    name = "engine"

    def __init__(self, service: ModelService):
        self.service = service

    def _stream(self, **request: Any) -> Iterator[Chunk]:
        engine = self.service.require_ready()
        try:
            handle = engine.submit(Request(**request))
        except QueueFullError as exc:
            raise APIError(
                503,
                "The server is busy; retry in a few seconds.",
                code="queue_full",
                headers={"Retry-After": str(self.service.settings.retry_after)},
            ) from exc
        try:
            yield from handle.stream()
        finally:
            handle.cancel()

    def chat(self, messages: list[Message], **params: Any) -> Result:
        return collect(self.stream_chat(messages, **params))

    def stream_chat(self, messages: list[Message], **params: Any) -> Iterator[Chunk]:
        return self._stream(messages=messages, params=GenerationParams.from_kwargs(**params))

    def complete(self, prompt: str, **params: Any) -> Result:
        return collect(self._stream(prompt=prompt, params=GenerationParams.from_kwargs(**params)))

    def count_tokens(self, text: str) -> int:
        return len(self.service.prompt_ids(prompt=text))

    def info(self) -> dict[str, Any]:
        return {"backend": "engine", "model": self.service.spec.ref if self.service.spec else None}

    def close(self) -> None:
        """Nothing to free: the service owns the engine."""

    @property
    def context_length(self) -> int:
        return self.service.require_ready().n_ctx
