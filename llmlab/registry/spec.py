"""What a catalog entry is: :class:`ModelSpec`, its :class:`Source`, and the registry's errors."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field

CLI = "python part5/model_registry.py"
MiB = 1 << 20


class RegistryError(Exception):
    """A registry problem with a message that says what to do next."""


class UnknownModelError(RegistryError):
    """The name is not in the catalog."""


class ModelNotAvailableError(RegistryError):
    """The entry is known but its file is not on this machine (not installed or not pulled)."""


class ChecksumError(RegistryError):
    """The local file does not match the recorded sha256 (corrupt or truncated)."""


class DownloadError(RegistryError):
    """A download failed or was interrupted; a ``.partial`` file may be kept for resuming."""


class Source(BaseModel):
    """Where a model's file comes from."""

    kind: Literal["package", "url", "hf", "path"]
    package: str | None = None  # import name of a pip package that ships the file
    pip: str | None = None  # its pip name, for the install hint
    assemble: bool = False  # the package ships chunks; its assemble() writes the file
    file: str | None = None  # file (or folder) inside the package, or the HF filename
    weights: str | None = None  # for a folder: the file the sha256 refers to
    url: str | None = None
    repo: str | None = None  # Hugging Face repo id
    revision: str | None = None
    path: str | None = None  # a user's own local file

    def describe(self) -> str:
        """One short line for people: where the file comes from."""
        if self.kind == "package":
            return f"pip {self.pip or self.package}" + (" (chunks)" if self.assemble else "")
        if self.kind == "hf":
            return f"hf:{self.repo}/{self.file}"
        if self.kind == "url":
            return self.url or ""
        return f"path {self.path}"


class ModelSpec(BaseModel):
    """One version of one model, as the catalog describes it."""

    name: str
    tag: str = "latest"
    default: bool = False
    family: str = "unknown"
    description: str = ""
    parameters: int | None = None
    format: Literal["gguf", "safetensors", "sentence-transformers"] = "gguf"
    quantization: str | None = None
    context_length: int | None = None
    license: str | None = None
    size_bytes: int | None = None
    sha256: str | None = None
    ram_bytes: int | None = None
    capabilities: list[str] = Field(default_factory=lambda: ["chat"])
    # Shape of the attention cache, for estimate_ram(); read from the GGUF header.
    n_layers: int | None = None
    n_kv_heads: int | None = None
    head_dim: int | None = None
    vocab_size: int | None = None
    source: Source
    user: bool = Field(False, exclude=True)  # from the user's catalog, not the built-in one
    path: Path | None = Field(None, exclude=True)  # set by resolve()

    @property
    def ref(self) -> str:
        """``name:tag``, the unique reference of this version."""
        return f"{self.name}:{self.tag}"


# --------------------------------------------------------------------------- memory
