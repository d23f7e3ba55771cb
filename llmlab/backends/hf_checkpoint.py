"""The plain safetensors checkpoint the transformers backend keeps for each GGUF file.

Reading a GGUF file with transformers dequantizes and converts every tensor, which takes
about 35 s of CPU for the 135M default model on a 2-core laptop. The first load therefore
saves the converted model once, and later loads read that checkpoint (a few seconds)::

    from llmlab.backends import hf_checkpoint
    folder = hf_checkpoint.checkpoint_dir(spec, settings)
    if not hf_checkpoint.is_current(folder, spec.path, spec.sha256):
        hf_checkpoint.write(folder, spec.path, spec.sha256, save=lambda tmp: ...)

Where: ``$LLMLAB_HOME/models/<name>/<tag>/hf-checkpoint``, or
``$LLMLAB_HF_CACHE_DIR/<name>/<tag>/hf-checkpoint`` when that environment variable is set
(one cache shared by several lab homes, as the test suite does for its per-test homes)::

    LLMLAB_HF_CACHE_DIR=/tmp/llmlab-hf python part3/simple_chat.py --backend transformers

The folder holds the weights, config, generation config, the tokenizer files (chat template
included) and ``llmlab-source.json``: which GGUF it came from (path, size, mtime, sha256)
and every file written with its size. It is written in a temporary sibling folder, marker
last, then renamed into place, so a folder without a readable marker, or with a file missing
or of the wrong size, is partial or damaged and gets rebuilt; so does one whose GGUF now has
a different size or sha256.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from llmlab.registry import ModelSpec, sha256_file
from llmlab.settings import Settings

CACHE_ENV = "LLMLAB_HF_CACHE_DIR"
MARKER = "llmlab-source.json"
FORMAT = 1  # bump when the folder layout changes, so older folders are rebuilt


def cache_root(settings: Settings) -> Path:
    """The folder that holds the checkpoints: ``$LLMLAB_HF_CACHE_DIR`` or the models folder."""
    shared = os.environ.get(CACHE_ENV, "").strip()
    return Path(shared).expanduser() if shared else settings.models_dir


def checkpoint_dir(spec: ModelSpec, settings: Settings) -> Path:
    """The checkpoint folder for one catalog entry (``<root>/<name>/<tag>/hf-checkpoint``)."""
    return cache_root(settings) / spec.name / spec.tag / "hf-checkpoint"


def read_marker(folder: Path) -> dict[str, Any] | None:
    """The marker of a complete checkpoint, or None if missing, unreadable or of another format."""
    try:
        marker = json.loads((folder / MARKER).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(marker, dict) or marker.get("format") != FORMAT:
        return None
    return marker


def is_current(folder: Path, source: Path, sha256: str | None = None) -> bool:
    """True if ``folder`` is a complete checkpoint converted from ``source`` as it is now.

    ``sha256`` is the catalog's checksum of ``source`` (the registry has verified the file
    against it); without one, an unchanged size and mtime count as the same file, and
    otherwise the file is hashed.
    """
    marker = read_marker(folder)
    if marker is None:
        return False
    files = marker.get("files")
    if not isinstance(files, dict) or not files:
        return False
    for name, size in files.items():
        try:
            if (folder / name).stat().st_size != size:
                return False
        except OSError:
            return False
    stat = source.stat()
    if marker.get("size") != stat.st_size:
        return False
    if sha256:
        return marker.get("sha256") == sha256
    if marker.get("mtime_ns") == stat.st_mtime_ns:
        return True
    return marker.get("sha256") == sha256_file(source)


def write(
    folder: Path, source: Path, sha256: str | None, save: Callable[[Path], None], **extra: Any
) -> None:
    """Build a checkpoint with ``save(tmp_folder)`` and move it into ``folder`` atomically.

    ``extra`` goes into the marker as information (dtype, library version).
    """
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f"{folder.name}.partial-", dir=folder.parent))
    try:
        save(tmp)
        files = {
            p.relative_to(tmp).as_posix(): p.stat().st_size for p in tmp.rglob("*") if p.is_file()
        }
        stat = source.stat()
        marker = {
            "format": FORMAT,
            "source": str(source),
            "size": stat.st_size,
            "mtime_ns": stat.st_mtime_ns,
            "sha256": sha256 or sha256_file(source),
            "files": files,
            **extra,
        }
        (tmp / MARKER).write_text(json.dumps(marker, indent=1))
        _swap_in(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _swap_in(tmp: Path, folder: Path) -> None:
    # Renames are atomic on one file system: readers see the old folder, no folder, or the
    # new one, never a half-written one.
    old = None
    if folder.exists():
        old = folder.with_name(f"{folder.name}.old-{uuid.uuid4().hex[:8]}")
        try:
            folder.rename(old)
        except FileNotFoundError:  # another process moved it away first
            old = None
    try:
        tmp.rename(folder)
    except OSError:
        if not folder.is_dir():
            raise
        # Another process put its own fresh checkpoint there in the meantime; keep that one.
    finally:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
