"""Entries users add and remove: a local GGUF (:func:`add`), a URL or HF file, :func:`remove`."""

from __future__ import annotations

import re
from pathlib import Path

from llmlab.registry.catalogs import (
    _user_entries,
    _write_user_entries,
    builtin_refs,
    find,
    save_user_entry,
)
from llmlab.registry.files import _remember_verified, local_path, sha256_file
from llmlab.registry.gguf_info import read_gguf_info
from llmlab.registry.memory import spec_ram_estimate
from llmlab.registry.spec import ModelNotAvailableError, ModelSpec, RegistryError, Source
from llmlab.settings import Settings, get_settings

_NAME = re.compile(r"[a-z0-9][a-z0-9._-]*")


def _check_new_name(name: str, tag: str) -> None:
    for label, value in (("name", name), ("tag", tag)):
        if not _NAME.fullmatch(value):
            raise RegistryError(
                f"Invalid {label} {value!r}: use lower-case letters, digits, '.', '_' and '-' "
                "(e.g. my-model, tag q4_k_m)."
            )
    if f"{name}:{tag}" in builtin_refs():
        raise RegistryError(f"{name}:{tag} is a built-in entry; choose another name or tag.")


def register_remote(
    location: str, name: str, tag: str = "latest", settings: Settings | None = None
) -> ModelSpec:
    """Add a user entry for ``https://…/file.gguf`` or ``hf:OWNER/REPO/FILE`` (no download yet).

    Size and sha256 are unknown until :func:`pull` records them.
    """
    settings = settings or get_settings()
    _check_new_name(name, tag)
    if location.startswith("hf:"):
        parts = location.removeprefix("hf:").split("/")
        if len(parts) < 3:
            raise RegistryError(
                f"{location!r} is not hf:OWNER/REPO/FILE, e.g. hf:Qwen/Qwen2.5-0.5B-Instruct-GGUF/qwen2.5-0.5b-instruct-q4_k_m.gguf"
            )
        source = Source(kind="hf", repo="/".join(parts[:2]), file="/".join(parts[2:]))
    elif re.match(r"https?://", location):
        source = Source(kind="url", url=location, file=Path(location.split("?")[0]).name)
    else:
        raise RegistryError(
            f"{location!r} is neither a catalog name, an http(s) URL nor hf:OWNER/REPO/FILE."
        )
    fmt = "gguf" if (source.file or "").endswith(".gguf") else "safetensors"
    spec = ModelSpec(
        name=name,
        tag=tag,
        format=fmt,
        description=f"Added from {location}",
        source=source,
        user=True,
    )
    save_user_entry(spec, settings)
    return spec


EMBEDDING_ARCHITECTURES = {"bert", "nomic-bert", "jina-bert-v2", "t5encoder"}


def add(
    path: str | Path,
    name: str,
    tag: str = "latest",
    *,
    description: str | None = None,
    settings: Settings | None = None,
) -> ModelSpec:
    """Register a local GGUF file as ``name:tag`` in the user catalog and return its entry.

    Metadata comes from the GGUF header (see :func:`read_gguf_info`); a chat template
    means the model can ``chat``. The file is hashed once so later loads can detect a
    corrupted copy. The file stays where it is.
    """
    settings = settings or get_settings()
    path = Path(path).expanduser().resolve()
    if path.is_dir():
        raise ModelNotAvailableError(f"{path} is a folder, not a file. Name the .gguf file in it.")
    if not path.is_file():
        raise ModelNotAvailableError(f"{path} does not exist or is not a file. Check the path.")
    _check_new_name(name, tag)
    info = read_gguf_info(path)
    if info.architecture in EMBEDDING_ARCHITECTURES:
        capabilities = ["embeddings"]
    else:
        capabilities = ["chat", "completion"] if info.has_chat_template else ["completion"]
    size = path.stat().st_size
    sha = sha256_file(path)
    spec = ModelSpec(
        name=name,
        tag=tag,
        family=info.architecture,
        description=description or f"{info.name or path.stem} (added from {path.name})",
        parameters=info.parameters,
        format="gguf",
        quantization=info.quantization,
        context_length=info.context_length,
        license=info.license,
        size_bytes=size,
        sha256=sha,
        capabilities=capabilities,
        n_layers=info.n_layers,
        n_kv_heads=info.n_kv_heads,
        head_dim=info.head_dim,
        vocab_size=info.vocab_size,
        source=Source(kind="path", path=str(path)),
        user=True,
    )
    spec = spec.model_copy(update={"ram_bytes": spec_ram_estimate(spec)})
    save_user_entry(spec, settings)
    _remember_verified(path, sha, settings)
    return spec


def remove(name: str, settings: Settings | None = None) -> list[Path]:
    """Delete a user entry and any file downloaded for it under ``$LLMLAB_HOME``.

    A user's own file added with :func:`add` is never deleted, only forgotten.
    Returns the files deleted.

    Raises:
        RegistryError: the entry is built in (it ships with llmlab).
    """
    settings = settings or get_settings()
    spec = find(name, settings)
    if spec.ref in builtin_refs():
        path = local_path(spec, settings)
        freed = (
            f" To free the disk space of its download, delete {path}."
            if spec.source.kind in ("url", "hf") and path.exists()
            else ""
        )
        raise RegistryError(
            f"{spec.ref} is a built-in entry and cannot be removed; only entries you added "
            f"(add, pull URL) can.{freed}"
        )
    deleted = []
    path = local_path(spec, settings)
    models_dir = settings.models_dir.resolve()
    for candidate in (path, path.with_name(path.name + ".partial")):
        if candidate.is_file() and candidate.resolve().is_relative_to(models_dir):
            candidate.unlink()
            deleted.append(candidate)
    kept = [
        e for e in _user_entries(settings) if f"{e['name']}:{e.get('tag', 'latest')}" != spec.ref
    ]
    _write_user_entries(kept, settings)
    return deleted
