"""The models behind the app: the chat engine every request shares, and embedding models.

The lifespan hook calls :meth:`ModelService.load` in a worker thread, so ``/health`` says
``loading`` until the chat model is ready. Routes then submit generations, which the
engine decodes together (continuous batching), and read them as async iterators::

    generation = await service.submit(messages=[{"role": "user", "content": "Hi"}], params=params)
    async for chunk in generation:        # llmlab Chunk objects; the last has usage
        ...
    generation.cancel()                   # frees the engine slot (client went away)

Prompts are tokenized in worker threads (under the engine's model lock), never on the
event loop. If the engine fails (``llama_decode`` returned an error), ``/health`` says
``recovering`` (503) with the reason while a new engine loads; after
``RELOAD_ATTEMPTS`` failed loads the service is ``error`` and ``on_fatal`` is called
with the reason (``scripts/server.py`` then stops with exit code 1).
"""

from __future__ import annotations

import asyncio
import collections
import logging
import math
import threading
from collections.abc import AsyncIterator, Callable
from typing import Any

from starlette.concurrency import run_in_threadpool

from llmlab import registry
from llmlab.backends.base import (
    Backend,
    BackendError,
    Chunk,
    ContextOverflowError,
    GenerationParams,
    Message,
)
from llmlab.backends.engine_backend import EngineBackend
from llmlab.engine import Engine, EngineError, Handle, QueueFullError, Request
from llmlab.settings import get_settings
from llmlab.tool_formats import GENERIC, ToolFormat, tool_format
from part5.combined_app.config import ServerSettings
from part5.combined_app.errors import APIError

log = logging.getLogger("llmlab.server")

# After an engine failure: how many times a new engine is loaded, and the pause between tries.
RELOAD_ATTEMPTS = 3
RELOAD_PAUSE_SECONDS = 1.0
ENGINE_POLL_SECONDS = 0.2  # how often a batch job waiting for a new engine looks again


class Mailbox:
    """Chunks from the engine thread to the event loop: one wake-up for all that wait, and
    at most one delivery per ``interval`` seconds.

    ``call_soon_threadsafe`` writes to the loop's self-pipe, and the woken loop then takes
    the GIL from the decode thread and a core from llama.cpp's threads. So chunks wait
    here, and the loop is woken once for every chunk of every stream that arrives before it
    runs (a decode step of 8 sequences is one wake-up, not 8). On top of that, a delivery
    comes no sooner than ``interval`` after the previous one: each stream's chunks of that
    time reach the client as one event, so the loop, the socket and the client each do
    their per-event work once for several tokens (``interval=0``: every chunk as soon as
    the loop runs). A chunk that arrives after a quiet ``interval`` (a first token, say) is
    delivered at once.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, interval: float = 0.0) -> None:
        self.loop = loop
        self.interval = interval
        self._items: collections.deque[tuple[Generation, Chunk]] = collections.deque()
        self._woken = False  # a wake-up is on its way (set and cleared under the GIL)
        self._delivered_at = -math.inf  # loop time of the last delivery

    def put(self, generation: Generation, chunk: Chunk) -> None:
        """Hand ``chunk`` to ``generation`` (called on the engine thread)."""
        self._items.append((generation, chunk))  # before the test: a wake-up under way sees it
        if self._woken:
            return
        self._woken = True
        try:
            self.loop.call_soon_threadsafe(self._woke)
        except RuntimeError:  # the event loop has closed (server shutting down)
            generation.cancel()

    def _woke(self) -> None:
        wait = self._delivered_at + self.interval - self.loop.time()
        if wait > 0:
            self.loop.call_later(wait, self._deliver)
        else:
            self._deliver()

    def _deliver(self) -> None:
        self._woken = False
        self._delivered_at = self.loop.time()
        while self._items:
            generation, chunk = self._items.popleft()
            generation._arrived(chunk)


class Generation:
    """One submitted request, read from asyncio. Iterate for chunks; :meth:`cancel` frees its slot.

    The engine calls :meth:`_put` on its own thread with every chunk; the chunk reaches the
    event loop through a :class:`Mailbox` (shared by the requests of one service), so no
    thread waits per request and a slow model blocks nobody. The reader takes every chunk
    that has arrived at once and hands them on as one (their texts joined), so a slow
    reader gets fewer, longer pieces instead of falling behind.
    """

    def __init__(self, mailbox: Mailbox | None = None) -> None:
        self._mailbox = mailbox or Mailbox(asyncio.get_running_loop())
        self._chunks: list[Chunk] = []  # touched on the event loop only
        self._ready = asyncio.Event()
        self._done = False
        self.handle: Handle | None = None

    def _put(self, chunk: Chunk) -> None:
        self._mailbox.put(self, chunk)

    def _arrived(self, chunk: Chunk) -> None:
        self._chunks.append(chunk)
        self._ready.set()

    async def _next(self) -> list[Chunk]:
        """Every chunk that has arrived, waiting for one if none has."""
        while not self._chunks:
            self._ready.clear()
            await self._ready.wait()
        taken, self._chunks = self._chunks, []
        return taken

    async def __aiter__(self) -> AsyncIterator[Chunk]:
        while not self._done:
            chunks = await self._next()
            last = chunks[-1]
            if last.finish_reason == "error":  # the engine failed this request
                self._done = True
                if len(chunks) > 1:
                    yield merge_chunks(chunks[:-1])
                try:
                    await asyncio.to_thread(self.handle.result, 10)
                except Exception as exc:
                    raise _as_api_error(exc) from exc
                raise APIError(500, "The model failed on this request.", code="engine_error")
            if last.finish_reason is not None:
                self._done = True
            yield merge_chunks(chunks)

    def cancel(self) -> None:
        """Stop decoding and free the slot (no effect once finished)."""
        if self.handle is not None:
            self.handle.cancel()


def merge_chunks(chunks: list[Chunk]) -> Chunk:
    """One chunk for several that came in a row from one sequence: their texts and logprobs
    joined, and the last one's finish reason, usage and timings (only the last has them)."""
    if len(chunks) == 1:
        return chunks[0]
    last = chunks[-1]
    logprobs = [entry for chunk in chunks for entry in chunk.logprobs or []]
    return Chunk(
        "".join(chunk.text for chunk in chunks),
        last.finish_reason,
        last.usage,
        last.timings,
        logprobs if any(chunk.logprobs is not None for chunk in chunks) else None,
        last.index,
    )


def _as_api_error(exc: BaseException) -> BaseException:
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, ContextOverflowError):
        return APIError(400, str(exc), param="messages", code="context_length_exceeded")
    if isinstance(exc, (EngineError, BackendError)):
        return APIError(
            500,
            f"The model failed: {exc}. Retry in a few seconds (GET /health says ok when the "
            "server is ready again).",
            code="engine_error",
        )
    return exc


class ModelService:
    """The served chat model (on the shared engine) and the embedding models, loaded once."""

    def __init__(self, settings: ServerSettings, spec: registry.ModelSpec | None = None):
        self.settings = settings
        self.status = "loading"
        self.error: str | None = None
        self.spec: registry.ModelSpec | None = None
        self._given_spec = spec  # resolved by the caller (server.py's batch-friendly choice)
        self.engine: Engine | None = None
        self.tool_format: ToolFormat = GENERIC  # how tools reach the model (its template's)
        self.require_chat = True  # extra models of a multi-model server may be completion-only
        self._stopping = threading.Event()
        self._recovery: threading.Thread | None = None
        self._chunk_mailbox: Mailbox | None = None
        self.on_rejected: Callable[[], Any] = lambda: None  # the app counts 503s here
        self.on_engine_failure: Callable[[], Any] = lambda: None  # ... and engine failures
        self.on_fatal: Callable[[str], Any] = lambda reason: None  # no engine could be reloaded

    # --- lifecycle ------------------------------------------------------------------

    def load(self) -> None:
        """Resolve and load the chat model into a new engine (blocking; seconds)."""
        try:
            self.spec = self._given_spec or registry.resolve(self.settings.model)
            if self.require_chat and "chat" not in self.spec.capabilities:
                raise registry.RegistryError(
                    f"{self.spec.ref} is not a chat model (capabilities: "
                    f"{', '.join(self.spec.capabilities)}). Serve a chat model with --model."
                )
            self.engine = self._new_engine()
            self.tool_format = tool_format(self.engine.chat_template)
            log.info("%s: tool calls in the %s format.", self.model_id, self.tool_format.name)
            self.status = "ok"
        except Exception as exc:  # reported by /health and every model route
            self.error = str(exc)
            self.status = "error"
            raise

    def _new_engine(self) -> Engine:
        return Engine(
            self.spec,
            parallel=self.settings.parallel,
            n_ctx=self.settings.n_ctx,
            threads=self.settings.threads,
            max_queue=self.settings.queue_size,
            on_failure=self._engine_failed,
            adapters=self.settings.lora,
        )

    def _engine_failed(self, error: EngineError) -> None:
        """The engine's decode failed (called on its thread): report it, reload in another."""
        self.status, self.error = "recovering", str(error)
        self.on_engine_failure()
        if self._stopping.is_set():
            return
        log.error("The model failed (%s); loading a new engine.", error)
        self._recovery = threading.Thread(
            target=self._recover, args=(self.engine,), name="llmlab-recover", daemon=True
        )
        self._recovery.start()

    def _recover(self, failed: Engine) -> None:
        """Free the failed engine and load a new one, up to ``RELOAD_ATTEMPTS`` times."""
        reason = self.error
        failed.close()
        problem = ""
        for attempt in range(1, RELOAD_ATTEMPTS + 1):
            if attempt > 1 and self._stopping.wait(RELOAD_PAUSE_SECONDS):
                return
            if self._stopping.is_set():
                return
            try:
                self.engine = self._new_engine()
            except Exception as exc:
                problem = str(exc)
                log.error(
                    "Loading a new engine failed (attempt %d of %d): %s",
                    attempt,
                    RELOAD_ATTEMPTS,
                    exc,
                )
                continue
            self.status, self.error = "ok", None
            log.info(
                "A new engine serves %s again (%s slots).", self.model_id, self.engine.parallel
            )
            return
        self.error = (
            f"The model failed ({reason}) and no new engine could be loaded in "
            f"{RELOAD_ATTEMPTS} attempts: {problem}. Restart the server."
        )
        self.status = "error"  # after the reason: whoever sees "error" reads this one
        log.critical("%s", self.error)
        self.on_fatal(self.error)

    def close(self) -> None:
        """Stop the engine: what runs or waits ends ``interrupted``, and memory is freed."""
        self._stopping.set()
        if self.engine is not None:
            self.engine.close()  # joins its decode thread: a reload it started is known now
        if self._recovery is not None:
            self._recovery.join()
        if self.engine is not None:
            self.engine.close()  # the engine a reload made (closing twice does nothing)

    def wait_for_engine(
        self, cancel: threading.Event, failed: Engine | None = None
    ) -> Engine | None:
        """The engine once the service is ready; after ``failed`` failed, the one loaded in
        its place. ``None`` if none will come (no engine could be loaded, the server is
        stopping) or ``cancel`` is set first. Blocking: batch jobs call it on their threads."""
        while not (cancel.is_set() or self._stopping.is_set()):
            engine = self.engine
            if self.status == "error":
                return None
            if self.status == "ok" and engine is not None and engine is not failed:
                return engine
            cancel.wait(ENGINE_POLL_SECONDS)
        return None

    def require_ready(self) -> Engine:
        """The engine, or a 503 that says the model is still loading or being reloaded
        (a 500 if it could not be loaded)."""
        if self.status == "ok" and self.engine is not None:
            return self.engine
        retry = {"Retry-After": str(self.settings.retry_after)}
        if self.status == "loading":
            raise APIError(
                503,
                "The model is still loading; try again in a few seconds (GET /health says ok when ready).",
                code="model_loading",
                headers=retry,
            )
        if self.status == "recovering":
            raise APIError(
                503,
                f"The model failed ({self.error}) and is being reloaded; try again in a few "
                "seconds (GET /health says ok when ready).",
                code="model_recovering",
                headers=retry,
            )
        raise APIError(
            500, f"The model could not be loaded: {self.error}", code="model_load_failed"
        )

    # --- names ----------------------------------------------------------------------

    @property
    def model_id(self) -> str:
        """The name clients use for the chat model: its catalog name, or ``name:tag`` when a
        version other than the name's default is served (a quantized or fine-tuned one)."""
        if self.spec is None:
            return self.settings.model or get_settings().default_model
        return self.spec.name if self.spec.default else self.spec.ref

    # --- limits ---------------------------------------------------------------------

    def tokenize(self, text: str, add_special: bool, parse_special: bool) -> list[int]:
        """Token ids of ``text`` with the model's tokenizer (llama.cpp's ``/tokenize`` rules:
        ``add_special`` adds BOS/EOS where the model wants them, ``parse_special`` reads
        control-token text as those tokens). Blocking: routes call it with ``run_in_threadpool``."""
        return self.require_ready().tokenize(text, add_bos=add_special, special=parse_special)

    def _known_tokens(self, tokens: list[int]) -> Engine:
        """The engine, once every id is in its vocabulary (else a 400 naming the first that is not)."""
        engine = self.require_ready()
        for index, token in enumerate(tokens):
            if not 0 <= token < engine.n_vocab:
                raise APIError(
                    400,
                    f"tokens[{index}] is {token}, not a token of {self.model_id} (its ids are "
                    f"0 to {engine.n_vocab - 1}).",
                    param="tokens",
                    code="invalid_token",
                )
        return engine

    def token_bytes(self, tokens: list[int]) -> list[bytes]:
        """The bytes of each token (control tokens rendered). Blocking, as :meth:`tokenize`."""
        engine = self._known_tokens(tokens)
        return [engine.token_bytes(token) for token in tokens]

    def detokenize(self, tokens: list[int]) -> str:
        """The text of ``tokens`` (bytes that are not whole characters become U+FFFD).
        Blocking, as :meth:`tokenize`."""
        try:
            return self._known_tokens(tokens).detokenize(tokens)
        except EngineError as exc:  # closed under us: a reload has begun
            raise self.unavailable(exc) from exc

    def unavailable(self, exc: EngineError) -> APIError:
        """The error to answer when the engine refused a request: 503 while a new engine
        loads (500 if none could be), else the engine's own error."""
        try:
            self.require_ready()
        except APIError as not_ready:
            return not_ready
        return _as_api_error(exc)

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

    async def submit(
        self,
        *,
        params: GenerationParams,
        messages: list[Message] | None = None,
        prompt: str | None = None,
        grammar: str | None = None,
    ) -> Generation:
        """Queue one generation on the shared engine (``grammar``: GBNF the reply must follow);
        503 with Retry-After when the queue is full. The prompt is tokenized in a worker thread."""
        return (
            await self.submit_choices(
                params=params, messages=messages, prompt=prompt, grammar=grammar
            )
        )[0]

    async def submit_choices(
        self,
        *,
        params: GenerationParams,
        messages: list[Message] | None = None,
        prompt: str | None = None,
        grammar: str | None = None,
        n: int = 1,
        logprobs: int | None = None,
        lora: dict[str, float] | None = None,
        tools: list[dict] | None = None,
        param: str = "messages",
    ) -> list[Generation]:
        """Queue ``n`` choices of one prompt (prefilled once), one :class:`Generation` each,
        with ``logprobs``, ``lora`` adapters and template ``tools`` as
        :class:`llmlab.engine.Request` takes them; errors as :meth:`submit`. The prompt is
        checked against :meth:`check_limits` (a 400 naming ``param``) once tokenized."""
        engine = self.require_ready()
        generations = [Generation(self._mailbox()) for _ in range(n)]
        request = Request(
            messages=messages,
            prompt=prompt,
            params=params,
            grammar=grammar,
            logprobs=logprobs,
            lora=lora,
            tools=tools,
        )

        def on_chunk(chunk: Chunk) -> None:
            generations[chunk.index]._put(chunk)

        def check_prompt(ids: list[int]) -> None:
            self.check_limits(len(ids), params.max_tokens, param)

        try:
            handles = await run_in_threadpool(
                engine.submit_choices, request, n, on_chunk=on_chunk, check_prompt=check_prompt
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
        except EngineError as exc:  # the engine failed or closed since require_ready
            raise self.unavailable(exc) from exc
        for generation, handle in zip(generations, handles, strict=True):
            generation.handle = handle
        return generations

    def _mailbox(self) -> Mailbox:
        """The mailbox of the running event loop (one for all of this service's requests)."""
        loop = asyncio.get_running_loop()
        if self._chunk_mailbox is None or self._chunk_mailbox.loop is not loop:
            self._chunk_mailbox = Mailbox(loop, self.settings.stream_interval)
        return self._chunk_mailbox

    def queue_depth(self) -> int:
        """Requests waiting for a slot."""
        return self.engine.queued if self.engine else 0

    def busy_slots(self) -> int:
        """Slots decoding now."""
        return self.engine.active if self.engine else 0

    def chat_backend(self) -> Backend:
        """The engine behind the :class:`Backend` interface (for llmlab.rag's QuestionAnswerer),
        its refusals and failures as the API answers them."""
        return EngineBackend(self.require_ready, errors=self._backend_error)

    def _backend_error(self, exc: EngineError) -> APIError:
        if isinstance(exc, QueueFullError):
            return APIError(
                503,
                "The server is busy; retry in a few seconds.",
                code="queue_full",
                headers={"Retry-After": str(self.settings.retry_after)},
            )
        return self.unavailable(exc)

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

        embedder = get_embedder(spec.ref)  # the one document uploads use too
        embedder.model  # noqa: B018 - load the weights now (the first call loads, later ones wait)
        return embedder

    def embed(self, embedder: Any, texts: list[str]) -> tuple[list[list[float]], int]:
        """Unit vectors for ``texts`` and how many tokens they are (blocking: routes call it
        with ``run_in_threadpool``). The embedder takes its own lock, so this and a document
        upload never use its tokenizer at once."""
        return embedder.embed_documents(texts), embedder.count_tokens(texts)

    @property
    def embedding_model_id(self) -> str:
        """The default embedding model's catalog name."""
        return self.settings.embedding_model or get_settings().embedding_model
