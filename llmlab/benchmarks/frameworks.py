"""Framework comparison for ``make bench``: the same model and prompts through llama.cpp,
transformers (fp32 on CPU, fp16 on a GPU) and bitsandbytes 8-bit where it runs::

    from llmlab.benchmarks import frameworks
    rows = frameworks.measure(max_tokens=32, threads=[1, 2])    # list[llmlab.bench.Row]

Figures per engine: load time, time to first token (prompt processing plus one step), decode
tokens/s, and the resident memory added by loading and generating; then llama.cpp's and
transformers' decode speed with 1..N threads. Ratios are against llama.cpp measured in the
same run. Notebook 09 reads these rows from ``bench-results/bench.json``.
"""

from __future__ import annotations

import importlib.util
import logging
from collections.abc import Callable
from statistics import median
from typing import Any

from llmlab.bench import Row, peak_memory, timer
from llmlab.hardware import cpu_cores

SUITE = "frameworks"
PROMPTS = [
    "Explain in two sentences why the sky is blue.",
    "Write a short list of three tips for learning to cook.",
]
ENGINES = {
    "llama.cpp": {"backend": "llama.cpp"},
    "transformers": {"backend": "transformers"},
    "transformers 8bit": {"backend": "transformers", "quantization": "8bit"},
}
MiB = 1 << 20


def bitsandbytes_available() -> bool:
    """Whether bitsandbytes is installed (it runs on CUDA, and on CPU in recent versions)."""
    return importlib.util.find_spec("bitsandbytes") is not None


def engine_figures(
    load: Callable[[], Any], prompts: list[str], max_tokens: int
) -> dict[str, float]:
    """Load with ``load()``, answer every prompt greedily: load time, median time to first
    token and tokens/s, and the resident memory added meanwhile (MiB)."""
    with peak_memory() as memory:
        with timer() as loading:
            model = load()
            model.ensure_loaded()
        replies = [
            model.chat([{"role": "user", "content": p}], max_tokens=max_tokens, temperature=0)
            for p in prompts
        ]
    model.close()
    return {
        "load": loading.seconds,
        "ttft": median(r.timings.time_to_first_token for r in replies),
        "decode": median(r.timings.tokens_per_second for r in replies),
        "memory": memory.added / MiB,
    }


def thread_scaling(
    backend: str, threads: list[int], prompt: str, max_tokens: int
) -> dict[int, float]:
    """Decode tokens/s of the default model on ``backend`` with each number of CPU threads.

    llama.cpp fixes its thread count when a context is made, so it is loaded once per
    count (fast); transformers is loaded once and PyTorch's thread pool is resized.
    """
    from llmlab import backends

    speeds: dict[int, float] = {}
    messages = [{"role": "user", "content": prompt}]
    if backend == "transformers":
        import torch

        model = backends.load(backend=backend, threads=max(threads))
        before = torch.get_num_threads()
        try:
            for n in threads:
                torch.set_num_threads(n)
                reply = model.chat(messages, max_tokens=max_tokens, temperature=0)
                speeds[n] = reply.timings.tokens_per_second
        finally:
            torch.set_num_threads(before)
            model.close()
        return speeds
    for n in threads:
        model = backends.load(backend=backend, threads=n)
        try:
            speeds[n] = model.chat(
                messages, max_tokens=max_tokens, temperature=0
            ).timings.tokens_per_second
        finally:
            model.close()
    return speeds


def measure(
    *,
    engines: list[str] | None = None,
    prompts: list[str] | None = None,
    max_tokens: int = 32,
    threads: list[int] | None = None,
    scaling: tuple[str, ...] = ("llama.cpp", "transformers"),
    progress: Callable[[str], None] = lambda _: None,
) -> list[Row]:
    """Measure ``engines`` (default: all that run here), then the decode speed of the
    ``scaling`` engines with each thread count in ``threads`` (default 1..N cores)."""
    from llmlab import backends

    # bitsandbytes logs a casting notice on every 8-bit matrix product on a CPU.
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    prompts = prompts or PROMPTS
    engines = engines or [e for e in ENGINES if "8bit" not in e or bitsandbytes_available()]
    unknown = [e for e in engines if e not in ENGINES]
    if unknown:
        raise ValueError(f"Unknown engine {', '.join(unknown)}. Use: {', '.join(ENGINES)}.")
    threads = threads or list(range(1, cpu_cores() + 1))
    rows: list[Row] = []
    base: dict[str, Row] = {}
    units = {"load": "s", "ttft": "s", "decode": "tok/s", "memory": "MiB"}
    for engine in engines:
        progress(f"{engine}: {len(prompts)} prompts, {max_tokens} tokens each")
        options = ENGINES[engine]
        figures = engine_figures(lambda o=options: backends.load(**o), prompts, max_tokens)
        for metric, value in figures.items():
            if metric in base:
                rows.append(Row.compared(SUITE, engine, metric, value, units[metric], base[metric]))
            else:
                base[metric] = Row(SUITE, engine, metric, value, units[metric])
                rows.append(base[metric])
    for backend in scaling:
        progress(f"{backend}: decode speed with {threads} threads")
        speeds = thread_scaling(backend, threads, prompts[0], max_tokens)
        one = None
        for n, value in speeds.items():
            case = f"{backend} {n} thread" + ("s" if n > 1 else "")
            row = (
                Row.compared(SUITE, case, "decode", value, "tok/s", one)
                if one
                else Row(SUITE, case, "decode", value, "tok/s")
            )
            one = one or row
            rows.append(row)
    return rows


def run(quick: bool = False) -> list[Row]:
    """``make bench``: every engine that runs here, both prompts, 1..N threads."""
    if quick:
        return measure(
            engines=["llama.cpp", "transformers"], prompts=PROMPTS[:1], max_tokens=4, threads=[1]
        )
    return measure(max_tokens=48)
