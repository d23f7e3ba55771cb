"""python -m llmlab.quantize [TAG ...] [--model NAME] [--force]

Make quantized versions of a GGUF model with llama.cpp's own quantizer and register each
one in the model catalog as ``name:tag`` (e.g. ``smollm2-135m-instruct:q4_k_m``)::

    from llmlab import quantize
    paths = quantize.build(["q8_0", "q4_k_m"])      # cached under $LLMLAB_HOME/models/<name>/
    specs = quantize.register(paths)                 # now usable by every program
    quantize.tensor_types(paths["q4_k_m"])           # Counter({'Q5_0': 166, 'F32': 61, 'Q4_K': 16, ...})

The steps are the ones used for published GGUF files: first a full-precision file
(``f16``: every tensor dequantized, the original metadata, tokenizer and chat template
copied), then ``llama_model_quantize`` from that file to each type. Here the only copy
of the model that ships is already quantized (Q4_1), so ``f16`` holds exactly the Q4_1
weights in 16-bit form: it is the reference the variants are compared with, and none of
them can recover the precision the Q4_1 file had already lost.
"""

from __future__ import annotations

import argparse
import io
import os
import sys
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager, redirect_stderr, redirect_stdout
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llmlab import perplexity, registry
from llmlab.bench import peak_memory, timer
from llmlab.settings import Settings, get_settings

# Every variant the lab makes, ``f16`` (the full-precision source) first, then from the
# largest file to the smallest on the lab's default model, which is also from closest to
# farthest from ``f16``. Values are llama.cpp's LLAMA_FTYPE_* names. ``q4_0`` and
# ``iq4_nl`` are there for their batched kernels on x86 (llmlab.registry.kernels), not for
# their quality: on weights that already sit on the shipped Q4_1 grid, another 4-bit grid
# costs more than ``q3_k_m``, whose 576-wide tensors mostly fall back to Q4_0 / Q5_0 anyway.
FTYPES = {
    "f16": "LLAMA_FTYPE_MOSTLY_F16",
    "q8_0": "LLAMA_FTYPE_MOSTLY_Q8_0",
    "q6_k": "LLAMA_FTYPE_MOSTLY_Q6_K",
    "q5_k_m": "LLAMA_FTYPE_MOSTLY_Q5_K_M",
    "q4_k_m": "LLAMA_FTYPE_MOSTLY_Q4_K_M",
    "q3_k_m": "LLAMA_FTYPE_MOSTLY_Q3_K_M",
    "iq4_nl": "LLAMA_FTYPE_MOSTLY_IQ4_NL",
    "q4_0": "LLAMA_FTYPE_MOSTLY_Q4_0",
    "q2_k": "LLAMA_FTYPE_MOSTLY_Q2_K",
}
TAGS = tuple(FTYPES)
QUANTIZED_TAGS = TAGS[1:]
# Bits per weight of each main block type (scales included), as llama.cpp documents them.
NOMINAL_BITS = {
    "f16": 16.0,
    "q8_0": 8.5,
    "q6_k": 6.5625,
    "q5_k_m": 5.5,
    "q4_k_m": 4.5,
    "q3_k_m": 3.4375,
    "iq4_nl": 4.5,
    "q4_0": 4.5,
    "q2_k": 2.625,
}

Progress = Callable[[str], None]


def _quiet(_: str) -> None:
    pass


def check_tags(tags: Iterable[str]) -> list[str]:
    """Lower-cased tags in the lab's order (:data:`TAGS`: largest file first).

    Raises:
        ValueError: a tag is not one of :data:`TAGS` (the message lists them).
    """
    wanted = [t.lower() for t in tags]
    unknown = [t for t in wanted if t not in FTYPES]
    if unknown:
        raise ValueError(f"Unknown quantization {', '.join(unknown)}. Use: {', '.join(TAGS)}.")
    return [t for t in TAGS if t in wanted]


def variant_path(tag: str, base: registry.ModelSpec, settings: Settings | None = None) -> Path:
    """Where the ``tag`` version of ``base`` is cached: ``models/<name>/<tag>/<stem>.<TAG>.gguf``."""
    settings = settings or get_settings()
    stem = Path(base.source.file or base.name).name.split(".")[0]
    return settings.models_dir / base.name / tag / f"{stem}.{tag.upper()}.gguf"


# --------------------------------------------------------------------------- full precision


def write_full_precision(
    src: Path,
    dst: Path,
    progress: Progress = _quiet,
    update: Callable[[str, Any], Any] | None = None,
) -> Path:
    """Write a GGUF with every tensor of ``src`` dequantized: 2-D weights as F16, the rest F32.

    All metadata key/values are copied (architecture, hyper-parameters, the tokenizer's
    vocabulary and merges, the chat template); only ``general.file_type`` becomes F16.
    ``update(name, values)``, if given, may change each dequantized float32 tensor before
    it is stored (``llmlab.finetune`` adds a LoRA update this way). The file is written
    under a temporary name and renamed when complete.
    """
    import gguf

    progress(f"reading {src.name} (the vocabulary takes a few seconds)")
    reader = gguf.GGUFReader(str(src), "r")
    arch = reader.get_field("general.architecture").contents()
    with _written_as_partial(dst) as tmp:
        _write_dequantized(reader, arch, tmp, dst.name, progress, update)
    return dst


def _write_dequantized(
    reader: Any,
    arch: str,
    tmp: Path,
    name: str,
    progress: Progress,
    update: Callable[[str, Any], Any] | None = None,
) -> None:
    import gguf
    import numpy as np

    writer = gguf.GGUFWriter(str(tmp), arch)
    for key, field in reader.fields.items():
        # GGUF.* are the reader's view of the header; the writer adds architecture itself.
        if key.startswith("GGUF.") or key == "general.architecture":
            continue
        if key == "general.file_type":
            writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
            continue
        kind = gguf.GGUFValueType(field.types[0])
        sub = gguf.GGUFValueType(field.types[1]) if kind == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(key, field.contents(), kind, sub_type=sub)
    progress(f"dequantizing {len(reader.tensors)} tensors")
    for tensor in reader.tensors:
        values = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
        if update is not None:
            values = update(tensor.name, values)
        dtype = np.float16 if values.ndim >= 2 else np.float32  # norms stay F32, as llama.cpp wants
        writer.add_tensor(tensor.name, values.astype(dtype))
    progress(f"writing {name}")
    try:
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    finally:
        writer.close()


@contextmanager
def _written_as_partial(dst: Path) -> Iterator[Path]:
    """Yield ``dst.partial`` to write; rename it to ``dst`` when the block succeeds, and
    delete it when the block fails or is interrupted (Ctrl-C), so no half file is left."""
    tmp = dst.with_name(dst.name + ".partial")
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        yield tmp
        tmp.replace(dst)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


# --------------------------------------------------------------------------- quantize


@contextmanager
def _silenced_output() -> Iterator[None]:
    """Silence llama.cpp meanwhile: its log goes through a Python callback that prints to
    ``sys.stderr``, and some messages are written straight to file descriptors 1 and 2."""
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    saved = [os.dup(1), os.dup(2)]
    null = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(null, 1)
        os.dup2(null, 2)
        with redirect_stdout(io.StringIO()), redirect_stderr(io.StringIO()):
            yield
    finally:
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in (*saved, null):
            os.close(fd)


def quantize_file(src: Path, dst: Path, tag: str, threads: int | None = None) -> Path:
    """Quantize the GGUF ``src`` to type ``tag`` with llama.cpp's ``llama_model_quantize``.

    Raises:
        ValueError: unknown tag.
        RuntimeError: llama.cpp reported a failure (no file is left behind).
    """
    import llama_cpp

    (tag,) = check_tags([tag])
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, FTYPES[tag])
    params.nthread = threads or get_settings().threads
    with _written_as_partial(dst) as tmp:
        with _silenced_output():  # llama.cpp prints a line or two per tensor
            code = llama_cpp.llama_model_quantize(str(src).encode(), str(tmp).encode(), params)
        if code != 0 or not tmp.exists():
            raise RuntimeError(f"llama.cpp could not quantize {src.name} to {tag} (code {code}).")
    return dst


def build(
    tags: Iterable[str] = TAGS,
    model: str | None = None,
    *,
    force: bool = False,
    settings: Settings | None = None,
    progress: Progress = _quiet,
) -> dict[str, Path]:
    """Make (or reuse) the ``tags`` versions of ``model`` (default: the lab's default model).

    The full-precision ``f16`` file is made first when any variant is missing, since
    every variant is quantized from it. Files that exist are reused unless ``force``.
    Returns ``{tag: path}`` in the lab's order.

    Raises:
        registry.RegistryError: unknown model, missing or damaged file, not a GGUF chat model.
        ValueError: unknown tag, or a folder where an output file goes.
        RuntimeError: llama.cpp could not quantize (no half-written file is left).
    """
    settings = settings or get_settings()
    base = check_source(registry.resolve(model, settings))
    wanted = check_tags(tags)
    paths = {tag: variant_path(tag, base, settings) for tag in wanted}
    f16 = variant_path("f16", base, settings)
    for path in {f16, *paths.values()}:
        if path.exists() and not path.is_file():
            raise ValueError(
                f"{path} is a folder, but the {path.parent.name} file is written there. "
                "Move or delete that folder, then run again."
            )
    missing = [tag for tag, path in paths.items() if force or not path.exists()]
    if missing and (force or not f16.exists()):
        progress(f"f16: dequantizing {base.ref}")
        write_full_precision(Path(base.path), f16, progress)
    for tag in missing:
        if tag == "f16":
            continue
        progress(f"{tag}: quantizing with llama.cpp")
        quantize_file(f16, paths[tag], tag, settings.threads)
    return paths


def check_source(spec: registry.ModelSpec) -> registry.ModelSpec:
    """Return ``spec`` if it is a readable GGUF chat model that can be quantized here.

    Raises:
        registry.RegistryError: another format, an embedding model, or a damaged GGUF file.
    """
    if spec.format != "gguf" or "chat" not in spec.capabilities:
        raise registry.RegistryError(
            f"{spec.ref} is not a GGUF chat model ({spec.format}, for "
            f"{', '.join(spec.capabilities)}); the quantization lab makes chat variants. "
            f"Name a GGUF chat model, e.g. --model smollm2-135m-instruct (see {registry.CLI} list)."
        )
    registry.read_gguf_info(Path(spec.path))  # a damaged file fails here, with what to do
    return spec


def register(
    paths: dict[str, Path], model: str | None = None, settings: Settings | None = None
) -> dict[str, registry.ModelSpec]:
    """Add each file as ``<model name>:<tag>`` to the user catalog (hashing it once).

    An entry that already points at the same file with the same size is kept as is.
    """
    settings = settings or get_settings()
    base = registry.find(model or settings.default_model, settings)
    specs = {}
    for tag, path in paths.items():
        ref = f"{base.name}:{tag}"
        try:
            known = registry.find(ref, settings)
        except registry.UnknownModelError:
            known = None
        same = (
            known is not None
            and known.tag == tag
            and known.source.kind == "path"
            and Path(known.source.path) == path.resolve()
            and known.size_bytes == path.stat().st_size
        )
        specs[tag] = (
            known
            if same
            else registry.add(
                path,
                name=base.name,
                tag=tag,
                description=f"{base.description.split(';')[0]} - {tag.upper()}, made by llmlab.quantize",
                settings=settings,
            )
        )
    return specs


def tensor_types(path: Path) -> Counter:
    """How many tensors of each type (``Q4_K``, ``Q6_K``, ``F32`` ...) a GGUF file holds."""
    reader = registry._header_reader_class()(str(path), "r")
    return Counter(t.tensor_type.name for t in reader.tensors)


# --------------------------------------------------------------------------- measuring

HELDOUT = Path(__file__).with_name("data") / "heldout.txt"


def heldout_text() -> str:
    """The lab's held-out text: original prose written for this lab, so no model has seen it."""
    return HELDOUT.read_text(encoding="utf-8")


@dataclass
class Measurement:
    """What one version of a model costs and how good it is."""

    label: str
    size_bytes: int
    load_seconds: float
    tokens_per_second: float
    peak_memory_bytes: int
    perplexity: float
    answer: str
    kl: float | None = None  # mean KL divergence from the reference (nats per token)
    top1: float | None = None  # share of positions where the reference's favourite token wins


def measure(
    label: str,
    load: Callable[[], Any],
    *,
    size_bytes: int,
    text: str,
    prompt: str,
    max_tokens: int = 32,
    n_ctx: int = 256,
    ppl_tokens: int = 256,
    reference: perplexity.Reference | None = None,
) -> Measurement:
    """Load a model with ``load()``, time its loading and a greedy chat reply to ``prompt``,
    record the peak resident memory meanwhile, then score ``ppl_tokens`` tokens of ``text``.

    ``load`` returns a loaded local backend (llama.cpp or transformers); it is closed after.
    Peak memory is this process's resident memory added while loading and replying. With a
    ``reference`` (:func:`llmlab.perplexity.reference`) its tokens are scored and the KL
    divergence and top-1 agreement are recorded too.
    """
    with peak_memory() as memory:
        with timer() as loading:
            model = load()
            model.ensure_loaded()
        reply = model.chat(
            [{"role": "user", "content": prompt}], max_tokens=max_tokens, temperature=0
        )
    try:
        scores = perplexity.evaluate(
            model, text, n_ctx=n_ctx, max_tokens=ppl_tokens, reference=reference
        )
    finally:
        model.close()
    return Measurement(
        label,
        size_bytes,
        loading.seconds,
        reply.timings.tokens_per_second,
        memory.added,
        scores.perplexity,
        reply.text.strip(),
        scores.kl,
        scores.top1,
    )


def measure_variants(
    paths: dict[str, Path],
    *,
    text: str,
    prompt: str,
    max_tokens: int = 32,
    n_ctx: int = 256,
    ppl_tokens: int = 256,
    reference: perplexity.Reference | None = None,
    model: str | None = None,
    settings: Settings | None = None,
    progress: Progress = _quiet,
) -> list[Measurement]:
    """:func:`measure` each registered GGUF variant with llama.cpp, in the order given."""
    from llmlab import backends

    settings = settings or get_settings()
    base = registry.find(model or settings.default_model, settings)
    results = []
    for tag, path in paths.items():
        progress(f"measuring {tag}")
        ref = f"{base.name}:{tag}"
        results.append(
            measure(
                tag,
                lambda ref=ref: backends.load(ref, backend="llama.cpp"),
                size_bytes=path.stat().st_size,
                text=text,
                prompt=prompt,
                max_tokens=max_tokens,
                n_ctx=n_ctx,
                ppl_tokens=ppl_tokens,
                reference=reference,
            )
        )
    return results


def _fmt(value: float | None, spec: str) -> str:
    width = int(spec.split(".")[0])
    return f"{'-':>{width}}" if value is None else format(value, spec)


def table(rows: list[Measurement], answer_width: int = 48) -> str:
    """The measurements as a plain-text table (one line per version): size, load time,
    decode tokens/s, peak memory, perplexity, KL divergence and top-1 agreement with the
    reference (``-`` without one), and the start of the answer."""
    head = (
        f"{'version':<14}{'size MiB':>9}{'load s':>8}{'tok/s':>8}{'peak MiB':>9}{'ppl':>8}"
        f"{'KL':>8}{'top1':>6}  answer"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        answer = r.answer.replace("\n", " ")
        answer = answer if len(answer) <= answer_width else answer[: answer_width - 1] + "…"
        lines.append(
            f"{r.label:<14}{r.size_bytes / 2**20:>9.1f}{r.load_seconds:>8.2f}"
            f"{r.tokens_per_second:>8.1f}{r.peak_memory_bytes / 2**20:>9.0f}{r.perplexity:>8.2f}"
            f"{_fmt(r.kl, '8.4f')}{_fmt(r.top1, '6.0%')}  {answer}"
        )
    return "\n".join(lines)


# --------------------------------------------------------------------------- command line

EPILOG = """examples:
  python -m llmlab.quantize                 # every variant of the default model
  python -m llmlab.quantize q4_k_m q8_0     # just these two
  python -m llmlab.quantize --force q2_k    # make it again
then chat with one:
  python part3/simple_chat.py --model smollm2-135m-instruct:q4_k_m
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m llmlab.quantize",
        description="Make quantized GGUF versions of a model and register them as name:tag.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("tags", nargs="*", help=f"any of {', '.join(TAGS)} (default: all)")
    parser.add_argument("--model", help="catalog name of the source GGUF (default: the lab's)")
    parser.add_argument("--force", action="store_true", help="remake files that already exist")
    args = parser.parse_args(argv)
    try:
        tags = check_tags(args.tags or TAGS)
        paths = build(tags, args.model, force=args.force, progress=lambda m: print(m, flush=True))
        specs = register(paths, args.model)
    except ValueError as exc:
        print(exc, file=sys.stderr)
        return 2
    except registry.RegistryError as exc:
        print(exc, file=sys.stderr)
        return 2
    except (RuntimeError, OSError) as exc:
        print(exc, file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(
            "Interrupted. The file being written was removed; files already made are kept "
            "and reused. Run the same command again to make the rest.",
            file=sys.stderr,
        )
        return 130
    for tag, spec in specs.items():
        size = os.path.getsize(paths[tag])
        print(f"{spec.ref:<32} {size / 2**20:7.1f} MiB  {paths[tag]}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
