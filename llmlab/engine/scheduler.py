"""The engine's scheduler: the queue, admission to slots, the prefix-cache choice, cancelling,
one decode step at a time, and finishing each sequence.

It runs on the engine's decode thread and reaches llama.cpp only through a
:class:`Context` (``llmlab.engine.context.LlamaContext`` in the engine), so a small fake
model can drive it in tests. Everything else of a request lives in its :class:`Handle`.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable
from typing import Protocol

import numpy as np

from llmlab.backends.base import Chunk, Result, Timings, TokenLogprob, Usage
from llmlab.backends.text_stream import TextStream
from llmlab.engine.logprobs import token_logprob
from llmlab.engine.requests import (
    AdapterSet,
    EngineError,
    Handle,
    QueueFullError,
    unstarted,
)

log = logging.getLogger("llmlab.engine")

Entry = tuple[int, int, int, bool]  # (token, position, seq_id, wants_logits)


class Context(Protocol):
    """What the scheduler needs of a model context (:class:`~llmlab.engine.context.LlamaContext`)."""

    n_vocab: int

    def decode(self, entries: list[Entry], adapters: AdapterSet) -> None:
        """Decode the entries in one step (raise if it fails)."""

    def logits(self, index: int) -> np.ndarray:
        """The logits row of entry ``index`` of the last decode."""

    def seq_rm(self, seq_id: int, start: int, end: int) -> None:
        """Clear a sequence's cells at positions ``start..end`` (-1: open end)."""

    def seq_cp(self, source: int, target: int) -> None:
        """Make ``target``'s cells a copy of ``source``'s."""

    def is_eog(self, token: int) -> bool:
        """Whether ``token`` ends generation."""

    def token_bytes(self, token: int) -> bytes:
        """The bytes of one token's text."""


class Sampler(Protocol):
    """What the scheduler needs of a sequence's sampler (:class:`llmlab.sampling.SlotSampler`)."""

    def sample_logits(self, logits: np.ndarray) -> int:
        """The next token from one row of raw logits."""

    def accept(self, token: int) -> None:
        """``token`` was chosen and the sequence goes on (not called for end-of-generation)."""

    def free(self) -> None:
        """Release what it holds (safe to call twice)."""


def default_sampler(handle: Handle) -> Sampler:
    """The sampler of a newly admitted request: the one made with its handle at submit."""
    return handle.sampler


class _Sequence:
    """Decoding state of one request in one slot (one llama.cpp sequence id)."""

    def __init__(self, handle: Handle, seq_id: int, sampler: Sampler, order: int):
        self.handle = handle
        self.seq_id = seq_id
        self.params = handle.params
        self.prompt = handle.prompt_tokens
        self.adapters = handle.adapters
        self.n_past = 0  # tokens of this sequence already in the KV cache
        self.cached = 0  # prompt tokens the prefix cache saved
        self.borrowed = False  # looked for its prompt's start in other slots (once)
        self.generated: list[int] = []
        self.next_token: int | None = None  # sampled, not yet decoded
        self.text = ""  # completion text shown so far (after stop-string holding)
        self.stream = TextStream(self.params.stop)  # token bytes in, text safe to show out
        self.sampler = sampler
        self.order = order  # admission order: earlier prompts are prefilled first
        self.started = time.perf_counter()
        self.first_token_at: float | None = None
        # Several choices of one prompt: the source prefills it, then its KV cells are
        # copied to each follower, which waits (neither prefilling nor decoding) till then.
        self.source: _Sequence | None = None
        self.followers: list[_Sequence] = []
        # Logprobs (only when asked for): every token shown so far, and the tokens whose
        # text is not shown yet, with where their text starts and ends in the decoded text
        # (end None: the token ended inside a UTF-8 character, completed by a later token).
        self.logprobs: list[TokenLogprob] | None = [] if handle.logprobs is not None else None
        self._pending: list[list] = []  # [start, end, TokenLogprob]
        self._decoded = 0  # characters decoded so far

    @property
    def prefilling(self) -> bool:
        return self.source is None and self.n_past < len(self.prompt)

    def track(self, entry: TokenLogprob, piece: str) -> None:
        """Note a generated token's logprob and how much text (``piece``) its bytes decoded to."""
        start = self._decoded
        self._pending.append([start, None, entry])
        if piece:
            self._decoded += len(piece)
            for pending in self._pending:
                if pending[1] is None:
                    pending[1] = self._decoded

    def release(self, final: bool = False, hit: bool = False) -> list[TokenLogprob] | None:
        """The logprobs of the tokens whose text is now shown (``self.text``); at the end
        (``final``) all the rest, or after a stop string (``hit``) those whose text is at
        least partly before it. ``None`` when logprobs are off."""
        if self.logprobs is None:
            return None
        shown = len(self.text)
        if final and not hit:
            done = self._pending
        elif final:
            done = [p for p in self._pending if p[0] < shown]
        else:
            done = [p for p in self._pending if p[1] is not None and p[1] <= shown]
        self._pending = [] if final else self._pending[len(done) :]
        entries = [entry for _, _, entry in done]
        self.logprobs += entries
        return entries


# A prompt whose start is in another slot's cells gets a copy of them when that saves at
# least this many prompt tokens: the copy moves a whole KV stream (~12 MB for SmolLM2 at 512
# cells, a few ms), about what prefilling one or two tokens costs on 2 cores.
MIN_COPIED_PREFIX = 8


def next_group(groups: list[AdapterSet], last: AdapterSet | None) -> AdapterSet:
    """The adapter set whose sequences the next decode step carries: the one after ``last``
    in sorted order, round the circle, so every group gets a step in turn (none starves)."""
    ordered = sorted(groups)
    if last is None:
        return ordered[0]
    return next((g for g in ordered if g > last), ordered[0])


def shared_prefix(a: list[int], b: list[int]) -> int:
    """How many leading tokens ``a`` and ``b`` have in common."""
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


class Scheduler:
    """Slots, a bounded queue and the step loop of one engine (see the package docstring).

    Args:
        context: the model context (:class:`Context`).
        parallel: slots (sequences decoded together).
        n_batch: most entries one decode may carry.
        prefill_chunk: mixed mode: most prompt tokens one step carries beside the running
            sequences' next tokens (at most ``n_batch - parallel``); with none running, a
            step carries up to ``n_batch`` prompt tokens.
        deterministic: prefill each prompt alone in ``n_batch`` chunks while running
            sequences wait, so no sequence's numbers depend on its neighbours.
        max_queue: requests (choices) allowed to wait before :meth:`enqueue` refuses.
        prefix_cache: keep a finished sequence's cells as its slot's prompt cache.
        model_lock: held during each decode (the engine tokenizes under it too).
        on_failure: called once with the error if decoding fails.
        new_sampler: gives the :class:`Sampler` of an admitted request (default: the one
            its handle carries).
    """

    def __init__(
        self,
        context: Context,
        *,
        parallel: int,
        n_batch: int,
        prefill_chunk: int,
        deterministic: bool = False,
        max_queue: int = 256,
        prefix_cache: bool = True,
        model_lock: threading.Lock | None = None,
        on_failure: Callable[[EngineError], None] | None = None,
        new_sampler: Callable[[Handle], Sampler] = default_sampler,
    ):
        if n_batch <= parallel:
            raise ValueError(f"n_batch ({n_batch}) must exceed parallel ({parallel})")
        self.ctx = context
        self.parallel = parallel
        self.n_batch = n_batch
        self.prefill_chunk = max(1, min(prefill_chunk, n_batch - parallel))
        self.deterministic = deterministic
        self.max_queue = max_queue
        self.prefix_cache = prefix_cache
        self.model_lock = model_lock or threading.Lock()
        self.on_failure = on_failure
        self.new_sampler = new_sampler
        self.failure: EngineError | None = None  # why decoding stopped, if it failed
        self.lock = threading.Lock()
        self.wake = threading.Condition(self.lock)
        self.closing = False
        self._waiting: collections.deque[list[Handle]] = collections.deque()  # groups
        self._slots: list[_Sequence | None] = [None] * parallel
        self._admitted = 0
        self._cached: list[list[int]] = [[] for _ in range(parallel)]  # tokens in each slot's KV
        self._cached_under: list[AdapterSet] = [() for _ in range(parallel)]  # ... and adapters
        self._last_group: AdapterSet | None = None  # which adapter set the last decode carried
        self.steps = 0  # decode calls so far (for lessons and tests)
        self.reused_prompt_tokens = 0  # prompt tokens not prefilled thanks to the prefix cache
        self.copied_prompt_tokens = 0  # ... of which copied from another slot's cells
        self.prefilled_tokens = 0  # prompt tokens decoded (computed) so far
        self.max_batch_sequences = 0  # the most sequences one decode step has carried

    # --- any thread -------------------------------------------------------------------

    def enqueue(self, handles: list[Handle]) -> None:
        """Queue the choices of one request together (they are admitted at once).

        Raises:
            EngineError: the engine failed or is closing.
            QueueFullError: ``max_queue`` would be exceeded.
        """
        with self.lock:
            refusal: EngineError | None = None
            if self.failure is not None:
                refusal = EngineError(
                    f"the engine stopped after a failure ({self.failure}); create a new one"
                )
            elif self.closing:
                refusal = EngineError("the engine is closed; create a new one")
            elif self._queued() + len(handles) > self.max_queue:
                refusal = QueueFullError(
                    f"{self._queued()} requests are already waiting (max_queue={self.max_queue}); "
                    "retry later"
                )
            if refusal is None:
                self._waiting.append(handles)
                self.wake.notify()
        if refusal is not None:
            for handle in handles:
                if handle.sampler is not None:
                    handle.sampler.free()
            raise refusal

    def close(self) -> None:
        """Ask the loop to stop (running and waiting requests end ``interrupted``)."""
        with self.lock:
            self.closing = True
            self.wake.notify()

    @property
    def active(self) -> int:
        """Sequences decoding now."""
        return sum(s is not None for s in self._slots)

    @property
    def queued(self) -> int:
        """Requests (choices) waiting for a slot."""
        with self.lock:  # another thread may be changing the queue
            return self._queued()

    def _queued(self) -> int:
        return sum(len(group) for group in self._waiting)

    # --- the decode thread --------------------------------------------------------------

    def loop(self) -> None:
        """Step until closed; a failure ends every request with an :class:`EngineError`."""
        try:
            while self._wait_for_work():
                self.run_once()
        except Exception as exc:  # a broken context fails every request rather than hanging them
            self._fail(EngineError(f"the decode loop stopped: {type(exc).__name__}: {exc}"))
            return
        self._interrupt_all()

    def _wait_for_work(self) -> bool:
        with self.lock:
            while not self.closing and not self._waiting and not self.active:
                self.wake.wait()
            return not self.closing

    def run_once(self) -> None:
        """One round: drop cancelled waiting requests, admit, reap cancelled ones, step."""
        with self.lock:
            dropped = self._take_cancelled_waiting()
        for handle in dropped:  # outside the lock: a callback may submit
            handle._complete(unstarted("interrupted", handle))
        with self.lock:
            self._admit()
        self._reap_cancelled()
        if self.active:
            self._step()

    def _interrupt_all(self) -> None:
        for i, seq in enumerate(self._slots):
            if seq is not None:
                self._finish(i, "interrupted")
        with self.lock:
            waiting = [h for group in self._waiting for h in group]
            self._waiting = collections.deque()
        for handle in waiting:
            handle._complete(unstarted("interrupted", handle))

    def _fail(self, error: EngineError) -> None:
        """Refuse new requests, tell ``on_failure``, then fail every running and waiting one."""
        log.error("The engine failed: %s", error)
        with self.lock:
            self.failure = error
            self.closing = True
            running = [seq for seq in self._slots if seq is not None]
            handles = [seq.handle for seq in running]
            handles += [h for group in self._waiting for h in group]
            self._waiting.clear()
            self._slots = [None] * self.parallel
        for seq in running:
            seq.sampler.free()
        if self.on_failure is not None:
            try:
                self.on_failure(error)
            except Exception:
                log.exception("on_failure raised")
        for handle in handles:
            handle._finish(None, error)

    def _take_cancelled_waiting(self) -> list[Handle]:
        """Remove cancelled requests from the queue (under the lock); the caller ends them."""
        dropped = [h for group in self._waiting for h in group if h.cancelled]
        groups = [[h for h in group if not h.cancelled] for group in self._waiting]
        self._waiting = collections.deque(group for group in groups if group)
        return dropped

    def _admit(self) -> None:
        """Give waiting requests the free slots, first come first served (the choices of one
        prompt all at once), each the slot whose cached tokens share the longest prefix with
        its prompt under the same adapters; only the rest of the prompt is prefilled."""
        free = [i for i, seq in enumerate(self._slots) if seq is None]
        while self._waiting and len(self._waiting[0]) <= len(free):
            group = [self._place(handle, free) for handle in self._waiting.popleft()]
            source = max(group, key=lambda seq: seq.cached)  # prefills for all of them
            source.followers = [seq for seq in group if seq is not source]
            for seq in source.followers:
                seq.source = source
            self.reused_prompt_tokens += source.cached

    def _place(self, handle: Handle, free: list[int]) -> _Sequence:
        """Put ``handle`` in the free slot that has the most of its prompt cached."""
        prompt = handle.prompt_tokens

        def shared(i: int) -> int:
            return self._shared(i, prompt, handle.adapters)

        slot = max(free, key=shared)
        free.remove(slot)
        # At least the last prompt token is decoded again: its logits pick the first token.
        keep = min(shared(slot), len(prompt) - 1)
        self.ctx.seq_rm(slot, keep, -1)
        self._cached[slot] = []
        self._admitted += 1
        seq = _Sequence(handle, slot, self.new_sampler(handle), self._admitted)
        seq.n_past = seq.cached = keep
        self._slots[slot] = seq
        return seq

    def _borrow_prefix(self, seq: _Sequence) -> None:
        """Just before ``seq``'s first prompt chunk: if another slot's cells (a running
        sequence's, or a slot's prompt cache) hold a longer start of its prompt than its own
        slot kept, copy them, so prompts that begin alike (a system prompt, a template) are
        prefilled once even when they were admitted together."""
        seq.borrowed = True
        others = [i for i in range(self.parallel) if i != seq.seq_id]
        donor = max(others, key=lambda i: self._shared(i, seq.prompt, seq.adapters), default=None)
        if donor is None:
            return
        keep = min(self._shared(donor, seq.prompt, seq.adapters), len(seq.prompt) - 1)
        if keep < seq.n_past + MIN_COPIED_PREFIX:
            return
        self.ctx.seq_cp(donor, seq.seq_id)
        self.ctx.seq_rm(seq.seq_id, keep, -1)
        self.reused_prompt_tokens += keep - seq.n_past
        self.copied_prompt_tokens += keep - seq.n_past
        seq.n_past = seq.cached = keep

    def _shared(self, slot: int, prompt: list[int], adapters: AdapterSet) -> int:
        """How many leading tokens of ``prompt`` ``slot``'s cells hold under ``adapters``."""
        tokens, computed_under = self._kv_tokens(slot)
        if computed_under != adapters:  # computed under other adapters: of no use
            return 0
        return shared_prefix(tokens, prompt)

    def _kv_tokens(self, slot: int) -> tuple[list[int], AdapterSet]:
        """The tokens in ``slot``'s KV cells, and the adapters they were computed under."""
        seq = self._slots[slot]
        if seq is None:
            return self._cached[slot], self._cached_under[slot]
        return (seq.prompt + seq.generated)[: seq.n_past], seq.adapters

    def _reap_cancelled(self) -> None:
        for i, seq in enumerate(self._slots):
            if seq is not None and seq.handle.cancelled:
                self._finish(i, "interrupted")

    def _hand_over(self, seq: _Sequence) -> None:
        """``seq`` ends before its prompt was copied to its followers: the first of them
        prefills instead (from the prefix its own slot has cached)."""
        if seq.source is not None:
            seq.source.followers.remove(seq)
        elif seq.followers:
            heir, *rest = seq.followers
            heir.source, heir.followers = None, rest
            for follower in rest:
                follower.source = heir
            self.reused_prompt_tokens += heir.cached
        seq.source, seq.followers = None, []

    def _decode(self, entries: list[Entry], adapters: AdapterSet, sequences: int) -> None:
        with self.model_lock:
            self.ctx.decode(entries, adapters)
        self.steps += 1
        self.max_batch_sequences = max(self.max_batch_sequences, sequences)

    def _step(self) -> None:
        """One decode. Deterministic mode: a waiting prompt chunk alone, else the next token
        of every running sequence of one adapter set. Mixed mode: those tokens plus up to
        ``prefill_chunk`` waiting prompt tokens of the same adapter set, in one decode (up
        to ``n_batch`` prompt tokens when no sequence is running)."""
        if self.deterministic:
            prefill = min(
                (s for s in self._slots if s is not None and s.prefilling),
                key=lambda s: s.order,
                default=None,
            )
            if prefill is not None:
                # A prompt goes in on its own (in n_batch chunks), so its numbers never
                # depend on which other prompts happen to arrive at the same time.
                self._run_step([], [prefill], self.n_batch)
                return
        ready = [
            s for s in self._slots if s is not None and (s.next_token is not None or s.prefilling)
        ]
        groups: dict[AdapterSet, list[_Sequence]] = {}
        for seq in ready:
            groups.setdefault(seq.adapters, []).append(seq)
        if not groups:  # only choices waiting for a prompt copy (cannot last a step)
            return
        self._last_group = next_group(list(groups), self._last_group)
        group = groups[self._last_group]
        running = [s for s in group if s.next_token is not None]
        prefilling = sorted((s for s in group if s.prefilling), key=lambda s: s.order)
        if self.deterministic:
            budget = 0
        elif any(s.next_token is not None for s in ready):
            budget = self.prefill_chunk  # bounded: running streams wait for this step
        else:
            budget = self.n_batch  # no stream to hold up: prompts go in as fast as they can
        self._run_step(running, prefilling, budget)

    def _run_step(self, running: list[_Sequence], prefilling: list[_Sequence], budget: int) -> None:
        """Decode the next token of each of ``running`` and up to ``budget`` prompt tokens of
        ``prefilling`` (in order), then sample where a row of logits is due."""
        entries: list[Entry] = [(s.next_token, s.n_past, s.seq_id, True) for s in running]
        chunks: list[tuple[_Sequence, int]] = []
        for seq in prefilling:
            if budget <= 0:
                break
            if not seq.borrowed:
                self._borrow_prefix(seq)
            start = seq.n_past
            chunk = seq.prompt[start : start + budget]
            last = start + len(chunk) == len(seq.prompt)
            entries += [
                (t, start + j, seq.seq_id, last and j == len(chunk) - 1)
                for j, t in enumerate(chunk)
            ]
            chunks.append((seq, len(chunk)))
            budget -= len(chunk)
        group = (running or prefilling)[0].adapters
        self._decode(entries, group, len(running) + len(chunks))
        for i, seq in enumerate(running):
            seq.n_past += 1
            self._accept(seq, self.ctx.logits(i))
        row = len(running)
        for seq, n in chunks:
            seq.n_past += n
            self.prefilled_tokens += n
            row += n
            if not seq.prefilling:
                self._prompt_done(seq, self.ctx.logits(row - 1))

    def _prompt_done(self, seq: _Sequence, logits: np.ndarray) -> None:
        """``seq``'s prompt is in: copy it to the choices that share it, sample each one."""
        followers, seq.followers = seq.followers, []
        for follower in followers:  # before anything can end and reuse the slot
            self.ctx.seq_cp(seq.seq_id, follower.seq_id)
            follower.n_past, follower.cached, follower.source = seq.n_past, seq.cached, None
        for each in [seq, *followers]:  # each its own draw from the same logits
            self._accept(each, logits)

    def _accept(self, seq: _Sequence, logits: np.ndarray) -> None:
        """Sample the sequence's next token from ``logits``, stream its text, finish if due."""
        token = seq.sampler.sample_logits(logits)
        slot = seq.seq_id
        if self.ctx.is_eog(token):
            self._finish(slot, "stop")
            return
        seq.sampler.accept(token)
        if seq.first_token_at is None:
            seq.first_token_at = time.perf_counter()
        seq.generated.append(token)
        text, hit = seq.stream.feed(self.ctx.token_bytes(token))
        piece = seq.stream.piece
        if seq.logprobs is not None:
            top = seq.handle.logprobs
            seq.track(token_logprob(logits, token, top, self.ctx.token_bytes), piece)
        if hit:
            self._finish(slot, "stop", text, hit=True)
            return
        if len(seq.generated) >= seq.params.max_tokens:
            self._finish(slot, "length", text)
            return
        if text:
            seq.text += text
            seq.handle._emit(Chunk(text, logprobs=seq.release()))
        seq.next_token = token

    def _finish(self, slot: int, reason: str, text: str = "", hit: bool = False) -> None:
        """End the sequence in ``slot``: last text, result, KV cells freed, slot opened.

        ``hit`` means a stop string ended it: ``text`` is what came before the stop string,
        and the held-back rest is dropped.
        """
        seq = self._slots[slot]
        self._hand_over(seq)
        seq.sampler.free()
        if not hit:
            tail, hit = seq.stream.flush()  # an unfinished character may end a stop string
            text += tail
            reason = "stop" if hit else reason
        seq.text += text
        logprobs = seq.release(final=True, hit=hit)
        if text or logprobs:
            seq.handle._emit(Chunk(text, logprobs=logprobs))
        now = time.perf_counter()
        total = now - seq.started
        first = (seq.first_token_at - seq.started) if seq.first_token_at else total
        usage = Usage(len(seq.prompt), len(seq.generated), seq.cached)
        timings = Timings(first, total, len(seq.generated))
        if self.prefix_cache:
            # The cells stay as this slot's prompt cache; the next request admitted here
            # under the same adapters keeps the prefix it shares with them, clears the rest.
            self._cached[slot] = (seq.prompt + seq.generated)[: seq.n_past]
            self._cached_under[slot] = seq.adapters
        else:
            self.ctx.seq_rm(seq.seq_id, -1, -1)
        with self.lock:
            self._slots[slot] = None
        seq.handle._complete(Result(seq.text, reason, usage, timings, seq.logprobs))
