"""What this machine offers for inference: cores, memory, and a GPU if there is one.

The device choice is made here once, so every backend picks CUDA, then Apple MPS,
then the CPU in the same way::

    from llmlab.hardware import pick_device, memory_info
    pick_device()          # 'cuda', 'mps' or 'cpu'
"""

from __future__ import annotations

import importlib.util
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import psutil


@dataclass(frozen=True)
class MemoryInfo:
    """Bytes of RAM (and of GPU memory, when a CUDA device is present)."""

    total_ram: int
    available_ram: int
    gpu_name: str | None = None
    total_vram: int = 0
    free_vram: int = 0


def cpu_cores() -> int:
    """Logical cores usable by this process."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS and Windows have no sched_getaffinity
        return os.cpu_count() or 1


def _torch():
    if importlib.util.find_spec("torch") is None:
        return None
    import torch

    return torch


def pick_device(preferred: str = "auto") -> str:
    """Return ``preferred`` if it is usable, else the best of cuda, mps, cpu.

    Raises:
        ValueError: ``preferred`` names a device this machine does not have.
    """
    torch = _torch()
    has_cuda = bool(torch and torch.cuda.is_available())
    has_mps = bool(
        torch and getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()
    )
    if preferred == "auto":
        return "cuda" if has_cuda else "mps" if has_mps else "cpu"
    available = {"cpu": True, "cuda": has_cuda, "mps": has_mps}
    if preferred not in available:
        raise ValueError(f"Unknown device {preferred!r}. Use auto, cpu, cuda or mps.")
    if not available[preferred]:
        raise ValueError(
            f"Device {preferred!r} is not available on this machine. Use --device auto."
        )
    return preferred


def memory_info() -> MemoryInfo:
    """RAM now, plus the first CUDA device's memory if one is present."""
    vm = psutil.virtual_memory()
    torch = _torch()
    if torch is not None and torch.cuda.is_available():
        free, total = torch.cuda.mem_get_info(0)
        return MemoryInfo(vm.total, vm.available, torch.cuda.get_device_name(0), total, free)
    return MemoryInfo(vm.total, vm.available)


def human_bytes(n: float) -> str:
    """Format a byte count for people: ``human_bytes(98_362_432) == '93.8 MiB'``."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


@contextmanager
def quiet_bitsandbytes() -> Iterator[None]:
    """Import bitsandbytes (directly, or through peft) without its warning that an optional
    CPU kernel cannot be fetched from the Hugging Face Hub: it prints that on AVX512-BF16
    CPUs when the ``kernels`` package is absent and then uses its own CPU kernel, which is
    what the lab runs. Errors still show."""
    quiet = logging.getLogger("bitsandbytes")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        yield
    finally:
        quiet.setLevel(level)
