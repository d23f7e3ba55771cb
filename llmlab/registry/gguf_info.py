"""The header of a GGUF file (architecture, size, cache shape), read in a fraction of a second."""

from __future__ import annotations

import functools
import struct
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from llmlab.registry.spec import RegistryError


@dataclass(frozen=True)
class GGUFInfo:
    """What a GGUF file's header says about the model inside."""

    architecture: str
    name: str | None
    context_length: int | None
    parameters: int
    quantization: str | None
    has_chat_template: bool
    license: str | None
    n_layers: int | None
    n_kv_heads: int | None
    head_dim: int | None
    vocab_size: int | None
    main_tensor_type: str = "F32"
    """The type most weight matrices are stored in (``Q4_1`` for the shipped file)."""


def _header_reader_class():
    """``gguf.GGUFReader`` that skips the text of long string arrays (the vocabulary).

    The stock reader builds one numpy view per vocabulary entry, which takes seconds for
    a 50k-token vocabulary; the header fields and tensor shapes needed here do not need
    them. The vocabulary size is taken from the embedding tensor instead.
    """
    import gguf
    import numpy as np

    class HeaderReader(gguf.GGUFReader):
        def _get_field_parts(self, orig_offs, raw_type):
            if gguf.GGUFValueType(raw_type) != gguf.GGUFValueType.ARRAY:
                return super()._get_field_parts(orig_offs, raw_type)
            raw_itype = self._get(orig_offs, np.uint32)
            alen = self._get(orig_offs + 4, np.uint64)
            item_type, count, offs = gguf.GGUFValueType(raw_itype[0]), int(alen[0]), orig_offs + 12
            nptype = self.gguf_scalar_to_np.get(item_type)
            if nptype is not None:  # numbers: one view for the whole array
                values = self._get(offs, nptype, count)
                return (
                    12 + int(values.nbytes),
                    [raw_itype, alen, values],
                    [2],
                    [gguf.GGUFValueType.ARRAY, item_type],
                )
            if item_type != gguf.GGUFValueType.STRING or count < 1024:
                return super()._get_field_parts(orig_offs, raw_type)
            buffer, order = memoryview(self.data), "big" if self.byte_order == "S" else "little"
            for _ in range(count):  # step over each string: 8-byte length, then the bytes
                offs += 8 + int.from_bytes(buffer[offs : offs + 8], order)
            return offs - orig_offs, [raw_itype, alen], [], [gguf.GGUFValueType.ARRAY, item_type]

    return HeaderReader


def read_gguf_info(path: Path) -> GGUFInfo:
    """Read architecture, context, parameter count, quantization and chat template of a GGUF.

    The parameter count is ``general.parameter_count`` when the file records it, else the
    sum of the tensors' element counts. A file read before in this process, unchanged since
    (same size and modification time), is not read again.

    Raises:
        RegistryError: the file is not a readable GGUF file.
    """
    try:
        stat = Path(path).stat()
    except OSError as exc:
        raise RegistryError(f"{path} is not a file. Name a .gguf model file.") from exc
    return _read_gguf_info(str(path), str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=16)
def _read_gguf_info(path: str, resolved: str, size: int, mtime_ns: int) -> GGUFInfo:
    try:
        reader = _header_reader_class()(resolved, "r")
    except (ValueError, OSError, struct.error) as exc:
        if not Path(path).is_file():
            raise RegistryError(f"{path} is not a file. Name a .gguf model file.") from exc
        if size == 0:
            raise RegistryError(
                f"{path} is empty (0 bytes), so it holds no model. If it is a download or a "
                "copy, make it again and check it finished."
            ) from exc
        with open(path, "rb") as handle:
            magic = handle.read(4)
        what = (
            "starts as a GGUF file but is truncated or damaged"
            if magic == b"GGUF"
            else "is not a GGUF model file"
        )
        raise RegistryError(
            f"{path} {what} ({exc}). Convert the model to GGUF, or copy or download it again."
        ) from exc

    from gguf import LlamaFileType

    def field(key: str):
        item = reader.get_field(key)
        return None if item is None else item.contents()

    arch = field("general.architecture") or "unknown"
    file_type = field("general.file_type")
    quant = None
    if file_type is not None:
        try:
            quant = LlamaFileType(int(file_type)).name.removeprefix("MOSTLY_")
        except ValueError:
            quant = f"file_type {file_type}"
    heads = field(f"{arch}.attention.head_count")
    kv_heads = field(f"{arch}.attention.head_count_kv")
    heads = max(heads) if isinstance(heads, list) else heads
    kv_heads = max(kv_heads) if isinstance(kv_heads, list) else kv_heads
    embedding = field(f"{arch}.embedding_length")
    head_dim = field(f"{arch}.attention.key_length") or (
        embedding // heads if embedding and heads else None
    )
    embedding_tensor = next((t for t in reader.tensors if t.name == "token_embd.weight"), None)
    parameters = field("general.parameter_count") or sum(int(t.n_elements) for t in reader.tensors)
    matrices = Counter(t.tensor_type.name for t in reader.tensors if len(t.shape) >= 2)
    return GGUFInfo(
        architecture=arch,
        name=field("general.name"),
        context_length=field(f"{arch}.context_length"),
        parameters=int(parameters),
        quantization=quant,
        has_chat_template=reader.get_field("tokenizer.chat_template") is not None,
        license=field("general.license"),
        n_layers=field(f"{arch}.block_count"),
        n_kv_heads=kv_heads or heads,
        head_dim=head_dim,
        vocab_size=int(embedding_tensor.shape[-1]) if embedding_tensor is not None else None,
        main_tensor_type=matrices.most_common(1)[0][0] if matrices else "F32",
    )
