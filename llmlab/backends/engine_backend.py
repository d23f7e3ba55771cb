"""A running :class:`~llmlab.engine.Engine` seen through the :class:`Backend` interface::

    from llmlab.engine import Engine
    from llmlab.backends.engine_backend import EngineBackend
    with Engine(parallel=4) as engine:
        model = EngineBackend(engine)
        QuestionAnswerer(store, model=model).ask("...")   # batched with the engine's other work

The server hands this to document QA (``llmlab.rag.QuestionAnswerer`` takes a Backend), so
those requests go through the same engine and queue as the API and are decoded together
with them. Calls block, so they are made from worker threads. The engine is not owned:
:meth:`close` leaves it running.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from llmlab.backends.base import Backend, Chunk, GenerationParams, Message, Result, collect
from llmlab.engine import Engine, EngineError, Request


def _as_is(error: EngineError) -> Exception:
    return error


class EngineBackend(Backend):
    """The Backend interface on an engine that others share.

    Args:
        engine: the engine, or a callable that returns the one to use now (a server replaces
            an engine that failed, and its callable raises while none is ready).
        errors: turns an :class:`~llmlab.engine.EngineError` (a full queue, a closed or
            failed engine) into the exception to raise instead; by default it is raised as is.
    """

    name = "engine"

    def __init__(
        self,
        engine: Engine | Callable[[], Engine],
        errors: Callable[[EngineError], Exception] = _as_is,
    ):
        self._get = engine if callable(engine) else (lambda: engine)
        self._errors = errors

    @property
    def engine(self) -> Engine:
        """The engine requests go to now."""
        return self._get()

    def _stream(self, request: Request) -> Iterator[Chunk]:
        engine = self.engine
        try:
            handle = engine.submit(request)
        except EngineError as exc:
            raise self._errors(exc) from exc
        try:
            yield from handle.stream()
        except EngineError as exc:
            raise self._errors(exc) from exc
        finally:
            handle.cancel()  # no-op once finished; frees the slot if the caller stopped reading

    def chat(self, messages: list[Message], **params: Any) -> Result:
        return collect(self.stream_chat(messages, **params))

    def stream_chat(self, messages: list[Message], **params: Any) -> Iterator[Chunk]:
        return self._stream(
            Request(messages=messages, params=GenerationParams.from_kwargs(**params))
        )

    def complete(self, prompt: str, **params: Any) -> Result:
        return collect(
            self._stream(Request(prompt=prompt, params=GenerationParams.from_kwargs(**params)))
        )

    def count_tokens(self, text: str) -> int:
        try:
            return len(self.engine.prompt_tokens(Request(prompt=text)))
        except EngineError as exc:
            raise self._errors(exc) from exc

    def prompt_tokens(self, messages: list[Message]) -> int:
        try:
            return len(self.engine.prompt_tokens(Request(messages=messages)))
        except EngineError as exc:
            raise self._errors(exc) from exc

    def info(self) -> dict[str, Any]:
        return {"backend": "engine", "model": self.engine.spec.ref}

    def close(self) -> None:
        """Nothing to free: whoever made the engine closes it."""

    @property
    def context_length(self) -> int:
        return self.engine.n_ctx
