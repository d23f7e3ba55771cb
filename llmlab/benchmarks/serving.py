"""Serving benchmark: the lab's server against llama.cpp's own ``llama-server``, same load.

Both servers run in their own processes on the same GGUF file (the one the lab's server
chooses to serve; its ``/health`` names it), with the same 8 slots of 512 tokens, the same
threads and flash attention. ``llama-server`` is built once from the llama-cpp-python sdist
the lab pins, with the lab's own CPU flags (``llmlab/llama_server.py``), or taken from
``LLMLAB_LLAMA_SERVER``. Closed-loop streaming clients (1, 4, 8, 16), each asking for
64 greedy tokens again as soon as a reply ends, through the official ``openai`` client:
each notes when the first token arrives and how many tokens came
(``stream_options.include_usage``). Both servers stay up while each client count runs on
llama-server and then on the lab's server, so a ratio's two figures are measured together.
Reported side by side, in one run:

* aggregate tokens/s of all clients, for each server and number of clients, with the ratios
  the serving targets name: the lab at 8 clients over the lab at 1 (the batching gain,
  target 2x) and the lab over ``llama-server`` at 1 client (target 0.95x) and 8 (1.1x),
* p50 and p95 time to first token,
* failed requests (target: none, also at 16 clients, twice the slots),
* one client on a lab server that sends an event per token (``--stream-interval 0``, as
  llama-server does) beside llama-server again, since by default the lab's server sends the
  tokens of each 20 ms as one event.

``quick=True`` uses 1 and 2 clients and tiny replies, only to check that the suite runs;
it measures ``llama-server`` only if one is already built (it never builds one).
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
def running(command: list[str], base_url: str, name: str, timeout: float = 180.0) -> Iterator[str]:
    """Run ``command`` (a server) in a child process; yields ``base_url`` once its ``/health``
    says ok. If it exits first, the error has the tail of its output."""
    with tempfile.TemporaryFile() as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + timeout
            while True:
                if process.poll() is not None:
                    log.seek(0)
                    tail = log.read().decode(errors="replace")[-2000:]
                    raise RuntimeError(f"{name} exited with code {process.returncode}:\n{tail}")
                with contextlib.suppress(httpx.HTTPError, ValueError):
                    if httpx.get(f"{base_url}/health", timeout=2).json().get("status") == "ok":
                        break
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{name} was not ready within {timeout:.0f} s")
                time.sleep(0.2)
            yield base_url
        finally:
            process.terminate()
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def server_process(*args: str, timeout: float = 180.0) -> contextlib.AbstractContextManager[str]:
    """Start the lab's server.py on a free port in a child process; yields its base URL once
    /health is ok."""
    port = free_port()
    command = [sys.executable, str(SERVER), "--port", str(port), "--log-level", "warning", *args]
    return running(command, f"http://127.0.0.1:{port}", "the lab's server", timeout)


def llama_server_process(
    binary: Path, model: Path, slots: int, ctx: int, threads: int, timeout: float = 180.0
) -> contextlib.AbstractContextManager[str]:
    """Start llama.cpp's llama-server on a free port, as :func:`server_process` does."""
    from llmlab import llama_server

    port = free_port()
    command = llama_server.command(binary, model, port, slots, ctx, threads, _flash_attn())
    return running(command, f"http://127.0.0.1:{port}", "llama-server", timeout)


def _flash_attn() -> bool:
    from llmlab.settings import get_settings

    return get_settings().flash_attn


def served_model(base_url: str) -> str:
    """The chat model a server serves: the one its /health names (the lab's server), else
    the first one /v1/models lists."""
    health = httpx.get(f"{base_url}/health", timeout=10).json()
    if health.get("model"):
        return health["model"]
    return httpx.get(f"{base_url}/v1/models", timeout=10).json()["data"][0]["id"]


def stream_once(
    client, model: str, prompt: str, max_tokens: int, temperature: float = 0.0, seed: int = 0
) -> tuple[float, float, int]:
    """One streamed chat reply: (seconds to the first token, seconds in all, completion tokens)."""
    started = time.perf_counter()
    first = None
    tokens = 0
    stream = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": prompt}],
        max_tokens=max_tokens,
        temperature=temperature,
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


def run_clients(
    base_url: str,
    clients: int,
    requests_each: int,
    max_tokens: int,
    temperature: float = 0.0,
    model: str | None = None,
) -> LoadResult:
    """``clients`` threads, each streaming ``requests_each`` replies one after another
    (closed loop: the next request goes as soon as a reply ends). ``model``: the name sent
    (default: the first one the server lists); greedy unless ``temperature`` is above 0."""
    from openai import OpenAI

    model = model or served_model(base_url)
    result = LoadResult(clients)
    lock = threading.Lock()
    start = threading.Barrier(clients + 1)

    def client_thread(number: int) -> None:
        client = OpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0, timeout=600)
        start.wait()
        for i in range(requests_each):
            prompt = PROMPTS[(number + i) % len(PROMPTS)]
            try:
                ttft, total, tokens = stream_once(
                    client, model, prompt, max_tokens, temperature, seed=number * 100 + i
                )
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


@dataclass
class Load:
    """The load both servers get: slots of ``ctx`` tokens, closed-loop clients, reply length."""

    slots: int = 8
    ctx: int = 512
    client_counts: tuple[int, ...] = (1, 4, 8, 16)
    max_tokens: int = 64
    requests_each: int = 2  # per client; one client alone asks for twice as many

    def requests_for(self, clients: int) -> int:
        return self.requests_each * (2 if clients == 1 else 1)


FULL = Load()
QUICK = Load(slots=2, client_counts=(1, 2), max_tokens=8, requests_each=1)
LAB = "lab server"
LLAMA = "llama-server"


def measure(base_url: str, load: Load, model: str) -> dict[int, LoadResult]:
    """Every client count of ``load`` against one server, after a warm-up request."""
    run_clients(base_url, 1, 1, 4, model=model)  # first-request costs stay out of the figures
    return {
        n: run_clients(base_url, n, load.requests_for(n), load.max_tokens, model=model)
        for n in load.client_counts
    }


def measure_side_by_side(
    lab_url: str, ref_url: str, load: Load, model: str
) -> tuple[dict[int, LoadResult], dict[int, LoadResult]]:
    """Every client count against llama-server and then against the lab's server, count by
    count, so the two figures of each ratio are measured within a minute of each other and
    a machine that slows down or speeds up during the suite shifts both alike."""
    for url in (ref_url, lab_url):
        run_clients(url, 1, 1, 4, model=model)  # first-request costs stay out of the figures
    lab: dict[int, LoadResult] = {}
    ref: dict[int, LoadResult] = {}
    for n in load.client_counts:
        ref[n] = run_clients(ref_url, n, load.requests_for(n), load.max_tokens, model=model)
        lab[n] = run_clients(lab_url, n, load.requests_for(n), load.max_tokens, model=model)
    return lab, ref


def case(server: str, clients: int) -> str:
    """The row case for ``server`` under ``clients`` clients (notebook 11 reads it back)."""
    return f"{server}, {clients} client{'s' if clients != 1 else ''}"


def rows_for(
    lab: dict[int, LoadResult], ref: dict[int, LoadResult] | None, load: Load
) -> list[Row]:
    """Rows of both servers side by side, the ratios of the serving targets among them."""
    rows: list[Row] = []
    tps: dict[tuple[str, int], Row] = {}
    for server, results in ((LLAMA, ref or {}), (LAB, lab)):
        for n, result in results.items():
            metric, value = "aggregate tokens/s", result.tokens_per_second
            other = tps.get((LLAMA, n))
            if server == LAB and other is not None:
                note = {1: "target >= 0.95x", load.slots: "target >= 1.1x"}.get(n, "")
                row = Row.compared(SUITE, case(server, n), metric, value, "tok/s", other, note)
            else:
                row = Row(SUITE, case(server, n), metric, value, "tok/s")
            tps[server, n] = row
            rows += [
                row,
                Row(SUITE, case(server, n), "p50 time to first token", result.percentile(0.5), "s"),
                Row(
                    SUITE, case(server, n), "p95 time to first token", result.percentile(0.95), "s"
                ),
                Row(
                    SUITE,
                    case(server, n),
                    "failed requests",
                    float(len(result.failures)),
                    "requests",
                    note="; ".join(result.failures[:2])
                    or ("target 0" if n == max(load.client_counts) else ""),
                ),  # fmt: skip
            ]
    first, slots = min(load.client_counts), load.slots
    if (LAB, first) in tps and (LAB, slots) in tps:
        rows.append(
            Row.compared(
                SUITE,
                case(LAB, slots),
                "batching gain (tokens/s)",
                tps[LAB, slots].value,
                "tok/s",
                tps[LAB, first],
                note=f"target >= 2x with {slots} slots",
            )  # fmt: skip
        )
    return rows


PER_TOKEN = "lab server, an event per token (--stream-interval 0)"


def per_token_rows(lab_url: str, ref_url: str, load: Load, model: str) -> list[Row]:
    """One client on a lab server that sends an event per token, as llama-server does (the
    default sends the tokens of each ``--stream-interval`` as one), beside llama-server again:
    how much of the one-client ratio the interval accounts for."""
    run_clients(lab_url, 1, 1, 4, model=model)  # first-request costs stay out of the figures
    ref = run_clients(ref_url, 1, load.requests_for(1), load.max_tokens, model=model)
    lab = run_clients(lab_url, 1, load.requests_for(1), load.max_tokens, model=model)
    again = Row(SUITE, case(LLAMA, 1) + ", again", "aggregate tokens/s", ref.tokens_per_second,
                "tok/s")  # fmt: skip
    per_token = Row.compared(SUITE, case(PER_TOKEN, 1), "aggregate tokens/s",
                             lab.tokens_per_second, "tok/s", again)  # fmt: skip
    return [again, per_token]


def reference_server(quick: bool):
    """The llama-server binary: in quick mode only one already there (None if not)."""
    from llmlab import llama_server

    if quick:
        return llama_server.find()
    return llama_server.find_or_build()


def run(quick: bool = False) -> list[Row]:
    """The same load against the lab's server and llama-server on the file it serves, both
    running, client count by client count (:func:`measure_side_by_side`)."""
    from llmlab import registry
    from llmlab.settings import get_settings

    load = QUICK if quick else FULL
    threads = get_settings().threads
    binary = reference_server(quick)  # built (minutes) before anything is measured
    lab_args = ["--parallel", str(load.slots), "--ctx", str(load.ctx), "--threads", str(threads)]
    with server_process(*lab_args) as url:
        model = served_model(url)
        if binary is None:
            print("   llama-server is not built, so it is left out (quick mode never builds it; "
                  "python -m llmlab.llama_server build does)")  # fmt: skip
            return rows_for(measure(url, load, model), None, load)
        path = registry.resolve(model).path
        print(f"   llama-server: {binary} on {path}")
        with llama_server_process(binary, path, load.slots, load.ctx, threads) as ref_url:
            lab, ref = measure_side_by_side(url, ref_url, load, model)
            with server_process(*lab_args, "--stream-interval", "0") as per_token_url:
                extra = per_token_rows(per_token_url, ref_url, load, model)
    return rows_for(lab, ref, load) + extra
