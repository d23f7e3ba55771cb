"""A persistent ggml CPU thread pool for one llama.cpp context, as llama.cpp's own programs use.

Without one, ggml starts its worker threads at the beginning of every ``llama_decode`` and
joins them at the end, so each step begins with new threads that the operating system must
first place on a core. ``llama-server`` and ``llama-cli`` attach a pool made once
(``common_threadpools::init`` in llama.cpp's ``common/common.cpp``); llama-cpp-python has no
binding for it, so this module reaches the four C functions through ctypes::

    pool = ThreadPool.attach(ctx, threads=2)   # None where the build does not export them
    ...
    pool.free()   # after llama_free(ctx)

Between steps the workers poll for the next graph for a short while (``poll``: llama.cpp's
default 50), then sleep, so an idle engine does not keep a core busy.
"""

from __future__ import annotations

import ctypes
import logging
from typing import Any

log = logging.getLogger("llmlab.engine")

GGML_MAX_N_THREADS = 512  # ggml.h: the size of a pool's CPU mask
DEFAULT_POLL = 50  # llama.cpp's default polling level (0: none, 100: aggressive)


class _Params(ctypes.Structure):
    """``struct ggml_threadpool_params`` (ggml.h)."""

    _fields_ = [
        ("cpumask", ctypes.c_bool * GGML_MAX_N_THREADS),
        ("n_threads", ctypes.c_int),
        ("prio", ctypes.c_int),
        ("poll", ctypes.c_uint32),
        ("strict_cpu", ctypes.c_bool),
        ("paused", ctypes.c_bool),
    ]


def _functions() -> tuple[Any, Any, Any, Any] | None:
    """``ggml_threadpool_params_init``, ``ggml_threadpool_new``, ``ggml_threadpool_free`` and
    ``llama_attach_threadpool``, looked up through the libllama that llama-cpp-python loaded
    (a symbol lookup on a library also searches the ggml libraries it links), so they are
    the very copies its context runs on; None if one is missing."""
    import llama_cpp.llama_cpp as bindings

    lib = bindings._lib
    try:
        init, new, free, attach = (
            lib.ggml_threadpool_params_init,
            lib.ggml_threadpool_new,
            lib.ggml_threadpool_free,
            lib.llama_attach_threadpool,
        )
    except AttributeError:
        return None
    init.argtypes, init.restype = [ctypes.POINTER(_Params), ctypes.c_int], None
    new.argtypes, new.restype = [ctypes.POINTER(_Params)], ctypes.c_void_p
    free.argtypes, free.restype = [ctypes.c_void_p], None
    attach.argtypes, attach.restype = [ctypes.c_void_p] * 3, None
    return init, new, free, attach


class ThreadPool:
    """One ggml thread pool attached to one llama.cpp context (for decoding and batches alike)."""

    def __init__(self, free: Any, handle: int):
        self._free = free
        self._handle: int | None = handle

    @classmethod
    def attach(cls, ctx: Any, threads: int, poll: int = DEFAULT_POLL) -> ThreadPool | None:
        """Make a pool of ``threads`` threads and attach it to ``ctx`` (a ``llama_context*``);
        None, and ggml's per-call threads stay in use, where the build does not allow it."""
        functions = _functions()
        if functions is None:
            log.info(
                "this llama.cpp build exports no thread pool API; ggml starts threads per call"
            )
            return None
        init, new, free, attach = functions
        params = _Params()
        init(ctypes.byref(params), threads)
        params.poll = poll
        handle = new(ctypes.byref(params))
        if not handle:
            return None
        attach(ctx, handle, handle)
        return cls(free, handle)

    def free(self) -> None:
        """Stop and free the threads (after the context that used them is freed; safe twice)."""
        if self._handle is not None:
            self._free(self._handle)
            self._handle = None
