"""A PEFT LoRA adapter back to llama.cpp, two ways::

    from llmlab.finetune import export_gguf
    export_gguf.write_adapter("runs/json-qa/adapter", base_gguf, "runs/json-qa/json-qa.lora.gguf")
    export_gguf.write_merged("runs/json-qa/adapter", base_gguf, "merged-F16.gguf")
    spec = export_gguf.export_merged("runs/json-qa/adapter", "json-qa")   # Q8_0, registered

**Adapter**: the low-rank matrices themselves, as llama.cpp's ``convert_lora_to_gguf.py``
writes them: ``general.type = adapter``, ``adapter.type = lora``, ``adapter.lora.alpha``,
and for each adapted weight ``blk.N.attn_q.weight.lora_a`` (rank x inputs) and ``.lora_b``
(outputs x rank). llama.cpp loads it on top of the unchanged base file
(``Llama(lora_path=...)``, or ``backends.load(..., lora=path)``) and scales it by
alpha / rank, as PEFT does.

**Merged**: the base file's tensors dequantized with ``W + alpha / rank * B @ A`` added
to each adapted one, written with the base file's metadata, tokenizer and chat template
(:func:`llmlab.quantize.write_full_precision`), then quantized by llama.cpp
(:func:`llmlab.quantize.quantize_file`) and registered as ``<base name>:<name>``.

One detail both need: llama.cpp stores the rows of the query and key projections of
llama-family models in another order than Hugging Face does (``convert_hf_to_gguf.py``
permutes them so RoPE rotates neighbouring pairs; transformers permutes them back when it
reads a GGUF). A LoRA update ``B @ A`` changes rows through ``B``, so ``B`` of ``q_proj``
and ``k_proj`` gets the same permutation; ``A`` stays as it is.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np

from llmlab.finetune.adapters import GGUF_BASE_KEY, read_meta

PREFIX = "base_model.model."
_LORA = re.compile(r"^(?P<module>.+)\.lora_(?P<part>[AB])\.weight$")


class ExportError(RuntimeError):
    """The adapter cannot be written for llama.cpp (the message says why)."""


def permute(weights: np.ndarray, n_head: int, n_head_kv: int | None = None) -> np.ndarray:
    """Rows reordered from Hugging Face's to llama.cpp's layout (``convert_hf_to_gguf.py``'s
    ``LlamaModel.permute``): within each head, the two halves of the rotary pairs interleave."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    shape = weights.shape
    return (
        weights.reshape(n_head, 2, shape[0] // n_head // 2, *shape[1:])
        .swapaxes(1, 2)
        .reshape(shape)
    )


def read_peft(folder: str | Path) -> tuple[dict, dict[str, tuple[np.ndarray, np.ndarray]]]:
    """The adapter config and ``{module name: (A, B)}`` of a PEFT LoRA folder, as float32.

    Raises:
        ExportError: missing files, or LoRA options llama.cpp cannot represent.
    """
    from safetensors.numpy import load_file

    folder = Path(folder)
    try:
        config = json.loads((folder / "adapter_config.json").read_text())
        tensors = load_file(folder / "adapter_model.safetensors")
    except (OSError, ValueError) as exc:
        raise ExportError(f"{folder} is not a PEFT LoRA adapter folder: {exc}") from exc
    if config.get("peft_type") != "LORA":
        raise ExportError(f"{folder} holds a {config.get('peft_type')} adapter, not LoRA.")
    if config.get("use_rslora") or config.get("rank_pattern") or config.get("alpha_pattern"):
        raise ExportError(
            "rsLoRA and per-module ranks or alphas have no llama.cpp equivalent; train "
            "with one rank and alpha for every module."
        )
    pairs: dict[str, dict[str, np.ndarray]] = {}
    for name, value in tensors.items():
        match = _LORA.match(name.removeprefix(PREFIX))
        if not match:
            raise ExportError(
                f"Unexpected tensor {name!r} in {folder}: only LoRA A/B matrices of linear "
                "layers can go to llama.cpp (no embeddings or extra trained modules)."
            )
        pairs.setdefault(match["module"], {})[match["part"]] = value.astype(np.float32)
    return config, {m: (p["A"], p["B"]) for m, p in pairs.items()}


class _BaseLayout:
    """Names and head counts of the base GGUF, to place each LoRA matrix in llama.cpp."""

    def __init__(self, base_gguf: str | Path):
        import gguf

        from llmlab.registry import _header_reader_class

        reader = _header_reader_class()(str(base_gguf), "r")
        self.arch = reader.get_field("general.architecture").contents()
        n_blocks = reader.get_field(f"{self.arch}.block_count").contents()
        self.n_head = reader.get_field(f"{self.arch}.attention.head_count").contents()
        kv = reader.get_field(f"{self.arch}.attention.head_count_kv")
        self.n_head_kv = kv.contents() if kv is not None else self.n_head
        arch = {v: k for k, v in gguf.MODEL_ARCH_NAMES.items()}[self.arch]
        self.names = gguf.get_tensor_name_map(arch, n_blocks)
        self.shapes = {t.name: tuple(int(x) for x in reversed(t.shape)) for t in reader.tensors}

    def place(self, module: str, a: np.ndarray, b: np.ndarray) -> tuple[str, np.ndarray]:
        """The GGUF weight name of a PEFT module, and ``B`` in llama.cpp's row order."""
        name = self.names.get_name(module + ".weight", try_suffixes=(".weight",))
        if name is None or name not in self.shapes:
            raise ExportError(f"{module} has no weight in the base GGUF file (another model?).")
        if self.shapes[name] != (b.shape[0], a.shape[1]):
            raise ExportError(
                f"{module}: the adapter is {b.shape[0]}x{a.shape[1]} but the base weight {name} "
                f"is {self.shapes[name][0]}x{self.shapes[name][1]}: it was made for another model."
            )
        if self.arch == "llama" and module.endswith("q_proj"):
            b = permute(b, self.n_head, self.n_head)
        elif self.arch == "llama" and module.endswith("k_proj"):
            b = permute(b, self.n_head, self.n_head_kv)
        return name, b


def _base_name(folder: Path) -> str | None:
    return read_meta(folder).get("base_model")


def write_adapter(adapter: str | Path, base_gguf: str | Path, out: str | Path) -> Path:
    """Write the PEFT adapter in ``adapter`` as a GGUF LoRA adapter for ``base_gguf``.

    The file also records the base model's catalog name (``llmlab.base_model``), so the
    lab refuses it on another model.
    """
    import gguf

    config, pairs = read_peft(adapter)
    layout = _BaseLayout(base_gguf)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".partial")
    writer = gguf.GGUFWriter(str(tmp), layout.arch)
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(config["lora_alpha"]))
    base = _base_name(Path(adapter))
    if base:
        writer.add_string(GGUF_BASE_KEY, base)
    for module, (a, b) in sorted(pairs.items()):
        name, b = layout.place(module, a, b)
        writer.add_tensor(name + ".lora_a", np.ascontiguousarray(a))
        writer.add_tensor(name + ".lora_b", np.ascontiguousarray(b))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    tmp.replace(out)
    return out


def merged_updates(adapter: str | Path, base_gguf: str | Path) -> dict[str, np.ndarray]:
    """``{GGUF weight name: alpha / rank * B @ A}`` in llama.cpp's layout, float32."""
    config, pairs = read_peft(adapter)
    layout = _BaseLayout(base_gguf)
    scale = float(config["lora_alpha"]) / float(config["r"])
    updates = {}
    for module, (a, b) in pairs.items():
        name, b = layout.place(module, a, b)
        updates[name] = scale * (b @ a)
    return updates


def write_merged(
    adapter: str | Path, base_gguf: str | Path, out: str | Path, progress=None
) -> Path:
    """Write ``base_gguf`` with the adapter merged in, every weight F16 (norms F32), with
    the base file's metadata, tokenizer and chat template."""
    from llmlab import quantize

    updates = merged_updates(adapter, base_gguf)

    def update(name: str, values: np.ndarray) -> np.ndarray:
        values = values.astype(np.float32)
        return values + updates[name] if name in updates else values

    return quantize.write_full_precision(
        Path(base_gguf), Path(out), progress or (lambda _: None), update=update
    )


def export_merged(
    adapter: str | Path,
    name: str,
    *,
    quant: str = "q8_0",
    base: str | None = None,
    settings=None,
    progress=None,
):
    """Merge, quantize to ``quant`` with llama.cpp and register as ``<base name>:<name>``.

    Files: ``$LLMLAB_HOME/models/<base name>/<name>/<stem>.<NAME>-F16.gguf`` (merged, full
    precision) and ``<stem>.<NAME>.gguf`` (quantized, the registered one). Returns the
    catalog entry (its sha256 recorded), resolved to its local path.

    Raises:
        ExportError: ``name`` is not a valid tag or is one of the quantization tags.
    """
    from llmlab import quantize, registry
    from llmlab.settings import get_settings

    settings = settings or get_settings()
    progress = progress or (lambda _: None)
    if name.lower() in quantize.TAGS:
        raise ExportError(
            f"{name!r} is a quantization tag of the base model; choose another name (e.g. json-qa)."
        )
    spec = registry.resolve(base or _base_name(Path(adapter)) or settings.default_model, settings)
    final = quantize.variant_path(name, spec, settings)
    f16 = final.with_name(final.name.replace(".gguf", "-F16.gguf"))
    progress(f"merging the adapter into {spec.ref}")
    write_merged(adapter, spec.path, f16, progress)
    progress(f"quantizing to {quant}")
    quantize.quantize_file(f16, final, quant, settings.threads)
    added = registry.add(
        final,
        name=spec.name,
        tag=name,
        description=(
            f"{spec.description.split(';')[0].split(',')[0]} with the LoRA fine-tune "
            f"'{name}' merged, {quant.upper()}; made by part4/fine_tune.py"
        ),
        settings=settings,
    )
    return registry.resolve(added.ref, settings)  # with its local path
