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
Just before a prompt's first chunk is prefilled, the other slots are looked at too: when
one of them (running, or a cache) holds at least ``MIN_COPIED_PREFIX`` more of the
prompt's start, its cells are copied (``llama_memory_seq_cp``), so prompts admitted
together, as a batch job's are, prefill their common template once, not once per slot.
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

Prefill: by default a waiting prompt is *mixed* into the decode steps, as llama.cpp's server
does: each ``llama_decode`` carries the next token of every running sequence plus up to
``prefill_chunk`` prompt tokens (up to ``n_batch`` while none is running), so an arriving
request lengthens the running streams' steps a little instead of pausing them for its whole
prefill. ``Engine(deterministic=True)``
prefills each prompt alone instead, and then greedy output (``temperature=0``) is bit-for-bit
the same whether a request runs alone or beside others: each sequence has its own KV stream
(``kv_unified=False``) and a prompt's chunks never depend on its neighbours. (With one KV
buffer shared by all sequences and llama.cpp's standard attention kernel, logits of the same
prompt differed by up to ~1 between runs and greedy tokens flipped.) :class:`Engine` says
which mode costs what and why mixed is the default. The attention kernel is the llama.cpp
backend's (flash attention, unless ``LLMLAB_FLASH_ATTN=0``), so deterministic greedy text
equals ``backends.load(...).chat(..., temperature=0)``; sampled text with the same seed and
settings equals the backend's too (both sample with llama.cpp's chain, in llama.cpp's order:
top-k, top-p on the model's own probabilities, then temperature). The two attention kernels
round differently: with SmolLM2-135M, 9 of 16 greedy 32-token replies differed somewhere
between them, so both sides must use the same one.

The parts: :mod:`llmlab.engine.context` wraps llama.cpp (model, tokens, template, decode,
logits, KV memory, adapters) and keeps its ggml worker threads for the context's life
(:mod:`llmlab.engine.threadpool`, as llama.cpp's server does, instead of ggml starting and
joining them in every decode); :mod:`llmlab.engine.scheduler` holds the queue and slots and
runs the steps, reaching the model only through a small ``Context`` interface (tests drive
it with a fake model, ``tests/unit/test_engine_scheduler.py``) and a per-sequence
``Sampler``: :class:`llmlab.sampling.SlotSampler`, llama.cpp's own sampler chain (repeat
penalty, top-k, top-p, then temperature, as the llama.cpp backend samples), made with the
request's handle; :mod:`llmlab.engine.requests` has the request and handle types, and
:mod:`llmlab.engine.logprobs` the logprobs of generated tokens. Text goes through the
backends' shared :class:`llmlab.backends.text_stream.TextStream` (UTF-8, stop strings).

Speed depends on the weight format: on x86 without AMX, llama.cpp has batched (GEMM)
kernels for Q8_0, Q4_0 and IQ4_NL but not for Q4_1, so batching pays far more on the
former (``llmlab.registry.batch_format`` picks such a file by default); ``make bench``
(suites ``batch`` and ``serving``) measures the engine against a plain loop and against
llama.cpp's own server.
"""

from __future__ import annotations

from llmlab.engine.core import PREFILL_CHUNK, Engine
from llmlab.engine.logprobs import token_logprob
from llmlab.engine.requests import (
    MAX_LOGPROBS,
    AdapterSet,
    EngineError,
    Handle,
    QueueFullError,
    Request,
)
from llmlab.engine.scheduler import Context, Sampler, Scheduler, next_group

__all__ = [
    "MAX_LOGPROBS",
    "PREFILL_CHUNK",
    "AdapterSet",
    "Context",
    "Engine",
    "EngineError",
    "Handle",
    "QueueFullError",
    "Request",
    "Scheduler",
    "Sampler",
    "next_group",
    "token_logprob",
]
