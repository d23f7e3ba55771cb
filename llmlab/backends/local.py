"""What the in-process engines (llama.cpp, transformers) share: lazy loading, the request
loop with stop strings, context checks, timings, and the token-level API the lessons use.

An engine subclass only supplies loading, tokenizing, the chat template and a
``_steps`` generator that decodes one token per step::

    model = backends.load("smollm2-135m-instruct", backend="llama.cpp")
    ids = model.tokenize("Hello")
    logits = model.next_token_logits(ids)         # numpy float32, one per vocabulary entry
    model.token_piece(int(logits.argmax()))       # the greedy next token as text
"""

from __future__ import annotations

import sys
import threading
import time
from abc import abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from llmlab import structured
from llmlab.backends.base import (
    Backend,
    BackendError,
    Chunk,
    ContextOverflowError,
    GenerationParams,
    Message,
    Result,
    Timings,
    Usage,
    collect,
)
from llmlab.backends.text_stream import StopMatcher
from llmlab.registry import ModelSpec
from llmlab.settings import Settings, get_settings


@dataclass
class Step:
    """One decoding step of an engine: new text, completion tokens so far, and on the
    last step why it ended (``stop``: end-of-turn token, ``length``: ``max_tokens``)."""

    text: str
    tokens: int
    finish: str | None = None


class LocalBackend(Backend):
    """A model run in this process, loaded on first use and freed by :meth:`close`."""

    def __init__(
        self,
        spec: ModelSpec,
        *,
        n_ctx: int | None = None,
        threads: int | None = None,
        settings: Settings | None = None,
    ):
        if spec.path is None:
            raise ValueError("spec has no local path; pass a spec from registry.resolve()")
        self.spec = spec
        self.settings = settings or get_settings()
        self.n_ctx = n_ctx or self.settings.n_ctx
        self.threads = threads or self.settings.threads
        self._lock = threading.RLock()  # loading and tokenizing
        # One generation at a time per model. A plain Lock, because a stream may be resumed
        # from different threads (Starlette iterates sync generators in a thread pool).
        self._busy = threading.Lock()
        self._owner: int | None = None

    # --- engine hooks -------------------------------------------------------------

    @property
    @abstractmethod
    def loaded(self) -> bool:
        """Whether the weights are in memory now."""

    @abstractmethod
    def _load(self) -> None:
        """Load weights and tokenizer (called once before first use, and after close)."""

    @abstractmethod
    def _unload(self) -> None:
        """Drop every reference to the weights."""

    @abstractmethod
    def _encode(self, text: str, add_bos: bool, special: bool) -> list[int]:
        """Token ids of ``text``; ``special`` parses control tokens such as ``<|im_start|>``."""

    @abstractmethod
    def _steps(
        self, prompt_ids: list[int], params: GenerationParams, grammar: str | None = None
    ) -> Iterator[Step]:
        """Decode after ``prompt_ids`` until an end-of-turn token or ``max_tokens``; with
        ``grammar`` (GBNF, rule ``root``) only tokens it allows are sampled.
        Closing the generator must stop decoding and leave the model reusable."""

    @abstractmethod
    def _logits(self, ids: list[int]) -> np.ndarray:
        """Logits for the token after ``ids``, computed from scratch (no cached state)."""

    @abstractmethod
    def _render_chat(self, messages: list[Message], add_generation_prompt: bool) -> str:
        """The model's own chat template applied to ``messages``."""

    # --- lifecycle ----------------------------------------------------------------

    def ensure_loaded(self) -> None:
        """Load the model now if it is not in memory (the first request does this anyway)."""
        with self._lock:
            if not self.loaded:
                self._load()

    def close(self) -> None:
        """Free the weights; the next request loads them again."""
        self._acquire()
        try:
            with self._lock:
                if self.loaded:
                    self._unload()
                _free_memory()
        finally:
            self._release()

    def _acquire(self) -> None:
        me = threading.get_ident()
        if not self._busy.acquire(blocking=False):
            if self._owner == me:
                raise BackendError(
                    "This model is still streaming a reply in this thread. Read that stream to "
                    "the end or call its close() before starting another request."
                )
            self._busy.acquire()  # another thread's request: wait for it
        self._owner = me

    def _release(self) -> None:
        self._owner = None
        self._busy.release()

    @property
    def context_length(self) -> int:
        return self.n_ctx

    # --- token-level API (lessons on tokens, logits and templates) -------------------

    def tokenize(self, text: str, add_bos: bool = False, special: bool = False) -> list[int]:
        """Token ids of ``text``.

        With ``special=True`` control-token names such as ``<|im_start|>`` become their
        single control token (as in a rendered chat prompt); by default they are plain text.
        """
        self.ensure_loaded()
        return self._encode(text, add_bos=add_bos, special=special)

    def next_token_logits(self, ids: list[int]) -> np.ndarray:
        """float32 scores over the vocabulary for the token that follows ``ids``."""
        if not ids:
            raise ValueError("next_token_logits needs at least one token id")
        self._check_fits(len(ids), 0)
        self._acquire()
        try:
            self.ensure_loaded()
            return np.asarray(self._logits(list(ids)), dtype=np.float32)
        finally:
            self._release()

    def apply_chat_template(
        self, messages: list[Message], add_generation_prompt: bool = True
    ) -> str:
        """The exact prompt text the model sees for ``messages`` (its own chat template)."""
        self.ensure_loaded()
        return self._render_chat(messages, add_generation_prompt)

    def count_tokens(self, text: str) -> int:
        return len(self.tokenize(text))

    def prompt_tokens(self, messages: list[Message]) -> int:
        # The rendered template holds control tokens (<|im_start|>...) that the model reads
        # as single tokens, so it is tokenized with special=True.
        return len(self.tokenize(self.apply_chat_template(messages), special=True))

    # --- requests -----------------------------------------------------------------

    def complete(self, prompt: str, **params: Any) -> Result:
        return collect(self.stream_complete(prompt, **params))

    def stream_chat(
        self, messages: list[Message], json_schema: dict | None = None, **params: Any
    ) -> Iterator[Chunk]:
        gen = GenerationParams.from_kwargs(**params)
        # A schema the grammar cannot hold fails here, before anything is decoded.
        grammar = structured.grammar_for_schema(json_schema) if json_schema is not None else None

        def prompt_ids() -> list[int]:
            # The template writes BOS itself where the model wants one (as transformers does).
            return self._encode(self._render_chat(messages, True), add_bos=False, special=True)

        return self._run(prompt_ids, gen, grammar)

    def stream_complete(self, prompt: str, **params: Any) -> Iterator[Chunk]:
        gen = GenerationParams.from_kwargs(**params)
        return self._run(lambda: self._encode(prompt, add_bos=True, special=False), gen)

    def _check_fits(self, prompt_tokens: int, max_tokens: int) -> None:
        if prompt_tokens + max_tokens > self.context_length:
            raise ContextOverflowError(prompt_tokens, max_tokens, self.context_length)

    def _run(
        self, make_ids, params: GenerationParams, grammar: str | None = None
    ) -> Iterator[Chunk]:
        # Load, tokenize and check the context before the first next(), so errors surface
        # where the stream is created rather than half-way through a loop.
        with self._lock:
            self.ensure_loaded()
            ids = make_ids()
        self._check_fits(len(ids), params.max_tokens)
        return self._generate(ids, params, grammar)

    def _generate(
        self, ids: list[int], params: GenerationParams, grammar: str | None
    ) -> Iterator[Chunk]:
        self._acquire()
        start = time.perf_counter()
        first = None
        tokens = 0
        finish = "interrupted"
        matcher = StopMatcher(params.stop)
        try:
            self.ensure_loaded()  # again: another thread may have closed it meanwhile
            steps = self._steps(ids, params, grammar)
            try:
                for step in steps:
                    if first is None and step.tokens:
                        first = time.perf_counter() - start
                    tokens = step.tokens
                    text, hit = matcher.feed(step.text)
                    if hit:
                        finish = "stop"
                    elif step.finish:
                        finish = step.finish
                        text += matcher.flush()
                    if text:
                        yield Chunk(text)
                        self._owner = threading.get_ident()  # the thread that resumed us
                    if hit or step.finish:
                        break
            except KeyboardInterrupt:
                finish = "interrupted"  # Ctrl-C ends the reply; the caller keeps what came so far
            finally:
                steps.close()
        finally:
            self._release()
        total = time.perf_counter() - start
        timings = Timings(first if first is not None else total, total, tokens)
        yield Chunk("", finish, Usage(len(ids), tokens), timings)


def _free_memory() -> None:
    import gc

    gc.collect()
    # Only a process that already uses torch can hold GPU caches; importing it here
    # would add ~190 MB to a llama.cpp-only process.
    torch = sys.modules.get("torch")
    if torch is None:
        return
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        torch.mps.empty_cache()


def wrap_load_error(spec: ModelSpec, engine: str, exc: Exception) -> BackendError:
    """A loader exception turned into a message that says what to do."""
    fix = (
        "Re-add it with the right file (python part5/model_registry.py add ...)"
        if spec.user
        else f"Reinstall or re-pull it (python part5/model_registry.py pull {spec.ref})"
    )
    return BackendError(
        f"{engine} could not load {spec.ref} from {spec.path}: {exc}. The file may be corrupt, "
        f"truncated or a format {engine} does not support. {fix}, or try another --backend."
    )
