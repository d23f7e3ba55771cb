"""Batch suite for ``make bench``: the continuous-batching engine against a plain loop.

The same prompts (32 chat requests, 64 new tokens at most, greedy) run four ways with
the default model, all cores and the same per-sequence context:

- a loop over llama-cpp-python's high-level API (``Llama.create_chat_completion``), the
  baseline a learner would write first;
- :class:`llmlab.engine.Engine` with ``parallel=1`` (the same loop through our engine:
  separates the engine's own overhead from the gain of batching);
- the engine with ``parallel=8`` (eight sequences per ``llama_decode``);
- the loop again with flash attention (``Llama(flash_attn=True)``), the kernel the engine
  and the lab's llama.cpp backend use by default, so the engine's gain can also be read
  against a loop on the same kernel.

Then whole processes, as a user runs them (start-up, model load and writing included):
``part3/batch_process.py --parallel 8`` in its default configuration (the batch-friendly
format it picks, see :mod:`llmlab.registry.batch_format`) against a plain script that loops
over llama-cpp-python on the shipped file and on the file ``batch_process.py`` chose.

Last, what the kernels allow: ``llama_decode`` steps alone (no prompt, no sampling) of one
sequence of the shipped file, and of one and ``parallel`` sequences of the chosen file.
They bound the whole-process gain over the shipped loop and the server's gain from 1
client to 8 on this CPU (CPUs differ: on some, one sequence is so fast that 8 of Q8_0 per
step give under 2x its tokens).

Each side runs in a fresh process (:func:`llmlab.bench.isolated`), so no side inherits
another's threads. Aggregate tokens/s is completion tokens over wall time, prompt prefill
included. Greedy decoding makes every side generate nearly the same tokens (the two attention kernels
round differently, so a reply may take another path after a near-tie; tokens are
counted per side). The engine's prefix cache keeps the shared start of the prompts (the
chat template's system prompt) between requests, as llama-cpp-python's ``Llama`` does
between consecutive calls. Each side gets a warm-up request first.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from llmlab import registry
from llmlab.bench import Row, isolated, timer
from llmlab.engine import Engine, Request
from llmlab.registry import batch_format
from llmlab.settings import get_settings

SUITE = "batch"
TOPICS = [
    "the sea",
    "a lighthouse",
    "bread",
    "bicycles",
    "winter",
    "bees",
    "a library",
    "volcanoes",
    "the moon",
    "trains",
    "gardening",
    "rain",
    "chess",
    "owls",
    "coffee",
    "mountains",
    "a market",
    "clocks",
    "rivers",
    "kites",
    "paper",
    "robots",
    "deserts",
    "music",
    "bridges",
    "snow",
    "maps",
    "whales",
    "tea",
    "forests",
    "lanterns",
    "a harbour",
]
N_CTX = 512
REPO = Path(__file__).resolve().parents[2]
# The plain script a learner writes first, run as its own process: load, loop, exit.
LOOP_SCRIPT = """
import json, sys
from llama_cpp import Llama
path, prompts, max_tokens, threads, n_ctx = sys.argv[1:6]
llm = Llama(model_path=path, n_ctx=int(n_ctx), n_threads=int(threads), verbose=False)
if "tokenizer.chat_template" in llm.metadata:
    llm.chat_format = "chat_template.default"
tokens = 0
for line in open(prompts):
    reply = llm.create_chat_completion(json.loads(line)["messages"], max_tokens=int(max_tokens), temperature=0)
    tokens += reply["usage"]["completion_tokens"]
print(tokens)
"""


def prompts(n: int) -> list[list[dict[str, str]]]:
    """``n`` distinct one-turn chats."""
    return [
        [{"role": "user", "content": f"Write a short paragraph about {TOPICS[i % len(TOPICS)]}."}]
        for i in range(n)
    ]


def _loop(chats: list, max_tokens: int, threads: int, flash_attn: bool) -> tuple[float, int]:
    from llama_cpp import Llama

    llm = Llama(
        model_path=str(registry.resolve().path),
        n_ctx=N_CTX,
        n_threads=threads,
        n_threads_batch=threads,
        flash_attn=flash_attn,
        verbose=False,
    )
    try:
        if "tokenizer.chat_template" in llm.metadata:
            llm.chat_format = "chat_template.default"  # the file's template, as the backend uses
        llm.create_chat_completion(chats[0], max_tokens=4, temperature=0)  # warm-up
        tokens = 0
        with timer() as t:
            for messages in chats:
                reply = llm.create_chat_completion(messages, max_tokens=max_tokens, temperature=0)
                tokens += reply["usage"]["completion_tokens"]
        return t.seconds, tokens
    finally:
        llm.close()


def _engine(
    chats: list, max_tokens: int, parallel: int, threads: int, flash_attn: bool | None = None
) -> tuple[float, int]:
    with Engine(parallel=parallel, n_ctx=N_CTX, threads=threads, flash_attn=flash_attn) as engine:
        engine.chat(chats[0], max_tokens=4, temperature=0)  # warm-up
        requests = [Request.chat(m, max_tokens=max_tokens, temperature=0) for m in chats]
        with timer() as t:
            results = engine.generate(requests)
        return t.seconds, sum(r.usage.completion_tokens for r in results)


def bare_decode(spec, sequences: int, steps: int, threads: int) -> float:
    """Tokens/s of ``llama_decode`` alone: ``steps`` steps of one token for each of
    ``sequences`` sequences, no sampling, no prompt, through the engine's own context."""
    from llmlab.engine.context import LlamaContext

    logging.getLogger("llama-cpp-python").setLevel(logging.ERROR)  # as Engine does
    ctx = LlamaContext(spec, parallel=sequences, n_ctx=N_CTX, n_batch=512, threads=threads,
                       gpu_layers=0, flash_attn=True, adapters={})  # fmt: skip
    try:
        step = [(100 + s, 0, s, True) for s in range(sequences)]
        ctx.decode(step, ())  # warm-up: the first step allocates
        with timer() as t:
            for position in range(1, steps + 1):
                ctx.decode([(token, position, s, True) for token, _, s, _ in step], ())
        return sequences * steps / t.seconds
    finally:
        ctx.close()


def kernel_rows(shipped, chosen, parallel: int, threads: int, steps: int) -> list[Row]:
    """What llama.cpp's kernels allow on this CPU: decode steps alone (each in its own
    process) of one sequence of the shipped file, and of one and ``parallel`` sequences of
    the chosen file. The last over the first bounds what ``batch_process.py`` can gain over
    the plain loop on the shipped file; the last over the second, what the server (which
    runs the chosen file) gains from 1 client to ``parallel``."""
    note = f"llama_decode alone, {steps} steps, {threads} threads, no prompt or sampling"

    def row(spec, sequences: int, baseline: Row | None = None) -> Row:
        case = f"decode steps alone, {batch_format.source_format(spec)}, "
        case += f"{sequences} sequence{'s' if sequences > 1 else ''}"
        value = isolated(bare_decode, spec, sequences, steps, threads)
        if baseline is None:
            return Row(SUITE, case, "aggregate", value, "tok/s", note=note)
        return Row.compared(SUITE, case, "aggregate", value, "tok/s", baseline, note=note)

    alone = row(shipped, 1)
    rows = [alone]
    if chosen.path != shipped.path:
        rows.append(row(chosen, 1, alone))
    rows.append(row(chosen, parallel, alone))
    return rows


def _timed(command: list[str]) -> tuple[float, str]:
    """Wall seconds of a whole process and its stdout; a failed run raises with its stderr."""
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, cwd=REPO)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"{command[1]} failed ({done.returncode}):\n{done.stderr[-2000:]}")
    return seconds, done.stdout


def whole_process_rows(
    chats: list, max_tokens: int, parallel: int, threads: int, shipped, chosen
) -> list[Row]:
    """``batch_process.py`` in its default configuration against plain-loop scripts over
    the ``shipped`` file and over the one it chose (``chosen``), each timed as a whole
    process on the same prompts. (With ``LLMLAB_EXACT_MODEL=1`` both are the shipped file,
    and it is looped over once.)"""
    note = f"{len(chats)} prompts x {max_tokens} new tokens, greedy, {threads} threads, "
    note += "whole process"
    with tempfile.TemporaryDirectory() as tmp:
        prompts_file, output = Path(tmp, "prompts.jsonl"), Path(tmp, "out.jsonl")
        prompts_file.write_text("".join(json.dumps({"messages": m}) + "\n" for m in chats))

        def loop_row(label: str, spec) -> Row:
            seconds, out = _timed(
                [sys.executable, "-c", LOOP_SCRIPT, str(spec.path), str(prompts_file),
                 str(max_tokens), str(threads), str(N_CTX)]
            )  # fmt: skip
            case = f"plain loop script, {label}{batch_format.source_format(spec)}"
            return Row(SUITE, case, "aggregate", int(out.split()[-1]) / seconds, "tok/s", note=note)

        # batch_process runs between the two loops, so each ratio's two processes are
        # neighbours in time and a machine that drifts during the suite shifts both alike.
        loops = [loop_row("shipped ", shipped)]
        seconds, _ = _timed(
            [sys.executable, "part3/batch_process.py", str(prompts_file), "-o", str(output),
             "--parallel", str(parallel), "--max-tokens", str(max_tokens), "--temperature", "0",
             "--n-ctx", str(N_CTX)]
        )  # fmt: skip
        tokens = sum(
            json.loads(line)["usage"]["completion_tokens"]
            for line in output.read_text().splitlines()
        )
        if chosen.path != shipped.path:
            loops.append(loop_row("", chosen))
    case = f"batch_process.py --parallel {parallel} ({batch_format.source_format(chosen)})"
    batched = [
        Row.compared(SUITE, case, "aggregate", tokens / seconds, "tok/s", baseline=loop, note=note)
        for loop in reversed(loops)
    ]
    return [*loops, *batched]


def run(quick: bool = False) -> list[Row]:
    """Aggregate tokens/s of the plain loop, the engine at parallel 1 and 8 (4 when quick),
    the loop with flash attention (the engine's default kernel), and ``batch_process.py``
    against plain-loop scripts as whole processes."""
    n, max_tokens, parallel = (4, 16, 4) if quick else (32, 64, 8)
    threads = get_settings().threads
    chats = prompts(n)
    note = f"{n} prompts x {max_tokens} new tokens, greedy, {threads} threads"

    def tps(seconds_tokens: tuple[float, int]) -> float:
        seconds, tokens = seconds_tokens
        return tokens / seconds

    loop = Row(
        SUITE,
        "llama-cpp-python loop",
        "aggregate",
        tps(isolated(_loop, chats, max_tokens, threads, flash_attn=False)),
        "tok/s",
        note=note + ", llama-cpp-python's default kernel",
    )
    rows = [loop]
    for p in (1, parallel):
        rows.append(
            Row.compared(
                SUITE,
                f"engine parallel={p}",
                "aggregate",
                tps(isolated(_engine, chats, max_tokens, p, threads)),
                "tok/s",
                baseline=loop,
                note=note + ", flash attention (the engine's default)",
            )
        )
    loop_fa = Row(
        SUITE,
        "llama-cpp-python loop, flash_attn",
        "aggregate",
        tps(isolated(_loop, chats, max_tokens, threads, flash_attn=True)),
        "tok/s",
        note=note,
    )
    same_kernel = Row.compared(
        SUITE,
        f"engine parallel={parallel}, same kernel as the loop",
        "aggregate",
        rows[-1].value,
        "tok/s",
        baseline=loop_fa,
        note=note + " (the engine figure above, against the loop with flash attention)",
    )
    shipped = registry.resolve()
    # Made (once) before the clock starts: a first run's quantizing is not the steady state.
    chosen = batch_format.choose(shipped, say=lambda message: None).spec
    whole = whole_process_rows(chats, max_tokens, parallel, threads, shipped, chosen)
    kernels = kernel_rows(shipped, chosen, parallel, threads, steps=16 if quick else 128)
    return [*rows, loop_fa, same_kernel, *whole, *kernels]
