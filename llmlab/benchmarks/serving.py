"""Serving benchmark: one streaming client alone, then 8 at once, against the lab's server.

The server (``part5/combined_app/scripts/server.py``) runs in its own process with 8
slots, exactly as ``make serve`` starts it. Each client streams chat replies through the
official ``openai`` client and notes when the first token arrives and how many tokens
came (from ``stream_options.include_usage``). Reported side by side, in one run:

* aggregate tokens/s of 8 concurrent clients over one client alone (the gain of the
  continuous-batching engine, less the server's and the clients' own work on the same
  cores; the target is 2x, which a 2-core AVX2 CPU does not reach: see llmlab/engine/__init__.py),
* p95 time to first token, alone and under load,
* failed requests (should be zero).

``quick=True`` uses 2 clients and tiny replies, only to check that the suite runs.
"""

from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from llmlab.bench import Row

SUITE = "serving"
SERVER = Path(__file__).resolve().parents[2] / "part5" / "combined_app" / "scripts" / "server.py"
PROMPTS = [
    "Write a short story about a lighthouse keeper.",
    "Describe a walk through a forest in autumn.",
    "Explain how a bicycle works to a child.",
    "Write a letter to a friend about a trip to the sea.",
    "Describe the life of a honey bee.",
    "Tell a story about a robot who learns to cook.",
    "Describe a busy market in the morning.",
    "Write about a train journey through the mountains.",
]


@dataclass
class LoadResult:
    """What a group of clients saw: tokens, wall time, per-request times and failures."""

    clients: int
    seconds: float = 0.0
    tokens: int = 0
    ttft: list[float] = field(default_factory=list)
    latency: list[float] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)

    @property
    def tokens_per_second(self) -> float:
        """Completion tokens of all clients over the wall time of the whole run."""
        return self.tokens / self.seconds if self.seconds else 0.0

    def percentile(self, q: float, of: str = "ttft") -> float:
        """The ``q`` quantile (0-1), nearest-rank, of ``ttft`` or ``latency`` (whole request)."""
        values = getattr(self, of)
        if not values:
            return float("nan")
        ordered = sorted(values)
        return ordered[min(len(ordered) - 1, max(0, round(q * len(ordered) + 0.5) - 1))]


def free_port() -> int:
    """A TCP port nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def server_process(*args: str, timeout: float = 180.0) -> Iterator[str]:
    """Start server.py on a free port in a child process; yields its base URL once /health is ok."""
    port = free_port()
    command = [sys.executable, str(SERVER), "--port", str(port), "--log-level", "warning", *args]
    base_url = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryFile() as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + timeout
            while True:
                if process.poll() is not None:
                    log.seek(0)
                    tail = log.read().decode(errors="replace")[-2000:]
                    raise RuntimeError(f"the server exited with code {process.returncode}:\n{tail}")
                with contextlib.suppress(httpx.HTTPError):
                    if httpx.get(f"{base_url}/health", timeout=2).json().get("status") == "ok":
                        break
                if time.monotonic() > deadline:
                    raise RuntimeError(f"the server was not ready within {timeout:.0f} s")
                time.sleep(0.2)
            yield base_url
        finally:
            process.terminate()
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def stream_once(client, prompt: str, max_tokens: int, seed: int) -> tuple[float, float, int]:
    """One streamed chat reply: (seconds to the first token, seconds in all, completion tokens)."""
    started = time.perf_counter()
    first = None
    tokens = 0
    stream = client.chat.completions.create(
        model="smollm2-135m-instruct",
        messages=[{"role": "user", "content": prompt}],
        max_tokens=max_tokens,
        temperature=0.8,
        seed=seed,
        stream=True,
        stream_options={"include_usage": True},
    )
    for chunk in stream:
        if first is None and chunk.choices and chunk.choices[0].delta.content:
            first = time.perf_counter() - started
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
    total = time.perf_counter() - started
    return (first if first is not None else total), total, tokens


def run_clients(base_url: str, clients: int, requests_each: int, max_tokens: int) -> LoadResult:
    """``clients`` threads, each streaming ``requests_each`` replies one after another."""
    from openai import OpenAI

    result = LoadResult(clients)
    lock = threading.Lock()
    start = threading.Barrier(clients + 1)

    def client_thread(number: int) -> None:
        client = OpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0, timeout=600)
        start.wait()
        for i in range(requests_each):
            prompt = PROMPTS[(number + i) % len(PROMPTS)]
            try:
                ttft, total, tokens = stream_once(client, prompt, max_tokens, seed=number * 100 + i)
            except Exception as exc:  # counted, not raised: the figure is how many fail
                with lock:
                    result.failures.append(f"{type(exc).__name__}: {exc}")
                continue
            with lock:
                result.ttft.append(ttft)
                result.latency.append(total)
                result.tokens += tokens

    threads = [threading.Thread(target=client_thread, args=(n,)) for n in range(clients)]
    for thread in threads:
        thread.start()
    start.wait()
    began = time.perf_counter()
    for thread in threads:
        thread.join()
    result.seconds = time.perf_counter() - began
    return result


def run(quick: bool = False) -> list[Row]:
    """One client alone, then N concurrent clients, on one server with N slots."""
    clients = 2 if quick else 8
    max_tokens = 8 if quick else 96
    requests_each = 1 if quick else 2
    with server_process("--parallel", str(clients), "--queue-size", str(4 * clients)) as url:
        run_clients(url, 1, 1, 4)  # warm-up: first-request costs stay out of the figures
        alone = run_clients(url, 1, requests_each * (1 if quick else 2), max_tokens)
        together = run_clients(url, clients, requests_each, max_tokens)
    one = "1 client"
    many = f"{clients} clients"
    base = Row(SUITE, one, "aggregate tokens/s", alone.tokens_per_second, "tok/s")
    return [
        base,
        Row.compared(
            SUITE,
            many,
            "aggregate tokens/s",
            together.tokens_per_second,
            "tok/s",
            baseline=base,
            note=f"target >= 2x with --parallel {clients}",
        ),
        Row(SUITE, one, "p95 time to first token", alone.percentile(0.95), "s"),
        Row(SUITE, many, "p95 time to first token", together.percentile(0.95), "s"),
        Row(
            SUITE,
            many,
            "failed requests",
            float(len(alone.failures) + len(together.failures)),
            "requests",
            note="; ".join((alone.failures + together.failures)[:2]),
        ),
    ]
