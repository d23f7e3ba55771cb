"""Which weight formats llama.cpp can multiply in batches on this CPU, with this build.

Decoding one sequence multiplies every weight matrix by one vector: memory-bound, about
as fast in any format. Decoding eight sequences (or prefilling a prompt) multiplies it by
eight vectors at once, and only a batched (GEMM) kernel reads each weight block once for
all of them; without one, llama.cpp repeats the per-row dot products for every token::

    from llmlab.registry import kernels
    kernels.build_features()                     # ['AVX', 'AVX2', ..., 'LLAMAFILE', 'REPACK']
    kernels.has_batched_kernel("Q4_1")           # False on x86 without AMX
    kernels.batched_formats(["AVX2", "F16C", "LLAMAFILE", "REPACK"])

Measured with ``llama-batched-bench`` on the lab's 2-core x86 machines (no AMX): 8 sequences
of the shipped Q4_1 file give 1.7x the tokens/s of one, Q8_0 2.6-3.3x (see part3/README.md).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from functools import cache
from pathlib import Path

_X86_SIMD = {"AVX", "AVX2", "AVX512"}


def batched_formats(features: Iterable[str]) -> frozenset[str]:
    """The GGML tensor types (``Q8_0``, ``Q4_0`` ...) with a batched kernel in a build with
    ``features`` (the names llama.cpp's system info prints: ``AVX2``, ``AVX512``,
    ``AMX_INT8``, ``NEON``, ``DOTPROD``, ``MATMUL_INT8``, ``LLAMAFILE``, ``REPACK``).

    Why each, from llama.cpp's sources as vendored in llama-cpp-python 0.3.36:

    - ``ggml-cpu/llamafile/sgemm.cpp`` (``LLAMAFILE``), ``llamafile_sgemm``: on x86 with
      AVX, F32, F16 (with F16C), BF16 (AVX2), Q8_0, Q4_0, Q5_0 and IQ4_NL; on Arm with
      dot-product instructions, Q8_0 and Q4_0 (F32 / F16 with NEON). Q4_1 and Q5_1 have
      no case there.
    - ``ggml-cpu/repack.cpp`` (``REPACK``), ``ggml_repack_get_optimal_repack_type``:
      weights rearranged at load into 8x8 tiles, on x86 with AVX2 for Q4_0, IQ4_NL and
      Q4_K (Q2_K with AVX-512); on Arm with dot-product for Q4_0, IQ4_NL, Q4_K, Q5_K, Q6_K
      and Q8_0.
    - ``ggml-cpu/amx/common.h`` (``AMX_INT8``), ``qtype_has_amx_kernels``: Q4_0, Q4_1,
      Q8_0, Q4_K, Q5_K, Q6_K, IQ4_XS. The lab's own build leaves AMX out unless asked
      (``LLMLAB_LLAMA_AMX=1``, see ``llmlab.llama_build``): on some Xeons that kernel
      crashes. So on x86 without AMX, Q4_1 and Q5_1 have no batched kernel at all.
    """
    have = set(features)
    x86 = bool(have & _X86_SIMD)
    formats: set[str] = set()
    if "LLAMAFILE" in have:
        if x86:
            formats |= {"F32", "Q8_0", "Q4_0", "Q5_0", "IQ4_NL"}
            formats |= {"F16"} if "F16C" in have or "AVX512" in have else set()
            formats |= {"BF16"} if have & {"AVX2", "AVX512"} else set()
        if "NEON" in have:
            formats |= {"F32", "F16"}
            formats |= {"Q8_0", "Q4_0"} if "DOTPROD" in have else set()
    if "REPACK" in have:
        if have & {"AVX2", "AVX512"}:
            formats |= {"Q4_0", "IQ4_NL", "Q4_K"}
            formats |= {"Q2_K"} if "AVX512" in have else set()
        if "NEON" in have and have & {"DOTPROD", "MATMUL_INT8"}:
            formats |= {"Q4_0", "IQ4_NL", "Q4_K", "Q5_K", "Q6_K", "Q8_0"}
    if "AMX_INT8" in have:
        formats |= {"Q4_0", "Q4_1", "Q8_0", "Q4_K", "Q5_K", "Q6_K", "IQ4_XS"}
    return frozenset(formats)


@cache
def build_features() -> tuple[str, ...]:
    """The features the installed llama.cpp was compiled with, from its system info
    (``llama_cpp.llama_print_system_info()``; read once per process)."""
    import llama_cpp

    from llmlab.llama_build import build_features as parse

    return tuple(parse(llama_cpp.llama_print_system_info().decode(errors="replace")))


def main_type(path: str | Path) -> str:
    """The tensor type most of a GGUF file's weight matrices are stored in (``Q4_1`` for the
    shipped file). Mixed files such as Q4_K_M count by tensors: on SmolLM2, whose 576-wide
    rows rule out 256-value k-quant blocks, Q4_K_M is mostly Q5_0."""
    from llmlab.registry.gguf_info import read_gguf_info

    return read_gguf_info(Path(path)).main_tensor_type


def format_name(tag_or_type: str) -> str:
    """``q8_0`` -> ``Q8_0``; a file type such as ``Q4_K_M`` -> its main tensor type ``Q4_K``."""
    name = tag_or_type.upper()
    return re.sub(r"_(S|M|L|XL)$", "", name) if "_K_" in name else name


def has_batched_kernel(fmt: str, features: Iterable[str] | None = None) -> bool:
    """True if tensors of type ``fmt`` (or a file type like ``Q4_K_M``) batch here; the
    features default to the installed build's (:func:`build_features`)."""
    return format_name(fmt) in batched_formats(build_features() if features is None else features)
