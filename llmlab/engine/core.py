"""The :class:`Engine`: one model, a decode thread running the scheduler, and submission."""

from __future__ import annotations

import dataclasses
import itertools
import logging
import threading
from collections.abc import Callable
from typing import Any

import numpy as np

from llmlab import registry
from llmlab.backends.base import Chunk, ContextOverflowError, GenerationParams, Message, Result
from llmlab.chat import PARAM_RANGES, check_param
from llmlab.engine.context import LlamaContext, check_adapters
from llmlab.engine.requests import (
    MAX_LOGPROBS,
    AdapterSet,
    EngineError,
    Handle,
    QueueFullError,
    Request,
)
from llmlab.engine.scheduler import Context, Scheduler
from llmlab.settings import get_settings

# Mixed mode: the most prompt tokens one decode step carries beside the running sequences.
PREFILL_CHUNK = 64


class Engine:
    """Batched decoding of many requests on one llama.cpp model; see the package docstring.

    Two ways to take in a prompt that arrives while others stream:

    - mixed (the default, as llama.cpp's server does): each ``llama_decode`` carries the
      next token of every running sequence plus up to ``prefill_chunk`` tokens of waiting
      prompts, so a new request costs the running streams a slightly longer step, not a
      pause for its whole prefill, and a long prompt goes in over several steps. While
      no sequence is running there is nobody to hold up, so a step then takes up to
      ``n_batch`` prompt tokens (a burst of requests is prefilled together). Greedy
      text stays valid text of the requested length, but it is not promised to be
      bit-identical alone and beside others: a prompt's chunks fall differently depending
      on its neighbours, and the kernels may round differently for other batch shapes.
    - ``deterministic=True``: a prompt is prefilled alone, in ``n_batch`` chunks, while the
      running sequences wait; greedy output (``temperature=0``) is then bit-for-bit the same
      alone and batched, and equal to the llama.cpp backend's on the same attention kernel.

    Mixed is the default because a server's streams should not stall each time a client
    arrives; tests and lessons that compare runs token by token, and batch jobs
    (``part3/batch_process.py``: the same rows at any ``--parallel``), ask for
    ``deterministic=True``. What each costs: about the same throughput when requests
    arrive together; when a long prompt arrives while others stream, its time to first
    token is about the same, but the longest pause of a running stream shrinks from its
    whole prefill to a few chunk-sized steps (3-4x shorter at the default chunk on the
    development machine).

    ``prefill_chunk=64`` (the default) keeps that pause a few times shorter than the
    prefill without making the new request wait noticeably longer.

    Args:
        model: registry name, ``name:tag`` or a resolved spec (default: the lab's default model).
        parallel: sequences decoded together (slots).
        n_ctx: context window of each sequence (default: ``LLMLAB_N_CTX``); the llama.cpp
            context holds ``parallel * n_ctx`` tokens.
        n_batch: most tokens per ``llama_decode`` call (deterministic mode prefills prompts
            in chunks of it).
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
        deterministic: prefill prompts alone (see above); default mixed prefill.
        prefill_chunk: mixed mode: the token budget for prompts in one step (on top of
            one token per running sequence; at most ``n_batch - parallel``). Smaller keeps
            running streams smoother, larger takes long prompts in faster.
        context: an already loaded model context instead of ``model`` (a test's fake
            model; see :class:`llmlab.engine.scheduler.Context` for what it needs, plus
            ``tokenize``, ``token_bytes``, ``apply_chat_template``, ``add_bos``,
            ``sampler``, ``close`` and ``spec``). ``adapters`` then names the ones it has.

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
        deterministic: bool = False,
        prefill_chunk: int = PREFILL_CHUNK,
        context: Any = None,
    ):
        # llama-cpp-python logs through this logger; at its default level every line of
        # llama.cpp's loading chatter reaches stderr (verbose=False in the backend does the same).
        logging.getLogger("llama-cpp-python").setLevel(logging.ERROR)
        if parallel < 1:
            raise ValueError("parallel must be at least 1")
        settings = get_settings()
        self.parallel = parallel
        self.n_ctx = n_ctx or settings.n_ctx
        self.n_batch = max(n_batch, parallel + 1)
        self.threads = threads or settings.threads
        self.flash_attn = settings.flash_attn if flash_attn is None else flash_attn
        self.max_queue = max_queue
        self.deterministic = deterministic
        self.prefix_cache = prefix_cache
        self._prefill_chunk = prefill_chunk
        # Held while tokenizing and during each llama_decode, so the two never overlap, and
        # by close() while it frees the model (nothing tokenizes a freed vocabulary).
        self._model_lock = threading.Lock()
        self._freed = False
        self._ids = itertools.count(1)
        self._on_failure = on_failure
        if context is not None:
            self.spec = context.spec
            self.adapters = dict(adapters or {})
            self._start(lambda: context)
            return
        self.spec = (
            model
            if isinstance(model, registry.ModelSpec) and model.path
            else registry.resolve(model)
        )
        self.adapters = check_adapters(adapters or {}, self.spec)  # name -> path
        if gpu_layers is None:
            import llama_cpp

            gpu_layers = settings.gpu_layers if llama_cpp.llama_supports_gpu_offload() else 0
        self._start(
            lambda: LlamaContext(
                self.spec,
                parallel=parallel,
                n_ctx=self.n_ctx,
                n_batch=self.n_batch,
                threads=self.threads,
                gpu_layers=gpu_layers,
                flash_attn=self.flash_attn,
                adapters=self.adapters,
            )
        )

    def _start(self, load: Callable[[], Context]) -> None:
        """Load the context on the decode thread and start its scheduler there.

        With an OpenMP build of llama.cpp (the lab builds it without; see
        envcheck.LLAMA_CPP_CMAKE_ARGS) worker pools belong to the thread that starts a
        parallel region, and decode steps measured ~1.2-1.5x slower when loading and
        decoding happened on different threads.
        """
        ready = threading.Event()
        failure: list[BaseException] = []

        def run() -> None:
            try:
                self._ctx = load()
                self.n_vocab = self._ctx.n_vocab
                self._scheduler = Scheduler(
                    self._ctx,
                    parallel=self.parallel,
                    n_batch=self.n_batch,
                    prefill_chunk=self._prefill_chunk,
                    deterministic=self.deterministic,
                    max_queue=self.max_queue,
                    prefix_cache=self.prefix_cache,
                    model_lock=self._model_lock,
                    on_failure=self._on_failure,
                )
            except BaseException as exc:  # handed to the constructor, which raises it
                failure.append(exc)
                ready.set()
                return
            ready.set()
            self._scheduler.loop()

        self._thread = threading.Thread(target=run, name="llmlab-engine", daemon=True)
        self._thread.start()
        ready.wait()
        if failure:
            self._thread.join()
            raise failure[0]

    # --- what the scheduler counts and knows ---------------------------------------

    @property
    def prefill_chunk(self) -> int:
        """Mixed mode: the most prompt tokens one step carries (after clamping to n_batch)."""
        return self._scheduler.prefill_chunk

    @property
    def failure(self) -> EngineError | None:
        """Why decoding stopped, if it failed (then the engine refuses new requests)."""
        return self._scheduler.failure

    @property
    def steps(self) -> int:
        """``llama_decode`` calls so far (for lessons and tests)."""
        return self._scheduler.steps

    @property
    def reused_prompt_tokens(self) -> int:
        """Prompt tokens not prefilled thanks to the prefix cache."""
        return self._scheduler.reused_prompt_tokens

    @property
    def copied_prompt_tokens(self) -> int:
        """Of :attr:`reused_prompt_tokens`, those copied from another slot's cells."""
        return self._scheduler.copied_prompt_tokens

    @property
    def prefilled_tokens(self) -> int:
        """Prompt tokens decoded (computed) so far."""
        return self._scheduler.prefilled_tokens

    @property
    def max_batch_sequences(self) -> int:
        """The most sequences one decode step has carried."""
        return self._scheduler.max_batch_sequences

    @property
    def active(self) -> int:
        """Sequences decoding now."""
        return self._scheduler.active

    @property
    def queued(self) -> int:
        """Requests (choices) waiting for a slot."""
        return self._scheduler.queued

    # --- text --------------------------------------------------------------------------

    def tokenize(self, text: str, add_bos: bool = False, special: bool = False) -> list[int]:
        """Token ids of ``text``; ``special`` parses control tokens such as ``<|im_start|>``."""
        return self._ctx.tokenize(text, add_bos=add_bos, special=special)

    def token_bytes(self, token: int) -> bytes:
        """The bytes of one token's text (control tokens rendered)."""
        return self._ctx.token_bytes(token)

    def detokenize(self, ids: list[int]) -> str:
        """The text of token ``ids`` (control tokens rendered), the inverse of :meth:`tokenize`.

        Raises:
            EngineError: the engine is closed.
        """
        with self._model_lock:
            self._check_open()
            data = b"".join(self._ctx.token_bytes(int(t)) for t in ids)
        return data.decode("utf-8", "replace")

    @property
    def chat_template(self) -> str | None:
        """The GGUF file's chat template (Jinja2 text), or None if it has none."""
        return self._ctx.chat_template

    def apply_chat_template(self, messages: list[Message], tools: list[dict] | None = None) -> str:
        """The prompt text for ``messages`` (and ``tools``, for a template that renders them):
        the GGUF file's own template, rendered with llama-cpp-python's Jinja2 formatter
        exactly as the llama.cpp backend renders it."""
        return self._ctx.apply_chat_template(messages, tools)

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
            prompt = self.apply_chat_template(request.messages, request.tools)
            return self.tokenize(prompt, special=True)
        return self.tokenize(request.prompt or "", add_bos=self._ctx.add_bos)

    # --- submission ------------------------------------------------------------------

    def submit(
        self,
        request: Request,
        on_chunk: Callable[[Chunk], None] | None = None,
        *,
        check_prompt: Callable[[list[int]], None] | None = None,
    ) -> Handle:
        """Queue ``request``; returns at once with a :class:`Handle`.

        ``on_chunk`` is called on the engine thread with every chunk (keep it quick); if it
        raises, this request ends with an :class:`EngineError` and the others go on. It may
        submit more requests.

        ``check_prompt`` is called with the prompt's token ids before the request is
        queued; whatever it raises refuses the request (a server checks its own limits
        there, so a prompt is rendered and tokenized once).

        Raises:
            QueueFullError: ``max_queue`` requests are already waiting.
            ContextOverflowError: the prompt plus ``max_tokens`` exceeds ``n_ctx``.
            EngineError: the engine is closed.
            ValueError: a sampling setting out of its range (:data:`llmlab.chat.PARAM_RANGES`),
                ``logprobs`` outside 0..20, or a ``lora`` adapter the engine has not loaded;
                checked here, because on the decode thread it would stop every request.
        """
        return self.submit_choices(request, 1, on_chunk, check_prompt=check_prompt)[0]

    def submit_choices(
        self,
        request: Request,
        n: int,
        on_chunk: Callable[[Chunk], None] | None = None,
        *,
        check_prompt: Callable[[list[int]], None] | None = None,
    ) -> list[Handle]:
        """Queue ``n`` choices of one request (OpenAI's ``n``): one handle per choice.

        The prompt is prefilled once and its KV cells copied to the other choices'
        sequences, so it costs one prefill, not ``n``. Choice ``i`` samples with ``seed + i``
        when the request has a seed (greedy choices are all the same text). The group waits
        until ``n`` slots are free; cancelling one handle leaves the others running.
        ``on_chunk`` gets every choice's chunks; ``chunk.index`` says whose;
        ``check_prompt`` is as in :meth:`submit`, called once for the group.

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
            if check_prompt is not None:
                check_prompt(tokens)
            if len(tokens) + request.params.max_tokens > self.n_ctx:
                raise ContextOverflowError(len(tokens), request.params.max_tokens, self.n_ctx)
            params = [request.params] * n
            if request.params.seed is not None:
                params = [
                    dataclasses.replace(request.params, seed=request.params.seed + i)
                    for i in range(n)
                ]
            samplers = self._samplers(params, request.grammar)
        handles = []
        for i, sampler in enumerate(samplers):
            handles.append(
                Handle(
                    next(self._ids),
                    tokens,
                    params[i],
                    on_chunk,
                    sampler,
                    logprobs=request.logprobs,
                    adapters=adapters,
                    index=i,
                )
            )
        self._scheduler.enqueue(handles)  # frees the samplers if it refuses
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

    def _samplers(self, params: list[GenerationParams], gbnf: str | None) -> list[Any]:
        """One llama.cpp sampler chain per choice (each with its own seed and grammar state);
        made here, so a grammar that does not parse is refused at submit."""
        samplers: list[Any] = []
        try:
            for each in params:
                samplers.append(self._ctx.sampler(each, gbnf))
        except BaseException:
            for sampler in samplers:
                sampler.free()
            raise
        return samplers

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

    def close(self) -> None:
        """Stop the decode thread (running and waiting requests end ``interrupted``) and free
        memory; also after a failure. Calling it again does nothing."""
        self._scheduler.close()
        self._thread.join()
        with self._model_lock:
            if self._freed:
                return
            self._freed = True
            self._ctx.close()

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
