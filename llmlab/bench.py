"""Measuring tools for ``make bench``: rows of figures, timers and peak memory.

Each area of the lab has a suite in ``llmlab/benchmarks/<area>.py`` with
``run(quick: bool = False) -> list[Row]``; ``scripts/bench.py`` runs them all in one
process and writes one table. A figure that is compared with a baseline measured in the
same run carries the baseline's name and the ratio, so results read as "x times faster
on this machine" rather than as absolute numbers from somebody else's laptop::

    raw = Row("chat", "raw llama.cpp", "decode", 410.0, "tok/s")
    ours = Row.compared("chat", "ChatSession", "decode", 402.0, "tok/s", baseline=raw)
    ours.ratio   # 0.98
"""

from __future__ import annotations

import multiprocessing
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import TypeVar

import psutil

T = TypeVar("T")


@dataclass
class Row:
    """One measured figure; ``ratio`` is value / baseline value when a baseline is named."""

    suite: str
    case: str
    metric: str
    value: float
    unit: str
    baseline: str | None = None
    ratio: float | None = None
    note: str = ""

    @classmethod
    def compared(
        cls,
        suite: str,
        case: str,
        metric: str,
        value: float,
        unit: str,
        baseline: Row,
        note: str = "",
    ) -> Row:
        """A row measured against ``baseline`` (same suite, same run)."""
        ratio = value / baseline.value if baseline.value else None
        return cls(suite, case, metric, value, unit, baseline.case, ratio, note)

    def to_dict(self) -> dict:
        """Plain dict for JSON."""
        return asdict(self)


@dataclass
class Elapsed:
    """Filled in by :func:`timer` when its block ends."""

    seconds: float = 0.0


@contextmanager
def timer() -> Iterator[Elapsed]:
    """Measure the wall-clock time of a block: ``with timer() as t: ...; t.seconds``."""
    elapsed = Elapsed()
    start = time.perf_counter()
    try:
        yield elapsed
    finally:
        elapsed.seconds = time.perf_counter() - start


def isolated(fn: Callable[..., T], *args, **kwargs) -> T:
    """Run ``fn(*args, **kwargs)`` in a fresh Python process and return its result.

    Two sides of a comparison should not share a process: each would start with whatever
    the other left behind (threads, caches, allocator state; with an OpenMP build of
    llama.cpp, a batched engine after a plain loop ran ~3x slower, see
    ``envcheck.LLAMA_CPP_CMAKE_ARGS``). ``fn`` must be importable (a module-level function).
    """
    spawn = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=1, mp_context=spawn) as pool:
        return pool.submit(fn, *args, **kwargs).result()


@dataclass
class PeakMemory:
    """Resident memory of this process, sampled while a block runs (bytes)."""

    start_rss: int = 0
    peak_rss: int = 0

    @property
    def added(self) -> int:
        """Peak minus the resident memory when the block started."""
        return max(0, self.peak_rss - self.start_rss)


@contextmanager
def peak_memory(interval: float = 0.01) -> Iterator[PeakMemory]:
    """Sample this process's RSS every ``interval`` seconds while the block runs."""
    process = psutil.Process()
    result = PeakMemory(process.memory_info().rss, process.memory_info().rss)
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            result.peak_rss = max(result.peak_rss, process.memory_info().rss)
            done.wait(interval)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield result
    finally:
        done.set()
        thread.join()
        result.peak_rss = max(result.peak_rss, process.memory_info().rss)
