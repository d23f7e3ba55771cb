"""Which base model a LoRA adapter was made for, and refusing it on any other::

    from llmlab.finetune import adapters
    adapters.adapter_base("runs/x/adapter")          # "smollm2-135m-instruct"
    adapters.check_adapter("x.lora.gguf", spec)      # AdapterMismatchError on another model

An adapter is a low-rank change to *one* model's weight matrices: on another model the
shapes may happen to fit and the result is nonsense. The lab records the base model's
catalog name with every adapter it writes: in ``llmlab-adapter.json`` beside a PEFT
adapter folder, and as the ``llmlab.base_model`` key of a GGUF adapter. A GGUF adapter
from elsewhere has no such key; then its architecture and tensor shapes are what llama.cpp
itself checks when it loads it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from llmlab.backends.base import BackendError

META_FILE = "llmlab-adapter.json"
GGUF_BASE_KEY = "llmlab.base_model"


class AdapterMismatchError(BackendError):
    """An adapter given to a model it was not made for."""


def read_meta(folder: str | Path) -> dict[str, Any]:
    """The ``llmlab-adapter.json`` of a PEFT adapter folder (empty if it has none)."""
    try:
        return json.loads((Path(folder) / META_FILE).read_text())
    except (OSError, ValueError):
        return {}


def adapter_base(path: str | Path) -> str | None:
    """The catalog name of the model an adapter (folder or ``.gguf``) was made for, if recorded.

    Raises:
        BackendError: the path does not exist or is not a readable adapter.
    """
    path = Path(path)
    if path.is_dir():
        return read_meta(path).get("base_model")
    if not path.is_file():
        raise BackendError(
            f"No LoRA adapter at {path}. Check the path (part4/fine_tune.py makes one)."
        )
    from llmlab.registry import _header_reader_class

    try:
        reader = _header_reader_class()(str(path), "r")
    except Exception as exc:  # noqa: BLE001 - any reader failure means "not a GGUF adapter"
        raise BackendError(f"{path} is not a GGUF LoRA adapter ({exc}).") from exc
    kind = reader.get_field("general.type")
    if kind is None or kind.contents() != "adapter":
        raise BackendError(
            f"{path} is a GGUF model, not a LoRA adapter (general.type is not 'adapter')."
        )
    field = reader.get_field(GGUF_BASE_KEY)
    return field.contents() if field is not None else None


def check_adapter(path: str | Path, spec) -> None:
    """Refuse an adapter recorded as made for another model than ``spec`` (a ModelSpec).

    Raises:
        AdapterMismatchError: the message names both models and what to do.
        BackendError: the adapter file is missing or unreadable.
    """
    base = adapter_base(path)
    if base is not None and base != spec.name:
        raise AdapterMismatchError(
            f"The LoRA adapter {path} was made for {base}, not for {spec.ref}. Load it on "
            f"{base} (--model {base}) or train an adapter for {spec.name}."
        )
