"""python part2/examples/docstring_example.py --params 135M [--n-ctx 2048] [--layers 30 ...]

How many bytes does a model take? The arithmetic behind a GGUF file's size and the
memory a model needs, written as the course writes every module: a module docstring
that starts with the command that runs it, a docstring on each public function and
class (what it does, ``Args``, ``Returns``, ``Raises``) and examples that are also tests.

Quantized formats store weights in *blocks*: ``Q4_0`` packs 32 weights into 18 bytes
(one float16 scale and 32 four-bit numbers), so each weight costs 18 * 8 / 32 = 4.5 bits.
The k-quants (``Q4_K`` ...) use super-blocks of 256 weights with extra scales inside.

Run the examples in the docstrings as tests (silence means they all pass)::

    python -m doctest part2/examples/docstring_example.py
    python -m pytest tests/unit/test_docstring_example.py

Use it as a library::

    >>> fmt = get_format("q4_0")
    >>> fmt.bits_per_weight
    4.5
    >>> format_bytes(weights_bytes(135_000_000, "Q4_0"))
    '72.4 MiB'
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass

MiB = 1 << 20


@dataclass(frozen=True)
class QuantFormat:
    """A weight storage format: how many weights share one block, and the block's size.

    Attributes:
        name: the GGUF/ggml type name, e.g. ``"Q4_K"``.
        block_size: weights stored together in one block (1 for plain floats).
        block_bytes: bytes one block takes in the file (the weights plus their scales).

    Examples:
        >>> q8 = QuantFormat("Q8_0", block_size=32, block_bytes=34)
        >>> q8.bits_per_weight
        8.5
        >>> q8.tensor_bytes(4096)
        4352
    """

    name: str
    block_size: int
    block_bytes: int

    @property
    def bits_per_weight(self) -> float:
        """Average bits each weight costs, scales included.

        Returns:
            ``block_bytes * 8 / block_size``, e.g. 4.5 for ``Q4_0``.
        """
        return self.block_bytes * 8 / self.block_size

    def tensor_bytes(self, n_elements: int) -> int:
        """Exact bytes a tensor of ``n_elements`` weights takes in this format.

        Args:
            n_elements: the number of weights in the tensor (product of its shape).

        Returns:
            The size in bytes of the tensor's data.

        Raises:
            ValueError: ``n_elements`` is negative or not a whole number of blocks;
                ggml can only quantize rows whose length is a multiple of the block size.

        Examples:
            >>> get_format("F16").tensor_bytes(10)
            20
            >>> get_format("Q4_K").tensor_bytes(100)
            Traceback (most recent call last):
            ...
            ValueError: Q4_K stores weights in blocks of 256; 100 is not a multiple of 256.
        """
        if n_elements < 0:
            raise ValueError(f"n_elements must be >= 0, got {n_elements}.")
        if n_elements % self.block_size:
            raise ValueError(
                f"{self.name} stores weights in blocks of {self.block_size}; "
                f"{n_elements} is not a multiple of {self.block_size}."
            )
        return n_elements // self.block_size * self.block_bytes


# The formats a learner meets in this course, most bits first, with ggml's block layout (the same numbers
# as gguf.GGML_QUANT_SIZES; tests/unit/test_docstring_example.py checks they agree).
FORMATS: dict[str, QuantFormat] = {
    fmt.name: fmt
    for fmt in (
        QuantFormat("F32", 1, 4),
        QuantFormat("F16", 1, 2),
        QuantFormat("BF16", 1, 2),
        QuantFormat("Q8_0", 32, 34),
        QuantFormat("Q6_K", 256, 210),
        QuantFormat("Q5_1", 32, 24),
        QuantFormat("Q5_K", 256, 176),
        QuantFormat("Q5_0", 32, 22),
        QuantFormat("Q4_1", 32, 20),
        QuantFormat("Q4_K", 256, 144),
        QuantFormat("Q4_0", 32, 18),
        QuantFormat("Q3_K", 256, 110),
        QuantFormat("Q2_K", 256, 84),
    )
}


def get_format(name: str) -> QuantFormat:
    """Look up a storage format by name, in any letter case.

    Args:
        name: a type name such as ``"q4_k"`` or ``"F16"``. A file-type name with a
            size suffix (``"Q4_K_M"``) maps to its main tensor type (``Q4_K``).

    Returns:
        The :class:`QuantFormat` with that name.

    Raises:
        ValueError: the name is unknown; the message lists the known names.

    Examples:
        >>> get_format("q4_k_m").name
        'Q4_K'
        >>> get_format("Q9")
        Traceback (most recent call last):
        ...
        ValueError: Unknown format 'Q9'. Known: F32, F16, BF16, Q8_0, Q6_K, Q5_1, Q5_K, Q5_0, Q4_1, Q4_K, Q4_0, Q3_K, Q2_K.
    """
    key = name.strip().upper()
    if key not in FORMATS and key.endswith(("_S", "_M", "_L")):
        key = key[:-2]  # Q4_K_M is a mix of Q4_K and Q6_K tensors; Q4_K is the bulk
    if key not in FORMATS:
        raise ValueError(f"Unknown format {name!r}. Known: {', '.join(FORMATS)}.")
    return FORMATS[key]


def weights_bytes(parameters: int, fmt: str | QuantFormat) -> int:
    """Bytes of ``parameters`` weights stored in ``fmt``, rounded up to whole blocks.

    Real files are a little larger or smaller: some tensors (embeddings, norms) are
    usually kept in another type. Notebook 03 measures the difference on a real file.

    Args:
        parameters: the number of weights, e.g. ``135_000_000``.
        fmt: a format name (see :func:`get_format`) or a :class:`QuantFormat`.

    Returns:
        The estimated size in bytes.

    Raises:
        ValueError: ``parameters`` is negative, or the format name is unknown.

    Examples:
        >>> weights_bytes(1_000_000, "F16")
        2000000
        >>> weights_bytes(1_000, "Q8_0")  # 32 blocks of 32 (the last one partly empty)
        1088
    """
    if parameters < 0:
        raise ValueError(f"parameters must be >= 0, got {parameters}.")
    if isinstance(fmt, str):
        fmt = get_format(fmt)
    return math.ceil(parameters / fmt.block_size) * fmt.block_bytes


def kv_cache_bytes(
    n_layers: int, n_ctx: int, n_kv_heads: int, head_dim: int, bytes_per_value: int = 2
) -> int:
    """Bytes of the attention cache: keys and values of every layer for ``n_ctx`` tokens.

    Args:
        n_layers: transformer blocks (``<arch>.block_count`` in a GGUF header).
        n_ctx: context length in tokens the model is run with (not its maximum).
        n_kv_heads: key/value heads (fewer than query heads with grouped-query attention).
        head_dim: size of one head.
        bytes_per_value: 2 for the float16 cache llama.cpp uses by default.

    Returns:
        ``2 * n_layers * n_ctx * n_kv_heads * head_dim * bytes_per_value``.

    Examples:
        SmolLM2-135M at the lab's default context of 2048 tokens:

        >>> format_bytes(kv_cache_bytes(n_layers=30, n_ctx=2048, n_kv_heads=3, head_dim=64))
        '45.0 MiB'
    """
    return 2 * n_layers * n_ctx * n_kv_heads * head_dim * bytes_per_value


def format_bytes(n: float) -> str:
    """Format a byte count for people, in binary units.

    Args:
        n: a number of bytes.

    Returns:
        A short string such as ``'93.8 MiB'``.

    Examples:
        >>> format_bytes(512), format_bytes(98_362_432), format_bytes(3 * 1024**3)
        ('512 B', '93.8 MiB', '3.0 GiB')
    """
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def parse_count(text: str) -> int:
    """Read a parameter count written the way model cards write it.

    Args:
        text: a number with an optional suffix K, M or B (thousands, millions, billions).

    Returns:
        The count as an integer.

    Raises:
        ValueError: the text is not such a number.

    Examples:
        >>> parse_count("135M"), parse_count("1.5B"), parse_count("4096")
        (135000000, 1500000000, 4096)
    """
    scale = {"K": 10**3, "M": 10**6, "B": 10**9}
    body, factor = text.strip(), 1
    if body[-1:].upper() in scale:
        body, factor = body[:-1], scale[body[-1].upper()]
    try:
        return round(float(body) * factor)
    except ValueError:
        raise ValueError(f"Not a parameter count: {text!r} (examples: 135M, 1.5B, 4096).") from None


def _count_arg(text: str) -> int:
    try:
        return parse_count(text)
    except ValueError as exc:  # argparse shows ArgumentTypeError messages as they are
        raise argparse.ArgumentTypeError(str(exc)) from None


EPILOG = """examples:
  python part2/examples/docstring_example.py --params 135M
  python part2/examples/docstring_example.py --params 1.5B --formats Q8_0 Q4_K_M
  python part2/examples/docstring_example.py --params 135M --layers 30 --kv-heads 3 --head-dim 64
  python -m doctest -v part2/examples/docstring_example.py    run the examples as tests
"""


def build_parser() -> argparse.ArgumentParser:
    """The command line: a parameter count, formats and (optionally) the cache shape."""
    parser = argparse.ArgumentParser(
        description="Estimate a model's file size per quantization format, and its KV cache.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--params", required=True, type=_count_arg, help="parameter count, e.g. 135M"
    )
    parser.add_argument(
        "--formats", nargs="+", default=list(FORMATS), help="formats to list (default: all)"
    )
    parser.add_argument(
        "--n-ctx", type=int, default=2048, help="context length (default: %(default)s)"
    )
    parser.add_argument("--layers", type=int, help="layers, to add the KV cache")
    parser.add_argument("--kv-heads", type=int, help="key/value heads, to add the KV cache")
    parser.add_argument("--head-dim", type=int, help="head size, to add the KV cache")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Print one line per format: bits per weight, weights size, and size with the cache."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        formats = [get_format(name) for name in args.formats]
    except ValueError as exc:
        parser.error(str(exc))  # exits with status 2
    shape = (args.layers, args.kv_heads, args.head_dim)
    cache = 0
    if all(shape):
        cache = kv_cache_bytes(args.layers, args.n_ctx, args.kv_heads, args.head_dim)
        print(f"KV cache at {args.n_ctx} tokens: {format_bytes(cache)}")
    elif any(shape):
        parser.error("give all of --layers, --kv-heads and --head-dim to include the KV cache")
    print(f"{'format':<7} {'bits/weight':>11} {'weights':>10} {'+ cache':>10}")
    for fmt in formats:
        size = weights_bytes(args.params, fmt)
        print(
            f"{fmt.name:<7} {fmt.bits_per_weight:>11.4g} {format_bytes(size):>10} "
            f"{format_bytes(size + cache):>10}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
