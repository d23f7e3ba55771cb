"""Which file of a model batch jobs and the server run: a batch-friendly format, on purpose.

``part3/batch_process.py`` and the server decode many sequences per llama.cpp step. That
only pays when the weights' format has a batched kernel here (:mod:`llmlab.registry.kernels`);
the shipped Q4_1 file has none on x86 without AMX. So, by default, both run a version of
the requested model whose kernels batch, made from the requested file, when it is nearly
the same model: its mean KL divergence from the requested file on the lab's held-out text
is at most :data:`KL_THRESHOLD`. Otherwise, or with ``--exact-model``
(``LLMLAB_EXACT_MODEL=1``), they run the file as given::

    from llmlab import registry
    from llmlab.registry import batch_format
    choice = batch_format.choose(registry.resolve())    # makes and measures it the first time
    choice.spec.path, choice.message                     # what to run, and the line to print

The version is made once with llama.cpp's quantizer, at :func:`llmlab.quantize.variant_path`,
and a record beside it keeps its sha256, the source file's sha256 and the measured KL, so
a second run only checks the file (a stat, thanks to the registry's verified cache). A
damaged file is made again. Single-sequence speed is about the same in every format (one
token at a time is memory-bound), so a one-at-a-time run (``--engine sequential``) keeps
the file as given.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from llmlab.registry import kernels
from llmlab.registry.files import sha256_file, verify
from llmlab.registry.spec import ChecksumError, ModelSpec, RegistryError, Source
from llmlab.settings import Settings, get_settings

# Mean KL divergence (nats per token) from the requested file's next-token distributions
# that still counts as "the same model". Measured on the default model (made from the
# shipped Q4_1, held-out text): Q8_0 0.005 (95% the same top token, perplexity 30.23 vs
# 30.14) passes with a 4x margin; Q5_0 0.07, IQ4_NL 0.19 and Q4_0 0.26 visibly change it.
KL_THRESHOLD = 0.02
KL_N_CTX = 512
KL_TOKENS = 1023  # two windows of 512 tokens of llmlab/data/heldout.txt
# Formats the lab makes for batching, most faithful first. Only the first one with a batched
# kernel here is made and measured: a less faithful one cannot pass where it failed.
CANDIDATES = ("q8_0", "iq4_nl", "q4_0")
RECORD_VERSION = 1

Say = Callable[[str], None]


@dataclass
class Choice:
    """What to run for a requested model, and why.

    ``spec`` is the requested entry (same name and tag, so clients keep using its name)
    with ``path`` pointing at the file to run; ``tag`` names the variant when one is used.
    ``message`` is the one line to print ("" when nothing changes)."""

    spec: ModelSpec
    requested: ModelSpec
    tag: str | None = None
    kl: float | None = None
    message: str = ""

    @property
    def changed(self) -> bool:
        """True when a variant runs instead of the requested file."""
        return self.tag is not None


def source_format(spec: ModelSpec) -> str:
    """The main tensor type of the entry's file (``Q4_1``), else its catalog quantization."""
    try:
        return kernels.main_type(spec.path)
    except (OSError, ValueError, KeyError, RegistryError):  # not a readable GGUF file
        return kernels.format_name(spec.quantization or "unknown")


def cached_variant_path(tag: str, spec: ModelSpec, settings: Settings | None = None) -> Path:
    """Where the ``tag`` version made from ``spec``'s file lives: the quantization lab's own
    path for a name's default version; ``<tag>-from-<its tag>`` for any other version."""
    from llmlab.quantize import variant_path

    path = variant_path(tag, spec, settings)
    return path if spec.default else path.parent.with_name(f"{tag}-from-{spec.tag}") / path.name


def record_path(variant: Path) -> Path:
    """The record kept beside a variant: checksums and the measured KL."""
    return variant.with_name(variant.name + ".kl.json")


def _source_sha(spec: ModelSpec) -> str:
    return spec.sha256 or sha256_file(Path(spec.path))


def read_record(variant: Path, source_sha: str) -> dict | None:
    """The record of ``variant`` if it was made from the file with ``source_sha`` by this
    protocol; ``None`` otherwise (missing, unreadable, another source or protocol)."""
    try:
        record = json.loads(record_path(variant).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    expected = {"version": RECORD_VERSION, "source_sha256": source_sha, "tokens": KL_TOKENS}
    if not isinstance(record, dict) or any(record.get(k) != v for k, v in expected.items()):
        return None
    return record


def write_record(variant: Path, source_sha: str, kl: float, top1: float | None) -> dict:
    """Hash ``variant`` and record it with its source and measured KL; returns the record."""
    record = {
        "version": RECORD_VERSION,
        "source_sha256": source_sha,
        "sha256": sha256_file(variant),
        "size_bytes": variant.stat().st_size,
        "kl": kl,
        "top1": top1,
        "tokens": KL_TOKENS,
        "n_ctx": KL_N_CTX,
        "text": "llmlab/data/heldout.txt",
    }
    tmp = record_path(variant).with_suffix(".tmp")
    tmp.write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
    tmp.replace(record_path(variant))
    return record


def make_variant(tag: str, spec: ModelSpec, dst: Path, settings: Settings) -> Path:
    """Make the ``tag`` version of ``spec``'s file at ``dst`` with llama.cpp's quantizer,
    through a full-precision file in a temporary folder (deleted after)."""
    from llmlab import quantize

    dst.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dst.parent) as tmp:
        f16 = quantize.write_full_precision(Path(spec.path), Path(tmp) / "source.F16.gguf")
        return quantize.quantize_file(f16, dst, tag, settings.threads)


def measure_kl(source: Path, variant: Path) -> tuple[float, float | None]:
    """Mean KL divergence (nats/token) of ``variant`` from ``source`` and their top-1
    agreement, on the first :data:`KL_TOKENS` tokens of the held-out text."""
    from llmlab import perplexity, quantize

    result = perplexity.compare(
        source, variant, quantize.heldout_text(), n_ctx=KL_N_CTX, max_tokens=KL_TOKENS
    )
    return float(result.kl or 0.0), result.top1


def _verified(variant: Path, record: dict, settings: Settings) -> bool:
    entry = ModelSpec(
        name=variant.stem,
        sha256=record.get("sha256"),
        size_bytes=record.get("size_bytes"),
        source=Source(kind="path", path=str(variant)),
    )
    try:
        verify(entry, variant, settings)
    except ChecksumError:
        return False
    return True


def _variant_record(
    tag: str,
    spec: ModelSpec,
    settings: Settings,
    say: Say,
    make: Callable[[str, ModelSpec, Path, Settings], Path],
    measure: Callable[[Path, Path], tuple[float, float | None]],
) -> tuple[Path, dict]:
    """The variant's path and record: from the cache when its file is intact, else made
    and measured now (and recorded)."""
    variant = cached_variant_path(tag, spec, settings)
    source_sha = _source_sha(spec)
    record = read_record(variant, source_sha)
    if record is not None and record["kl"] > KL_THRESHOLD:
        return variant, record  # measured before and not used: the file is not needed
    if record is not None and variant.is_file():
        if _verified(variant, record, settings):
            return variant, record
        say(
            f"The cached {tag.upper()} file {variant} is damaged (sha256 mismatch); making it again."
        )
    fmt = source_format(spec)
    say(
        f"Making {spec.name} {tag.upper()} from the {fmt} file for batched decoding and "
        f"measuring it on held-out text (once; kept in {variant.parent})..."
    )
    try:
        make(tag, spec, variant, settings)
    except RuntimeError as exc:  # llama.cpp's quantizer failed; it left nothing behind
        raise RegistryError(f"{exc} Run with --exact-model to use the file as given.") from exc
    kl, top1 = measure(Path(spec.path), variant)
    return variant, write_record(variant, source_sha, kl, top1)


def choose(
    spec: ModelSpec,
    *,
    exact: bool | None = None,
    settings: Settings | None = None,
    features: tuple[str, ...] | None = None,
    say: Say = print,
    make: Callable[[str, ModelSpec, Path, Settings], Path] = make_variant,
    measure: Callable[[Path, Path], tuple[float, float | None]] = measure_kl,
) -> Choice:
    """Decide which file of ``spec`` (a resolved entry) to run for batched decoding.

    Nothing changes for ``exact`` (default: ``LLMLAB_EXACT_MODEL``), a file that is not
    GGUF, or one whose format already has a batched kernel with this build (``features``,
    default: the installed llama.cpp's). Otherwise the most faithful format of
    :data:`CANDIDATES` that batches here is made from the file (once) and used if its KL
    divergence is at most :data:`KL_THRESHOLD`. ``say`` gets progress lines while a
    variant is made; ``make`` and ``measure`` are the steps (tests pass fakes).

    Raises:
        RegistryError: llama.cpp could not make the variant (nothing half-written is kept).
    """
    settings = settings or get_settings()
    exact = settings.exact_model if exact is None else exact
    here = kernels.batched_formats(kernels.build_features() if features is None else features)
    if spec.format != "gguf" or spec.path is None:
        return Choice(spec, spec)
    fmt = source_format(spec)
    if fmt in here:
        return Choice(spec, spec)
    as_given = f"using {spec.name} {fmt} as given"
    if exact:
        why = f"{fmt} has no batched kernel in this llama.cpp build, so batches of it run slower"
        return Choice(spec, spec, message=f"{as_given} (--exact-model); {why}")
    tag = next((t for t in CANDIDATES if t.upper() in here), None)
    if tag is None:
        why = "no format the lab makes has a batched kernel in this llama.cpp build"
        return Choice(spec, spec, message=f"{as_given}: {why}")
    variant, record = _variant_record(tag, spec, settings, say, make, measure)
    kl, name = record["kl"], tag.upper()
    if kl > KL_THRESHOLD:
        why = f"{name}, whose kernels batch here, changes the model"
        limit = f"KL {kl:.3f} > {KL_THRESHOLD} nats/token on held-out text"
        return Choice(spec, spec, kl=kl, message=f"{as_given}: {why} ({limit})")
    update = {"path": variant, "quantization": name, "sha256": record["sha256"]}
    chosen = spec.model_copy(update={**update, "size_bytes": record["size_bytes"]})
    origin = "shipped" if spec.source.kind == "package" else "requested"
    why = f"made from the {origin} {fmt}: batched kernels here, KL {kl:.3f} < {KL_THRESHOLD}"
    message = f"using {spec.name} {name} ({why}); --exact-model keeps the file as given"
    return Choice(chosen, spec, tag=tag, kl=kl, message=message)


def explain(
    spec: ModelSpec, settings: Settings | None = None, features: tuple[str, ...] | None = None
) -> str:
    """The batch trade for ``spec`` in a few sentences, without making anything: whether its
    format batches here, what batch jobs and the server run instead, its size and KL."""
    settings = settings or get_settings()
    here = kernels.batched_formats(kernels.build_features() if features is None else features)
    if spec.format != "gguf":
        return f"Batches: {spec.ref} is not a GGUF file; batch jobs and the server run it as given."
    present = spec.path is not None and Path(spec.path).is_file()
    fmt = source_format(spec) if present else kernels.format_name(spec.quantization or "?")
    if fmt in here:
        return (
            f"Batches: {fmt} has a batched kernel in this llama.cpp build, so batch jobs and "
            f"the server run {spec.ref} as given."
        )
    lines = [
        f"Batches: {fmt} has no batched kernel in this llama.cpp build: one sequence runs about "
        "as fast in any format, but many sequences per step gain less than they could."
    ]
    tag = next((t for t in CANDIDATES if t.upper() in here), None)
    if tag is None:
        lines.append("No format the lab makes batches here either, so the file runs as given.")
        return " ".join(lines)
    name = tag.upper()
    record = (
        read_record(cached_variant_path(tag, spec, settings), _source_sha(spec))
        if present
        else None
    )
    if record is None:
        lines.append(
            f"Batch jobs and the server make a {name} from it the first time, measure its KL "
            f"divergence on held-out text, and run it if that is at most {KL_THRESHOLD} nats/token."
        )
    elif record["kl"] <= KL_THRESHOLD:
        size = Path(spec.path).stat().st_size / 2**20
        lines.append(
            f"Batch jobs and the server run the {name} made from it ({record['size_bytes'] / 2**20:.0f} "
            f"MiB vs {size:.0f} MiB; KL {record['kl']:.3f} nats/token on held-out text, limit "
            f"{KL_THRESHOLD}): the same model, with batched kernels."
        )
    else:
        lines.append(
            f"Its {name} changes the model (KL {record['kl']:.3f} > {KL_THRESHOLD} nats/token), "
            "so batch jobs and the server run the file as given."
        )
    if tag == "q8_0":
        lines.append(
            "On the lab's 2-core x86 machines, 8 sequences of Q8_0 gave 2.6-3.3x the tokens/s "
            "of one, of Q4_1 1.7x. Q4_0 and IQ4_NL batch faster still and are smaller, but "
            "change the default model visibly (KL 0.19-0.26), so they are not chosen."
        )
    lines.append("--exact-model (LLMLAB_EXACT_MODEL=1) keeps the file as given.")
    return " ".join(lines)
