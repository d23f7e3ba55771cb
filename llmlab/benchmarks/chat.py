"""Chat suite for ``make bench``: decode speed through ChatSession streaming vs raw llama.cpp.

Both sides run the default model from the same GGUF file with the same threads and
context, on the same prompt token ids (the chat template rendered once), greedy, for the
same number of tokens. The raw side is a plain ``llama_cpp.Llama.generate`` loop that
ignores end-of-sequence, so it decodes exactly as many tokens as the session's reply
had. Runs alternate (raw, session, raw, ...) so background load hits both alike; the
median of each is reported. Decode speed is tokens after the first over the time after
the first, as :class:`~llmlab.backends.base.Timings` defines it.
"""

from __future__ import annotations

import statistics
import time

from llmlab import backends, registry
from llmlab.bench import Row
from llmlab.chat import ChatSession
from llmlab.settings import get_settings

SUITE = "chat"
PROMPT = "Write a long story about a robot who learns to paint. Describe every day in detail."


def _session_run(session: ChatSession, max_tokens: int) -> tuple[float, int]:
    """One streamed reply; returns (decode tok/s, completion tokens)."""
    session.reset()
    first = last = None
    for chunk in session.stream(PROMPT, max_tokens=max_tokens):
        if chunk.text:
            last = time.perf_counter()
            first = first or last
    tokens = session.last_result.usage.completion_tokens
    decode = (tokens - 1) / (last - first) if tokens > 1 and last > first else 0.0
    return decode, tokens


def _raw_run(llm, ids: list[int], tokens: int) -> float:
    """Greedy llama.cpp decoding of exactly ``tokens`` tokens; returns decode tok/s."""
    first = last = None
    n = 0
    stream = llm.generate(ids, temp=0.0, top_k=40, top_p=0.95, min_p=0.0, repeat_penalty=1.0)
    for token in stream:
        llm.detokenize([token])  # the text is wanted too, as in any chat
        n += 1
        last = time.perf_counter()
        first = first or last
        if n >= tokens:
            break
    stream.close()
    return (n - 1) / (last - first) if n > 1 else 0.0


def run(quick: bool = False) -> list[Row]:
    """Measure both paths side by side; quick: 16 tokens, one round."""
    from llama_cpp import Llama

    settings = get_settings()
    max_tokens, rounds = (16, 1) if quick else (128, 5)
    spec = registry.resolve(settings.default_model)
    n_ctx = 1024
    model = backends.load(spec, backend="llama.cpp", n_ctx=n_ctx, threads=settings.threads)
    session = ChatSession(model, params={"temperature": 0.0, "max_tokens": max_tokens})
    raw = Llama(
        model_path=str(spec.path),
        n_ctx=n_ctx,
        n_threads=settings.threads,
        n_threads_batch=settings.threads,
        n_gpu_layers=0 if model.info()["device"] == "cpu" else settings.gpu_layers,
        verbose=False,
    )
    try:
        prompt = model.apply_chat_template([{"role": "user", "content": PROMPT}])
        ids = raw.tokenize(prompt.encode("utf-8"), add_bos=False, special=True)
        _, tokens = _session_run(session, max_tokens)  # warm-up; fixes the token count
        if session.last_result.usage.prompt_tokens != len(ids):
            raise RuntimeError("ChatSession and the raw loop would see different prompts")
        _raw_run(raw, ids, tokens)
        raw_runs, session_runs = [], []
        for _ in range(rounds):
            raw_runs.append(_raw_run(raw, ids, tokens))
            decode, n = _session_run(session, max_tokens)
            if n != tokens:
                raise RuntimeError(f"greedy replies differ in length ({n} vs {tokens} tokens)")
            session_runs.append(decode)
    finally:
        raw.close()
        model.close()

    note = f"{spec.ref}, {settings.threads} threads, {len(ids)} prompt + {tokens} tokens, greedy, median of {rounds}"
    raw_row = Row(SUITE, "raw llama.cpp", "decode", statistics.median(raw_runs), "tok/s", note=note)
    ours = Row.compared(
        SUITE,
        "ChatSession stream",
        "decode",
        statistics.median(session_runs),
        "tok/s",
        raw_row,
        note,
    )
    return [raw_row, ours]
