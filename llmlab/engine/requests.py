"""What a caller hands the engine and gets back: :class:`Request`, :class:`Handle` and the errors."""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from llmlab.backends.base import (
    BackendError,
    Chunk,
    GenerationParams,
    Message,
    Result,
    Timings,
    Usage,
)

if TYPE_CHECKING:
    from llmlab.sampling import SlotSampler


class EngineError(BackendError):
    """A request could not run (engine closed, decode failure); the message says why."""


class QueueFullError(EngineError):
    """Too many requests are waiting; try again later (a server answers 429 or 503)."""


@dataclass
class Request:
    """What to generate: a chat (``messages``, rendered with the model's template) or raw ``prompt``.

    ``logprobs``: ``None`` (off) or 0..20: each generated token comes with its log-probability
    and the ``logprobs`` most likely tokens at that step. They are the log-softmax of the
    model's raw logits for the step, before the repeat penalty, the grammar, temperature,
    top-k and top-p (so they describe the model, not the sampler). Off costs nothing.

    ``lora``: ``{"adapter name": scale}`` of adapters the engine loaded
    (``Engine(adapters=...)``); ``None`` or ``{}`` runs the base model.

    ``tools``: OpenAI tool entries handed to the chat template (for a template that renders
    tools itself, see :mod:`llmlab.tool_formats`); ``None``: the template gets none.
    """

    messages: list[Message] | None = None
    prompt: str | None = None
    params: GenerationParams = field(default_factory=GenerationParams)
    grammar: str | None = None  # GBNF text (rule ``root``): only tokens it allows are sampled
    logprobs: int | None = None
    lora: dict[str, float] | None = None
    tools: list[dict] | None = None

    @classmethod
    def chat(
        cls,
        messages: list[Message],
        grammar: str | None = None,
        *,
        logprobs: int | None = None,
        lora: dict[str, float] | None = None,
        tools: list[dict] | None = None,
        **params,
    ) -> Request:
        """A chat request, e.g. ``Request.chat(msgs, max_tokens=64, temperature=0)``."""
        return cls(
            messages=messages,
            params=GenerationParams.from_kwargs(**params),
            grammar=grammar,
            logprobs=logprobs,
            lora=lora,
            tools=tools,
        )

    @classmethod
    def completion(
        cls,
        prompt: str,
        grammar: str | None = None,
        *,
        logprobs: int | None = None,
        lora: dict[str, float] | None = None,
        **params,
    ) -> Request:
        """A raw-text continuation (no chat template)."""
        return cls(
            prompt=prompt,
            params=GenerationParams.from_kwargs(**params),
            grammar=grammar,
            logprobs=logprobs,
            lora=lora,
        )


MAX_LOGPROBS = 20  # the most alternatives a token may list (OpenAI's limit)

AdapterSet = tuple[tuple[str, float], ...]  # (name, scale) pairs, sorted; () is the base model


_DONE = object()  # end of a handle's chunk stream


class Handle:
    """A submitted request: stream its text, wait for its result, or cancel it."""

    def __init__(
        self,
        request_id: int,
        prompt_tokens: list[int],
        params: GenerationParams,
        on_chunk: Callable[[Chunk], None] | None,
        sampler: SlotSampler | None = None,
        *,
        logprobs: int | None = None,
        adapters: AdapterSet = (),
        index: int = 0,
    ):
        self.id = request_id
        self.prompt_tokens = prompt_tokens
        self.params = params
        self.sampler = sampler  # how its tokens are picked (llama.cpp's chain, its grammar)
        self.logprobs = logprobs
        self.adapters = adapters
        self.index = index  # which choice of its prompt (``Engine.submit_choices``)
        self.submitted = time.perf_counter()
        self._on_chunk = on_chunk
        self._chunks: queue.SimpleQueue = queue.SimpleQueue()
        self._done = threading.Event()
        self._cancel = threading.Event()
        self._result: Result | None = None
        self._error: EngineError | None = None
        self._callback_error: EngineError | None = None  # on_chunk raised: this request fails

    @property
    def done(self) -> bool:
        """True once the request has finished, failed or been cancelled."""
        return self._done.is_set()

    @property
    def cancelled(self) -> bool:
        """True if :meth:`cancel` was called."""
        return self._cancel.is_set()

    @property
    def seconds(self) -> float:
        """Seconds from admission to finish (0 until it finishes)."""
        return self._result.timings.total_seconds if self._result else 0.0

    def cancel(self) -> None:
        """Stop generating; the slot is freed at the next step and the result ends ``interrupted``."""
        self._cancel.set()

    def stream(self) -> Iterator[Chunk]:
        """Yield text chunks as they are decoded; the last has ``finish_reason``, ``usage``, ``timings``.

        Raises:
            EngineError: the request failed.
        """
        while True:
            item = self._chunks.get()
            if item is _DONE:
                break
            yield item
        if self._error:
            raise self._error

    def result(self, timeout: float | None = None) -> Result:
        """Wait for the whole reply.

        Raises:
            TimeoutError: not finished within ``timeout`` seconds.
            EngineError: the request failed.
        """
        if not self._done.wait(timeout):
            raise TimeoutError(f"request {self.id} still running after {timeout} s")
        if self._error:
            raise self._error
        return self._result

    # --- called by the engine thread ------------------------------------------------

    def _emit(self, chunk: Chunk) -> None:
        chunk.index = self.index
        self._chunks.put(chunk)
        if self._callback_error is None:
            self._call_back(chunk)

    def _call_back(self, chunk: Chunk) -> None:
        """Hand ``chunk`` to ``on_chunk``; if it raises, this request (only) fails: it is
        cancelled, so the engine frees its slot at the next step."""
        if self._on_chunk is None:
            return
        try:
            self._on_chunk(chunk)
        except Exception as exc:
            if self._callback_error is None:
                self._callback_error = EngineError(
                    f"request {self.id} failed: its on_chunk callback raised "
                    f"{type(exc).__name__}: {exc}"
                )
                self._cancel.set()

    def _complete(self, result: Result) -> None:
        """End with ``result`` (its last chunk carries the finish reason, usage and timings),
        or with the callback's error if ``on_chunk`` raised."""
        if self._callback_error is None:
            self._emit(Chunk("", result.finish_reason, result.usage, result.timings))
        if self._callback_error is not None:
            self._finish(None, self._callback_error)
        else:
            self._finish(result)

    def _finish(self, result: Result | None, error: EngineError | None = None) -> None:
        if self.sampler is not None:
            self.sampler.free()
        self._result, self._error = result, error
        if error is not None:
            self._call_back(Chunk("", "error", index=self.index))
        self._chunks.put(_DONE)
        self._done.set()


def unstarted(reason: str, handle: Handle) -> Result:
    """The result of a request that ended before it decoded anything."""
    logprobs = [] if handle.logprobs is not None else None
    return Result("", reason, Usage(len(handle.prompt_tokens), 0), Timings(), logprobs)
