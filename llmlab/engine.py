"""Continuous batching on llama.cpp: many requests decoded together, one llama.cpp step at a time.

Each decoding step reads every weight of the model once, whether it computes one token
or eight. So the engine puts the next token of every running sequence into one
``llama_batch`` (each token with its sequence id and position), decodes them in one
``llama_decode`` call, samples each sequence's next token from its own logits row, and
admits a waiting request as soon as a sequence finishes and frees its slot::

    from llmlab.engine import Engine, Request
    with Engine(parallel=8) as engine:                      # default model, all cores
        handles = [engine.submit(Request.chat([{"role": "user", "content": q}], max_tokens=64))
                   for q in questions]
        for chunk in handles[0].stream():                   # tokens as they come
            print(chunk.text, end="")
        answers = [h.result().text for h in handles]

Submitting is thread-safe (a server shares one engine among its clients); a bounded queue
raises :class:`QueueFullError` instead of growing without limit, and ``handle.cancel()``
frees the sequence's slot at the next step. A request may carry a GBNF ``grammar`` (JSON
mode in the server): only tokens the grammar allows are sampled.

Failures stay as small as they can: an ``on_chunk`` callback that raises fails its own
request only, and callbacks never run while the engine holds a lock (one may submit).
If ``llama_decode`` itself fails, every request ends with an :class:`EngineError`, the
engine refuses new ones, ``engine.failure`` says why and ``on_failure`` is called (a
server loads a new engine there); ``close()`` still frees the context and the model.

Prefix cache: a finished sequence's KV cells stay as its slot's cache. A new request goes
to the free slot whose cached tokens share the longest prefix with its prompt; the cells
past that prefix are cleared and only the rest of the prompt is prefilled (a chat
template's system prompt, or the earlier turns of a conversation, are computed once).
``prefix_cache=False`` clears a sequence's cells as soon as it finishes.

``usage.cached_tokens`` of a result says how many prompt tokens the prefix cache saved
(0 on a cold request).

Several choices of one prompt (OpenAI's ``n``): ``engine.submit_choices(request, n)``
prefills the prompt once, copies its KV cells to ``n - 1`` more sequences
(``llama_memory_seq_cp``) and samples each on its own (choice ``i`` with ``seed + i``).

Logprobs: ``Request.chat(..., logprobs=N)`` gives each generated token's log-probability
and the N most likely tokens at that step (``chunk.logprobs`` for the tokens whose text is
in that chunk, ``result.logprobs`` for all); they come from the model's raw scores, before
sampling settings. With ``logprobs=None`` (the default) nothing extra is computed.

LoRA adapters per request, as llama.cpp's server does: ``Engine(adapters={"style": path})``
loads GGUF adapters once, and ``Request.chat(..., lora={"style": 1.0})`` picks some.
llama.cpp applies adapters to a whole context, not to one sequence, so one ``llama_decode``
only carries sequences with the same adapter set; the sets take turns step by step (none
starves), and a cached prefix is only reused under the adapters it was computed with.

Greedy output (``temperature=0``) is bit-for-bit the same whether a request runs alone or
beside others: each sequence has its own KV stream (``kv_unified=False``) and prompts are
prefilled one sequence per ``llama_decode`` call, so no sequence's numbers depend on its
neighbours. (With one KV buffer shared by all sequences and llama.cpp's standard attention
kernel, logits of the same prompt differed by up to ~1 between runs and greedy tokens
flipped.) The attention kernel is the llama.cpp backend's (flash attention, unless
``LLMLAB_FLASH_ATTN=0``), so greedy text equals ``backends.load(...).chat(..., temperature=0)``.
The two kernels round differently: with SmolLM2-135M, 9 of 16 greedy 32-token replies
differed somewhere between them, so both sides must use the same one.

Speed, measured on a 2-core AVX2 CPU with SmolLM2-135M Q4_1: a raw ``llama_decode`` of 8
sequences takes ~4.5x the time of one (unpacking 4-bit weights keeps the cores busy), so
8 sequences give ~1.8x the tokens/s of one at best; ``make bench`` (suite ``batch``)
measures the engine against a plain loop.
"""

from __future__ import annotations

import codecs
import collections
import ctypes
import dataclasses
import logging
import os
import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from llmlab import registry
from llmlab.backends.base import (
    BackendError,
    Chunk,
    ContextOverflowError,
    GenerationParams,
    Message,
    Result,
    Timings,
    TokenLogprob,
    TopLogprob,
    Usage,
)
from llmlab.backends.llamacpp import gguf_chat_formatter, load_error
from llmlab.backends.local import StopMatcher
from llmlab.chat import PARAM_RANGES, check_param
from llmlab.settings import get_settings

# llama.cpp's repeat-penalty window (``penalty_last_n``), so penalties match the backend's.
PENALTY_LAST_N = 64

log = logging.getLogger("llmlab.engine")


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
    """

    messages: list[Message] | None = None
    prompt: str | None = None
    params: GenerationParams = field(default_factory=GenerationParams)
    grammar: str | None = None  # GBNF text (rule ``root``): only tokens it allows are sampled
    logprobs: int | None = None
    lora: dict[str, float] | None = None

    @classmethod
    def chat(
        cls,
        messages: list[Message],
        grammar: str | None = None,
        *,
        logprobs: int | None = None,
        lora: dict[str, float] | None = None,
        **params,
    ) -> Request:
        """A chat request, e.g. ``Request.chat(msgs, max_tokens=64, temperature=0)``."""
        return cls(
            messages=messages,
            params=GenerationParams.from_kwargs(**params),
            grammar=grammar,
            logprobs=logprobs,
            lora=lora,
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
        grammar: Grammar | None = None,
        *,
        logprobs: int | None = None,
        adapters: AdapterSet = (),
        index: int = 0,
    ):
        self.id = request_id
        self.prompt_tokens = prompt_tokens
        self.params = params
        self.grammar = grammar
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
        if self.grammar is not None:
            self.grammar.free()
        self._result, self._error = result, error
        if error is not None:
            self._call_back(Chunk("", "error", index=self.index))
        self._chunks.put(_DONE)
        self._done.set()


class Grammar:
    """llama.cpp's grammar sampler for one request: masks every token the grammar forbids.

    Checking all ~50k tokens against the grammar costs about as much as a decode step, so
    the engine first samples as usual and asks ``allows`` about that one token; only when
    the grammar rejects it does ``constrain`` set every forbidden logit to -inf for a second
    draw (llama.cpp's common sampler does the same; the result has exactly the constrained
    distribution). ``accept`` advances the grammar past the chosen token.
    """

    def __init__(self, llama_cpp: Any, vocab: Any, n_vocab: int, gbnf: str):
        self._ll = llama_cpp
        self._sampler = llama_cpp.llama_sampler_init_grammar(vocab, gbnf.encode(), b"root")
        if not self._sampler:
            raise ValueError(
                "llama.cpp could not parse the grammar (GBNF with a rule named 'root' is needed)"
            )
        self._candidates = np.zeros(
            n_vocab, dtype=np.dtype([("id", np.int32), ("logit", np.float32), ("p", np.float32)])
        )
        self._candidates["id"] = np.arange(n_vocab, dtype=np.int32)
        self._array = self._token_array(self._candidates)
        self._one = np.zeros(1, dtype=self._candidates.dtype)
        self._one_array = self._token_array(self._one)

    def _token_array(self, candidates: np.ndarray) -> Any:
        return self._ll.llama_token_data_array(
            data=candidates.ctypes.data_as(self._ll.llama_token_data_p),
            size=len(candidates),
            selected=-1,
            sorted=False,
        )

    def _apply(self, array: Any, size: int) -> None:
        # The sampler may have marked the array selected or sorted last time: reset first.
        array.size, array.selected, array.sorted = size, -1, False
        self._ll.llama_sampler_apply(self._sampler, ctypes.byref(array))

    def allows(self, token: int) -> bool:
        """Whether the grammar accepts ``token`` next (one candidate checked, not the vocabulary)."""
        self._one[0] = (token, 0.0, 0.0)
        self._apply(self._one_array, 1)
        return bool(np.isfinite(self._one["logit"][0]))

    def constrain(self, logits: np.ndarray) -> np.ndarray:
        """``logits`` with every token the grammar forbids here set to -inf (a new array)."""
        self._candidates["logit"] = logits
        self._apply(self._array, len(self._candidates))
        return self._candidates["logit"].copy()

    def accept(self, token: int) -> None:
        """Advance the grammar past ``token``."""
        self._ll.llama_sampler_accept(self._sampler, token)

    def free(self) -> None:
        """Release llama.cpp's sampler (safe to call twice)."""
        if self._sampler:
            self._ll.llama_sampler_free(self._sampler)
            self._sampler = None


class _Sequence:
    """Decoding state of one request in one slot (one llama.cpp sequence id)."""

    def __init__(self, handle: Handle, seq_id: int):
        self.handle = handle
        self.seq_id = seq_id
        self.params = handle.params
        self.prompt = handle.prompt_tokens
        self.adapters = handle.adapters
        self.n_past = 0  # tokens of this sequence already in the KV cache
        self.cached = 0  # prompt tokens the prefix cache saved
        self.generated: list[int] = []
        self.next_token: int | None = None  # sampled, not yet decoded
        self.text = ""  # completion text shown so far (after stop-string holding)
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.matcher = StopMatcher(self.params.stop)
        self.rng = np.random.default_rng(self.params.seed)
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


def _unstarted(reason: str, handle: Handle) -> Result:
    """The result of a request that ended before it decoded anything."""
    logprobs = [] if handle.logprobs is not None else None
    return Result("", reason, Usage(len(handle.prompt_tokens), 0), Timings(), logprobs)


def next_group(groups: list[AdapterSet], last: AdapterSet | None) -> AdapterSet:
    """The adapter set whose sequences the next decode step carries: the one after ``last``
    in sorted order, round the circle, so every group gets a step in turn (none starves)."""
    ordered = sorted(groups)
    if last is None:
        return ordered[0]
    return next((g for g in ordered if g > last), ordered[0])


def token_logprob(logits: np.ndarray, token: int, top: int, piece: Callable[[int], bytes]):
    """``token``'s log-probability under ``logits`` (log-softmax of the raw row) and the
    ``top`` most likely tokens, as a :class:`TokenLogprob`; ``piece`` gives a token's bytes."""
    logits = np.asarray(logits, dtype=np.float32)
    peak = float(logits.max())
    log_z = peak + float(np.log(np.exp(logits - peak).sum(dtype=np.float64)))
    best: list[int] = []
    if top > 0:
        ids = np.argpartition(-logits, top - 1)[:top]
        best = [int(i) for i in ids[np.argsort(-logits[ids], kind="stable")]]

    def entry(cls, t: int, **extra):
        data = piece(t)
        return cls(data.decode("utf-8", "replace"), list(data), float(logits[t]) - log_z, **extra)

    return entry(TokenLogprob, token, top_logprobs=[entry(TopLogprob, t) for t in best])


def _shared_prefix(a: list[int], b: list[int]) -> int:
    """How many leading tokens ``a`` and ``b`` have in common."""
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def sample(
    logits: np.ndarray,
    params: GenerationParams,
    rng: np.random.Generator,
    recent: list[int] | None = None,
) -> int:
    """Pick the next token from one row of logits: greedy at ``temperature <= 0``, otherwise
    temperature, then top-k, then top-p (nucleus), as llama.cpp's default sampler chain does."""
    logits = np.asarray(logits, dtype=np.float32)
    if params.repeat_penalty != 1.0 and recent:
        logits = logits.copy()
        ids = np.unique(np.asarray(recent[-PENALTY_LAST_N:]))
        vals = logits[ids]
        logits[ids] = np.where(vals > 0, vals / params.repeat_penalty, vals * params.repeat_penalty)
    if params.temperature <= 0:
        return int(np.argmax(logits))
    k = params.top_k if 0 < params.top_k < logits.size else logits.size
    ids = np.argpartition(-logits, k - 1)[:k] if k < logits.size else np.arange(logits.size)
    ids = ids[np.argsort(-logits[ids], kind="stable")]
    scaled = logits[ids] / params.temperature
    probs = np.exp(scaled - scaled[0])
    probs /= probs.sum()
    if 0 < params.top_p < 1:
        keep = int(np.searchsorted(np.cumsum(probs), params.top_p)) + 1
        ids, probs = ids[:keep], probs[:keep] / probs[:keep].sum()
    return int(ids[rng.choice(len(ids), p=probs)])


class Engine:
    """Batched decoding of many requests on one llama.cpp model; see the module docstring.

    Args:
        model: registry name, ``name:tag`` or a resolved spec (default: the lab's default model).
        parallel: sequences decoded together (slots).
        n_ctx: context window of each sequence (default: ``LLMLAB_N_CTX``); the llama.cpp
            context holds ``parallel * n_ctx`` tokens.
        n_batch: most tokens per ``llama_decode`` call (prompts are prefilled in chunks of it).
        threads: CPU threads (default: all cores, ``LLMLAB_THREADS``).
        max_queue: requests allowed to wait for a slot before ``submit`` raises QueueFullError.
        flash_attn: llama.cpp's flash-attention kernel (default: ``LLMLAB_FLASH_ATTN``, on,
            as in the llama.cpp backend; both must use the same kernel to give the same
            greedy text, since the two kernels round differently).
        prefix_cache: keep a finished sequence's KV cells as its slot's prompt cache, so a
            request that starts the same way (system prompt, earlier turns) skips that part
            of the prefill; ``False`` clears them as soon as the sequence finishes.
        on_failure: called with the :class:`EngineError` once if decoding fails (on the
            decode thread, before the requests are failed; it must not call ``close()``).
        adapters: ``{"name": path}`` of GGUF LoRA adapters (``part4/fine_tune.py`` makes
            them) loaded once, on top of the model; a request picks some with
            ``lora={"name": scale}``. An adapter recorded as made for another base model
            is refused (:class:`~llmlab.finetune.adapters.AdapterMismatchError`).

    Raises:
        BackendError: the model or an adapter cannot be loaded (the message says why).
    """

    def __init__(
        self,
        model: str | registry.ModelSpec | None = None,
        *,
        parallel: int = 4,
        n_ctx: int | None = None,
        n_batch: int = 512,
        threads: int | None = None,
        max_queue: int = 256,
        gpu_layers: int | None = None,
        flash_attn: bool | None = None,
        prefix_cache: bool = True,
        on_failure: Callable[[EngineError], None] | None = None,
        adapters: dict[str, str] | None = None,
    ):
        import llama_cpp

        # llama-cpp-python logs through this logger; at its default level every line of
        # llama.cpp's loading chatter reaches stderr (verbose=False in the backend does the same).
        logging.getLogger("llama-cpp-python").setLevel(logging.ERROR)
        if parallel < 1:
            raise ValueError("parallel must be at least 1")
        self._ll = llama_cpp
        settings = get_settings()
        self.spec = (
            model
            if isinstance(model, registry.ModelSpec) and model.path
            else registry.resolve(model)
        )
        self.parallel = parallel
        self.n_ctx = n_ctx or settings.n_ctx
        self.n_batch = max(n_batch, parallel)
        self.threads = threads or settings.threads
        self.flash_attn = settings.flash_attn if flash_attn is None else flash_attn
        self.max_queue = max_queue
        if gpu_layers is None:
            gpu_layers = settings.gpu_layers if llama_cpp.llama_supports_gpu_offload() else 0
        self.adapters = self._check_adapters(adapters or {})  # name -> path
        self._loras: dict[str, Any] = {}  # name -> llama.cpp adapter
        self._active: AdapterSet = ()  # the adapters set on the context now
        self._last_group: AdapterSet | None = None  # which adapter set the last decode carried

        # Held while tokenizing and during each llama_decode, so the two never overlap, and
        # by close() while it frees the model (nothing tokenizes a freed vocabulary).
        self._model_lock = threading.Lock()
        self._freed = False
        self.on_failure = on_failure
        self.failure: EngineError | None = None  # why decoding stopped, if it failed
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._waiting: collections.deque[list[Handle]] = collections.deque()  # groups
        self._slots: list[_Sequence | None] = [None] * parallel
        self._next_id = 0
        self._closing = False
        self.steps = 0  # llama_decode calls so far (for lessons and tests)
        self.prefix_cache = prefix_cache
        self._cached: list[list[int]] = [[] for _ in range(parallel)]  # tokens in each slot's KV
        self._cached_under: list[AdapterSet] = [() for _ in range(parallel)]  # ... and adapters
        self.reused_prompt_tokens = 0  # prompt tokens not prefilled thanks to the prefix cache
        self.prefilled_tokens = 0  # prompt tokens decoded (computed) so far
        self.max_batch_sequences = 0  # the most sequences one decode step has carried
        # The model and context are created on the decode thread itself. With an OpenMP
        # build of llama.cpp (the lab builds it without; see envcheck.LLAMA_CPP_CMAKE_ARGS)
        # worker pools belong to the thread that starts a parallel region, and decode steps
        # measured ~1.2-1.5x slower when loading and decoding happened on different threads.
        ready = threading.Event()
        failure: list[BaseException] = []
        self._thread = threading.Thread(
            target=self._run, args=(gpu_layers, ready, failure), name="llmlab-engine", daemon=True
        )
        self._thread.start()
        ready.wait()
        if failure:
            self._thread.join()
            raise failure[0]

    # --- model and context ---------------------------------------------------------

    def _check_adapters(self, adapters: dict[str, str]) -> dict[str, str]:
        """Adapter paths, expanded, each checked to exist and to be made for this model."""
        from llmlab.finetune.adapters import check_adapter

        checked = {}
        for name, path in adapters.items():
            if not name or not isinstance(name, str):
                raise ValueError(f"an adapter needs a name (got {name!r} for {path})")
            path = os.path.expanduser(str(path))
            check_adapter(path, self.spec)  # names both models if it was made for another
            checked[name] = path
        return checked

    def _load_adapters(self) -> None:
        for name, path in self.adapters.items():
            adapter = self._ll.llama_adapter_lora_init(self._model, path.encode())
            if not adapter:
                raise EngineError(
                    f"llama.cpp could not load the LoRA adapter {name!r} ({path}) on "
                    f"{self.spec.ref}: its tensors do not fit this model. Use an adapter "
                    f"made for {self.spec.name} (part4/fine_tune.py writes one)."
                )
            self._loras[name] = adapter

    def _free_model(self) -> None:
        for adapter in self._loras.values():
            self._ll.llama_adapter_lora_free(adapter)
        self._loras = {}
        self._ll.llama_model_free(self._model)

    def _load(self, gpu_layers: int) -> None:
        from llmlab.backends import refuse_a_build_known_to_crash

        refuse_a_build_known_to_crash()  # a clear error, not SIGILL, for a build that crashes here
        ll = self._ll
        ll.llama_backend_init()
        mparams = ll.llama_model_default_params()
        mparams.n_gpu_layers = gpu_layers
        self._model = ll.llama_model_load_from_file(str(self.spec.path).encode(), mparams)
        if not self._model:
            raise load_error(self.spec)  # worded as the llama.cpp backend words it
        try:
            self._load_adapters()
        except EngineError:
            self._free_model()
            raise
        cparams = ll.llama_context_default_params()
        cparams.n_ctx = self.n_ctx * self.parallel
        cparams.n_batch = self.n_batch
        cparams.n_ubatch = self.n_batch
        cparams.n_seq_max = self.parallel
        cparams.n_threads = cparams.n_threads_batch = self.threads
        # One KV stream per sequence: a sequence's attention never sees (or is shaped by)
        # another's cells, which keeps results independent of what else is running.
        cparams.kv_unified = False
        cparams.flash_attn_type = (
            ll.LLAMA_FLASH_ATTN_TYPE_ENABLED
            if self.flash_attn
            else ll.LLAMA_FLASH_ATTN_TYPE_DISABLED
        )
        cparams.no_perf = True
        self._ctx = ll.llama_init_from_model(self._model, cparams)
        if not self._ctx:
            self._free_model()
            raise EngineError(
                f"llama.cpp could not create a context of {self.n_ctx} x {self.parallel} tokens; "
                "lower --parallel or LLMLAB_N_CTX."
            )
        self._memory = ll.llama_get_memory(self._ctx)
        self._vocab = ll.llama_model_get_vocab(self._model)
        self.n_vocab = ll.llama_vocab_n_tokens(self._vocab)
        self._batch = ll.llama_batch_init(self.n_batch, 0, 1)
        self._formatter = None

    def _meta(self, key: str) -> str | None:
        buf = ctypes.create_string_buffer(1 << 16)
        n = self._ll.llama_model_meta_val_str(self._model, key.encode(), buf, len(buf))
        if n < 0:
            return None
        if n >= len(buf):
            buf = ctypes.create_string_buffer(n + 1)
            self._ll.llama_model_meta_val_str(self._model, key.encode(), buf, len(buf))
        return buf.value.decode("utf-8")

    def tokenize(self, text: str, add_bos: bool = False, special: bool = False) -> list[int]:
        """Token ids of ``text``; ``special`` parses control tokens such as ``<|im_start|>``."""
        data = text.encode("utf-8")
        size = len(data) + 8
        buf = (self._ll.llama_token * size)()
        n = self._ll.llama_tokenize(self._vocab, data, len(data), buf, size, add_bos, special)
        if n < 0:
            size = -n
            buf = (self._ll.llama_token * size)()
            n = self._ll.llama_tokenize(self._vocab, data, len(data), buf, size, add_bos, special)
        return list(buf[:n])

    def token_bytes(self, token: int) -> bytes:
        """The bytes of one token's text (control tokens rendered)."""
        buf = ctypes.create_string_buffer(64)
        n = self._ll.llama_token_to_piece(self._vocab, token, buf, len(buf), 0, True)
        if n < 0:
            buf = ctypes.create_string_buffer(-n)
            n = self._ll.llama_token_to_piece(self._vocab, token, buf, len(buf), 0, True)
        return buf.raw[:n]

    def detokenize(self, ids: list[int]) -> str:
        """The text of token ``ids`` (control tokens rendered), the inverse of :meth:`tokenize`.

        Raises:
            EngineError: the engine is closed.
        """
        with self._model_lock:
            self._check_open()
            data = b"".join(self.token_bytes(int(t)) for t in ids)
        return data.decode("utf-8", "replace")

    def apply_chat_template(self, messages: list[Message]) -> str:
        """The prompt text for ``messages``: the GGUF file's own template, rendered with
        llama-cpp-python's Jinja2 formatter exactly as the llama.cpp backend renders it."""
        if self._formatter is None:
            template = self._meta("tokenizer.chat_template")
            if not template:
                raise EngineError(
                    f"{self.spec.ref} has no chat template; submit Request.completion(...)."
                )
            ll, vocab = self._ll, self._vocab
            eos, bos = ll.llama_vocab_eos(vocab), ll.llama_vocab_bos(vocab)
            self._formatter = gguf_chat_formatter(
                template,
                ll.llama_vocab_get_text(vocab, eos).decode() if eos >= 0 else "",
                ll.llama_vocab_get_text(vocab, bos).decode() if bos >= 0 else "",
                add_generation_prompt=True,
            )
        return self._formatter(messages=messages).prompt

    def prompt_tokens(self, request: Request) -> list[int]:
        """The token ids a request starts from (template applied for chats, BOS as the model wants).

        Thread-safe (it waits for a decode step in progress); call it from a worker thread
        in async code, a long prompt takes a while.

        Raises:
            EngineError: the engine is closed.
        """
        with self._model_lock:
            self._check_open()
            return self._prompt_tokens(request)

    def _check_open(self) -> None:
        if self._freed:
            raise EngineError("the engine is closed; create a new one")

    def _prompt_tokens(self, request: Request) -> list[int]:
        if request.messages is not None:
            # The template writes BOS itself where the model wants one.
            return self.tokenize(self.apply_chat_template(request.messages), special=True)
        add_bos = bool(self._ll.llama_vocab_get_add_bos(self._vocab))
        return self.tokenize(request.prompt or "", add_bos=add_bos)

    # --- submission ------------------------------------------------------------------

    def submit(self, request: Request, on_chunk: Callable[[Chunk], None] | None = None) -> Handle:
        """Queue ``request``; returns at once with a :class:`Handle`.

        ``on_chunk`` is called on the engine thread with every chunk (keep it quick); if it
        raises, this request ends with an :class:`EngineError` and the others go on. It may
        submit more requests.

        Raises:
            QueueFullError: ``max_queue`` requests are already waiting.
            ContextOverflowError: the prompt plus ``max_tokens`` exceeds ``n_ctx``.
            EngineError: the engine is closed.
            ValueError: a sampling setting out of its range (:data:`llmlab.chat.PARAM_RANGES`),
                ``logprobs`` outside 0..20, or a ``lora`` adapter the engine has not loaded;
                checked here, because on the decode thread it would stop every request.
        """
        return self.submit_choices(request, 1, on_chunk)[0]

    def submit_choices(
        self, request: Request, n: int, on_chunk: Callable[[Chunk], None] | None = None
    ) -> list[Handle]:
        """Queue ``n`` choices of one request (OpenAI's ``n``): one handle per choice.

        The prompt is prefilled once and its KV cells copied to the other choices'
        sequences, so it costs one prefill, not ``n``. Choice ``i`` samples with ``seed + i``
        when the request has a seed (greedy choices are all the same text). The group waits
        until ``n`` slots are free; cancelling one handle leaves the others running.
        ``on_chunk`` gets every choice's chunks; ``chunk.index`` says whose.

        Raises:
            ValueError: ``n`` is below 1 or above ``parallel``; and as :meth:`submit`.
            QueueFullError, ContextOverflowError, EngineError: as :meth:`submit`.
        """
        if not 1 <= n <= self.parallel:
            raise ValueError(
                f"n={n} choices need {n} sequences at once; this engine decodes at most "
                f"parallel={self.parallel} (ask for 1..{self.parallel}, or start it with more)"
            )
        adapters = self._check_request(request)
        with self._model_lock:
            self._check_open()
            tokens = self._prompt_tokens(request)
            if not tokens:
                raise ValueError("the prompt is empty")
            if len(tokens) + request.params.max_tokens > self.n_ctx:
                raise ContextOverflowError(len(tokens), request.params.max_tokens, self.n_ctx)
            grammars = self._grammars(request.grammar, n)
        with self._lock:
            refusal: EngineError | None = None
            if self.failure is not None:
                refusal = EngineError(
                    f"the engine stopped after a failure ({self.failure}); create a new one"
                )
            elif self._closing:
                refusal = EngineError("the engine is closed; create a new one")
            elif self._queued() + n > self.max_queue:
                refusal = QueueFullError(
                    f"{self._queued()} requests are already waiting (max_queue={self.max_queue}); "
                    "retry later"
                )
            if refusal is not None:
                for grammar in grammars:
                    if grammar is not None:
                        grammar.free()
                raise refusal
            handles = []
            for i, grammar in enumerate(grammars):
                self._next_id += 1
                params = request.params
                if i and params.seed is not None:
                    params = dataclasses.replace(params, seed=params.seed + i)
                handles.append(
                    Handle(
                        self._next_id,
                        tokens,
                        params,
                        on_chunk,
                        grammar,
                        logprobs=request.logprobs,
                        adapters=adapters,
                        index=i,
                    )
                )
            self._waiting.append(handles)
            self._wake.notify()
        return handles

    def _check_request(self, request: Request) -> AdapterSet:
        """Refuse what would fail on the decode thread; return the request's adapter set."""
        if (request.messages is None) == (request.prompt is None):
            raise ValueError("a Request needs exactly one of messages or prompt")
        for name in PARAM_RANGES:
            check_param(name, getattr(request.params, name))
        top = request.logprobs
        if top is not None and (
            isinstance(top, bool) or not isinstance(top, int) or not 0 <= top <= MAX_LOGPROBS
        ):
            raise ValueError(
                f"logprobs must be None or a whole number 0..{MAX_LOGPROBS}, not {top!r}"
            )
        return self._adapter_set(request.lora)

    def _adapter_set(self, lora: dict[str, float] | None) -> AdapterSet:
        """``lora`` checked against the loaded adapters, as sorted (name, scale) pairs."""
        pairs = []
        for name, scale in (lora or {}).items():
            if name not in self.adapters:
                loaded = ", ".join(sorted(self.adapters)) or "none"
                raise ValueError(
                    f"Unknown LoRA adapter {name!r}. Loaded adapters: {loaded} "
                    "(load one with Engine(adapters={name: path}), or --lora NAME=PATH "
                    "for the server)."
                )
            if (
                isinstance(scale, bool)
                or not isinstance(scale, (int, float))
                or not np.isfinite(scale)
            ):
                raise ValueError(
                    f"the scale of LoRA adapter {name!r} must be a number, not {scale!r}"
                )
            if scale != 0:  # a zero scale is the same as leaving the adapter out
                pairs.append((name, float(scale)))
        return tuple(sorted(pairs))

    def _grammars(self, gbnf: str | None, n: int) -> list[Grammar | None]:
        """One grammar sampler per choice (each keeps its own parse state)."""
        if gbnf is None:
            return [None] * n
        grammars: list[Grammar | None] = []
        try:
            for _ in range(n):
                grammars.append(Grammar(self._ll, self._vocab, self.n_vocab, gbnf))
        except BaseException:
            for grammar in grammars:
                grammar.free()
            raise
        return grammars

    def generate(self, requests: list[Request]) -> list[Result]:
        """Run ``requests`` together and return their results in order (a convenience)."""
        handles: list[Handle] = []
        for request in requests:
            while True:
                try:
                    handles.append(self.submit(request))
                    break
                except QueueFullError:
                    # Wait for one of ours to finish, which frees a place in the line.
                    pending = [h for h in handles if not h.done]
                    if not pending:
                        raise
                    pending[0].result()
        return [h.result() for h in handles]

    def chat(self, messages: list[Message], **params) -> Result:
        """One chat reply (it shares the engine with whatever else is running)."""
        return self.submit(Request.chat(messages, **params)).result()

    @property
    def active(self) -> int:
        """Sequences decoding now."""
        return sum(s is not None for s in self._slots)

    @property
    def queued(self) -> int:
        """Requests (choices) waiting for a slot."""
        with self._lock:  # another thread may be changing the queue
            return self._queued()

    def _queued(self) -> int:
        return sum(len(group) for group in self._waiting)

    def close(self) -> None:
        """Stop the decode thread (running and waiting requests end ``interrupted``) and free
        memory; also after a failure. Calling it again does nothing."""
        with self._lock:
            self._closing = True
            self._wake.notify()
        self._thread.join()
        with self._model_lock:
            if self._freed:
                return
            self._freed = True
            ll = self._ll
            ll.llama_batch_free(self._batch)
            ll.llama_free(self._ctx)
            self._free_model()

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- the decode loop (engine thread) ------------------------------------------------

    def _run(self, gpu_layers: int, ready: threading.Event, failure: list) -> None:
        try:
            self._load(gpu_layers)
        except BaseException as exc:  # handed to the constructor, which raises it
            failure.append(exc)
            ready.set()
            return
        ready.set()
        self._loop()

    def _loop(self) -> None:
        try:
            while True:
                with self._lock:
                    while not self._closing and not self._waiting and not self.active:
                        self._wake.wait()
                    if self._closing:
                        break
                    dropped = self._take_cancelled_waiting()
                for handle in dropped:  # outside the lock: a callback may submit
                    handle._complete(_unstarted("interrupted", handle))
                with self._lock:
                    self._admit()
                self._reap_cancelled()
                if self.active:
                    self._step()
        except Exception as exc:  # a broken context fails every request rather than hanging them
            self._fail(EngineError(f"the decode loop stopped: {type(exc).__name__}: {exc}"))
            return
        for i, seq in enumerate(self._slots):
            if seq is not None:
                self._finish(i, "interrupted")
        with self._lock:
            waiting = [h for group in self._waiting for h in group]
            self._waiting = collections.deque()
        for handle in waiting:
            handle._complete(_unstarted("interrupted", handle))

    def _fail(self, error: EngineError) -> None:
        """Refuse new requests, tell ``on_failure``, then fail every running and waiting one."""
        log.error("The engine failed: %s", error)
        with self._lock:
            self.failure = error
            self._closing = True
            handles = [seq.handle for seq in self._slots if seq is not None]
            handles += [h for group in self._waiting for h in group]
            self._waiting.clear()
            self._slots = [None] * self.parallel
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
            if self._cached_under[i] != handle.adapters:  # computed under other adapters
                return 0
            return _shared_prefix(self._cached[i], prompt)

        slot = max(free, key=shared)
        free.remove(slot)
        # At least the last prompt token is decoded again: its logits pick the first token.
        keep = min(shared(slot), len(prompt) - 1)
        self._ll.llama_memory_seq_rm(self._memory, slot, keep, -1)
        self._cached[slot] = []
        seq = _Sequence(handle, seq_id=slot)
        seq.n_past = seq.cached = keep
        self._slots[slot] = seq
        return seq

    def _reap_cancelled(self) -> None:
        for i, seq in enumerate(self._slots):
            if seq is not None and seq.handle.cancelled:
                self._finish(i, "interrupted")

    def _copy_prompt(self, source: _Sequence, follower: _Sequence) -> None:
        """Give ``follower`` the prefilled prompt of ``source`` (a copy of its KV cells)."""
        self._ll.llama_memory_seq_rm(self._memory, follower.seq_id, -1, -1)
        self._ll.llama_memory_seq_cp(self._memory, source.seq_id, follower.seq_id, -1, -1)
        follower.n_past, follower.cached, follower.source = source.n_past, source.cached, None

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

    def _set_adapters(self, adapters: AdapterSet) -> None:
        """Put ``adapters`` on the context (llama.cpp applies adapters per context, not per
        sequence, so one decode carries sequences of one adapter set only)."""
        if adapters == self._active:
            return
        ll, n = self._ll, len(adapters)
        loras = (ll.llama_adapter_lora_p_ctypes * n)(*(self._loras[a] for a, _ in adapters))
        scales = (ctypes.c_float * n)(*(scale for _, scale in adapters))
        if ll.llama_set_adapters_lora(self._ctx, loras if n else None, n, scales if n else None):
            raise RuntimeError(f"llama_set_adapters_lora failed for {adapters}")
        self._active = adapters

    def _decode(self, entries: list[tuple[int, int, int, bool]], adapters: AdapterSet) -> None:
        """One ``llama_decode`` of (token, position, seq_id, wants_logits) entries, all of
        sequences that run under ``adapters``."""
        batch = self._batch
        batch.n_tokens = len(entries)
        for i, (token, pos, seq_id, logits) in enumerate(entries):
            batch.token[i] = token
            batch.pos[i] = pos
            batch.n_seq_id[i] = 1
            batch.seq_id[i][0] = seq_id
            batch.logits[i] = logits
        with self._model_lock:
            self._set_adapters(adapters)
            status = self._ll.llama_decode(self._ctx, batch)
        if status != 0:
            raise RuntimeError(f"llama_decode returned {status}")
        self.steps += 1

    def _logits_row(self, index: int) -> np.ndarray:
        row = self._ll.llama_get_logits_ith(self._ctx, index)
        return np.ctypeslib.as_array(row, shape=(self.n_vocab,))

    def _step(self) -> None:
        """Prefill one waiting prompt chunk, or decode one token of every running sequence
        of one adapter set (the sets take turns)."""
        prefill = next((s for s in self._slots if s is not None and s.prefilling), None)
        if prefill is not None:
            # A prompt goes in on its own (in n_batch chunks), so its numbers never depend
            # on which other prompts happen to arrive at the same time.
            start = prefill.n_past
            chunk = prefill.prompt[start : start + self.n_batch]
            last = start + len(chunk) == len(prefill.prompt)
            self._decode(
                [
                    (t, start + j, prefill.seq_id, last and j == len(chunk) - 1)
                    for j, t in enumerate(chunk)
                ],
                prefill.adapters,
            )
            prefill.n_past += len(chunk)
            self.prefilled_tokens += len(chunk)
            if last:
                logits = self._logits_row(len(chunk) - 1)
                followers, prefill.followers = prefill.followers, []
                for follower in followers:  # before anything can end and reuse the slot
                    self._copy_prompt(prefill, follower)
                for seq in [prefill, *followers]:  # each its own draw from the same logits
                    self._accept(seq, logits)
            return
        running = [s for s in self._slots if s is not None and s.next_token is not None]
        groups: dict[AdapterSet, list[_Sequence]] = {}
        for seq in running:
            groups.setdefault(seq.adapters, []).append(seq)
        if not groups:  # only choices waiting for a prompt copy (cannot last a step)
            return
        self._last_group = next_group(list(groups), self._last_group)
        running = groups[self._last_group]
        self.max_batch_sequences = max(self.max_batch_sequences, len(running))
        self._decode([(s.next_token, s.n_past, s.seq_id, True) for s in running], self._last_group)
        for i, seq in enumerate(running):
            seq.n_past += 1
            self._accept(seq, self._logits_row(i))

    def _accept(self, seq: _Sequence, logits: np.ndarray) -> None:
        """Sample the sequence's next token from ``logits``, stream its text, finish if due."""
        params = seq.params
        history = seq.prompt + seq.generated if params.repeat_penalty != 1.0 else None
        grammar = seq.handle.grammar
        token = sample(logits, params, seq.rng, history)
        if grammar is not None and not grammar.allows(token):
            token = sample(grammar.constrain(logits), params, seq.rng, history)
        slot = seq.seq_id
        if self._ll.llama_vocab_is_eog(self._vocab, token):
            self._finish(slot, "stop")
            return
        if grammar is not None:
            grammar.accept(token)
        if seq.first_token_at is None:
            seq.first_token_at = time.perf_counter()
        seq.generated.append(token)
        piece = seq.decoder.decode(self.token_bytes(token))
        if seq.logprobs is not None:
            top = seq.handle.logprobs
            seq.track(token_logprob(logits, token, top, self.token_bytes), piece)
        text, hit = seq.matcher.feed(piece)
        if hit:
            self._finish(slot, "stop", text, hit=True)
            return
        if len(seq.generated) >= params.max_tokens:
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
        if not hit:
            text += seq.matcher.flush() + seq.decoder.decode(b"", final=True)
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
            self._ll.llama_memory_seq_rm(self._memory, seq.seq_id, -1, -1)
        with self._lock:
            self._slots[slot] = None
        seq.handle._complete(Result(seq.text, reason, usage, timings, seq.logprobs))
