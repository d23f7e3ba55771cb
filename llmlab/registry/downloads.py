"""Getting files from the internet: Hugging Face URLs, downloads with resume, :func:`pull`."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path

from llmlab.registry.catalogs import find, save_user_entry
from llmlab.registry.files import _remember_verified, local_path, resolve, sha256_file
from llmlab.registry.memory import spec_ram_estimate
from llmlab.registry.spec import ChecksumError, DownloadError, ModelSpec
from llmlab.settings import Settings, get_settings


def _note(message: str) -> None:
    print(message, file=sys.stderr)


def _truthy(value: str | None) -> bool:
    return (value or "").strip().lower() in {"1", "true", "yes", "on"}


def hf_download_url(spec: ModelSpec, settings: Settings) -> tuple[str, dict[str, str]]:
    """The resolve URL and request headers (token, user agent) of a Hugging Face entry.

    ``HF_ENDPOINT`` (a mirror) and ``LLMLAB_HF_TOKEN`` / ``HF_TOKEN`` are honoured; without
    them, the token stored by ``bash part3/scripts/huggingface_login.sh`` is sent.
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
                "accepting its licence. Store a token with access: bash "
                "part3/scripts/huggingface_login.sh (or set LLMLAB_HF_TOKEN or HF_TOKEN)."
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
