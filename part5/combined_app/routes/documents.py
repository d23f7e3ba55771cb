"""Document QA over HTTP, on the same Chroma store as ``part3/document_qa.py``::

    POST   /api/collections/{name}/files        multipart field "files": upload and index
    GET    /api/collections                     collections with chunk and file counts
    GET    /api/collections/{name}/files        the files of one collection
    DELETE /api/collections/{name}/files/{file} drop a file's chunks (and its upload)
    DELETE /api/collections/{name}              drop a collection (and its uploads)
    POST   /api/collections/{name}/ask          {"question": ...} -> answer with sources

Uploads are saved under ``$LLMLAB_HOME/uploads/<collection>/``. File names are reduced
to a plain name (no folders, no ``..``, safe characters only), and the final path is
checked to be inside that folder, so an upload can never write anywhere else.
"""

from __future__ import annotations

import re
import shutil
import threading
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, File, Request, UploadFile
from fastapi.concurrency import run_in_threadpool

from llmlab.rag import (
    SUPPORTED_SUFFIXES,
    DocumentStore,
    EmptyCollectionError,
    QuestionAnswerer,
    RagError,
    UnknownCollectionError,
    list_collections,
    remove_collection,
)
from llmlab.rag.store import check_name
from part5.combined_app.errors import APIError, responses
from part5.combined_app.schemas import AskRequest, CollectionName, TextRoute

router = APIRouter(prefix="/api/collections", tags=["documents"], route_class=TextRoute)

_UNSAFE = re.compile(r"[^A-Za-z0-9._ ()-]")
# One writer at a time per server: Chroma's local store is not made for concurrent ingests.
_write_lock = threading.Lock()
# Chroma's client set-up is not thread-safe: two requests opening the store at once can
# fail ("Could not connect to tenant"), so opening is serialised too.
_open_lock = threading.Lock()


def safe_file_name(raw: str | None) -> str:
    """A plain file name for an upload, or a 400 when it names folders or nothing usable."""
    name = (raw or "").strip()
    if not name:
        raise APIError(400, "An uploaded file has no name.", param="files")
    if "/" in name or "\\" in name or "\0" in name:
        raise APIError(
            400,
            f"File name {name!r} contains a folder; upload plain file names only.",
            param="files",
            code="invalid_file_name",
        )
    # Leading dots go too: no hidden files, and "." or ".." reduce to nothing.
    cleaned = _UNSAFE.sub("_", name).strip(" .")
    if not cleaned:
        raise APIError(
            400,
            f"File name {name!r} is not allowed; use letters, digits, '.', '-', '_' and spaces.",
            param="files",
            code="invalid_file_name",
        )
    limit = 200
    if len(cleaned) <= limit:
        return cleaned
    # Shorten the stem, never the extension: the extension is the file's type.
    suffix = Path(cleaned).suffix if len(Path(cleaned).suffix) <= 10 else ""
    return cleaned[: limit - len(suffix)] + suffix


def _collection(name: str) -> str:
    try:
        return check_name(name)
    except RagError as exc:
        raise APIError(400, str(exc), param="collection", code="invalid_collection") from exc


def _folder(request: Request, collection: str) -> Path:
    return request.app.state.settings.uploads_dir / collection


def _inside(folder: Path, path: Path) -> bool:
    return path.resolve().parent == folder.resolve()


def _db_dir(request: Request) -> Path:
    # $LLMLAB_HOME/rag unless the server was given another home: part3/document_qa.py's store.
    return request.app.state.settings.lab_home / "rag"


def _open_store(request: Request, collection: str, create: bool = False) -> DocumentStore:
    try:
        with _open_lock:
            return DocumentStore(collection, db_dir=_db_dir(request), create=create)
    except UnknownCollectionError as exc:
        raise APIError(404, str(exc), param="collection", code="collection_not_found") from exc


def _file_entries(store: DocumentStore, folder: Path) -> list[dict[str, Any]]:
    entries = []
    for source, entry in sorted(store.sources().items()):
        path = Path(source)
        entries.append(
            {
                "name": path.name,
                "source": source,
                "chunks": len(entry["ids"]),
                "uploaded": _inside(folder, path),
            }
        )
    return entries


@router.get("")
async def collections(request: Request) -> dict[str, Any]:
    """Every collection in the store, as ``python part3/document_qa.py list`` shows them."""

    def read() -> list:
        with _open_lock:
            return list_collections(_db_dir(request))

    infos = await run_in_threadpool(read)
    return {"collections": [vars(info) for info in infos]}


@router.post("/{collection}/files", responses=responses(400))
async def upload(
    collection: CollectionName, request: Request, files: Annotated[list[UploadFile], File()]
):
    """Save the files into the collection's upload folder and index them (new or changed only)."""
    collection = _collection(collection)
    folder = _folder(request, collection)
    names = []
    for file in files:
        name = safe_file_name(file.filename)
        if Path(name).suffix.lower() not in SUPPORTED_SUFFIXES:
            raise APIError(
                400,
                f"{name}: unsupported file type. Upload one of: "
                f"{', '.join(sorted(SUPPORTED_SUFFIXES))}.",
                param="files",
                code="unsupported_file_type",
            )
        names.append(name)
    if len(set(names)) != len(names):
        raise APIError(400, "Two uploaded files have the same name.", param="files")

    def save_and_ingest() -> dict[str, Any]:
        with _write_lock:
            folder.mkdir(parents=True, exist_ok=True)
            saved = []
            for file, name in zip(files, names, strict=True):
                target = folder / name
                if not _inside(folder, target):  # belt and braces after safe_file_name
                    raise APIError(
                        400,
                        f"{name} would be saved outside the upload folder.",
                        param="files",
                        code="invalid_file_name",
                    )
                partial = folder / f".{name}.part"
                with partial.open("wb") as out:
                    shutil.copyfileobj(file.file, out)
                partial.replace(target)
                saved.append(target)
            store = _open_store(request, collection, create=True)
            report = store.ingest(saved)
            for outcome in report.failed:  # not indexed: do not keep it as if it were
                outcome.path.unlink(missing_ok=True)
            return {
                "collection": collection,
                "summary": report.summary(),
                **report.to_dict(),
                "files_in_collection": _file_entries(store, folder),
            }

    return await run_in_threadpool(save_and_ingest)


@router.get("/{collection}/files", responses=responses(400, 404))
async def list_files(collection: CollectionName, request: Request) -> dict[str, Any]:
    """The files indexed in a collection (uploaded here or ingested with document_qa.py)."""
    collection = _collection(collection)
    folder = _folder(request, collection)

    def read() -> dict[str, Any]:
        return {
            "collection": collection,
            "files": _file_entries(_open_store(request, collection), folder),
        }

    return await run_in_threadpool(read)


@router.delete("/{collection}/files/{file_name}", responses=responses(400, 404))
async def delete_file(
    collection: CollectionName, file_name: str, request: Request
) -> dict[str, Any]:
    """Remove one file's chunks from the collection, and the file itself if it was uploaded."""
    collection = _collection(collection)
    folder = _folder(request, collection)
    name = safe_file_name(file_name)

    def remove() -> dict[str, Any]:
        with _write_lock:
            store = _open_store(request, collection)
            matches = {s: e for s, e in store.sources().items() if Path(s).name == name}
            if not matches:
                raise APIError(
                    404,
                    f"{name!r} is not in collection {collection!r}. "
                    f"GET /api/collections/{collection}/files lists its files.",
                    param="file_name",
                    code="file_not_found",
                )
            if len(matches) > 1:
                uploaded = {s: e for s, e in matches.items() if _inside(folder, Path(s))}
                matches = uploaded or matches
            removed = 0
            for source, entry in matches.items():
                store.collection.delete(ids=entry["ids"])
                removed += len(entry["ids"])
                if _inside(folder, Path(source)):
                    Path(source).unlink(missing_ok=True)
            return {"collection": collection, "deleted": name, "chunks_removed": removed}

    return await run_in_threadpool(remove)


@router.delete("/{collection}", responses=responses(400, 404))
async def delete_collection(collection: CollectionName, request: Request) -> dict[str, Any]:
    """Drop a whole collection and its uploaded files."""
    collection = _collection(collection)
    folder = _folder(request, collection)

    def remove() -> dict[str, Any]:
        with _write_lock:
            try:
                with _open_lock:
                    chunks = remove_collection(collection, _db_dir(request))
            except UnknownCollectionError as exc:
                raise APIError(
                    404, str(exc), param="collection", code="collection_not_found"
                ) from exc
            shutil.rmtree(folder, ignore_errors=True)
            return {"collection": collection, "deleted": True, "chunks_removed": chunks}

    return await run_in_threadpool(remove)


@router.post("/{collection}/ask", responses=responses(400, 404, 500, 503))
async def ask(collection: CollectionName, body: AskRequest, request: Request) -> dict[str, Any]:
    """Answer from the collection's documents, with the sources used ([1] is sources[0])."""
    collection = _collection(collection)
    service = request.app.state.service
    service.require_ready()
    settings = request.app.state.settings
    max_tokens = body.max_tokens or settings.default_max_tokens
    if max_tokens > settings.max_tokens_limit:
        raise APIError(
            400,
            f"max_tokens is {max_tokens}, over this server's limit of {settings.max_tokens_limit}.",
            param="max_tokens",
        )

    def answer() -> dict[str, Any]:
        store = _open_store(request, collection)
        qa = QuestionAnswerer(
            store, model=service.chat_backend(), top_k=body.top_k, max_tokens=max_tokens
        )
        try:
            result = qa.ask(body.question)
        except EmptyCollectionError as exc:
            raise APIError(400, str(exc), param="collection", code="collection_empty") from exc
        except RagError as exc:
            raise APIError(400, str(exc), param="question") from exc
        sources = []
        for number, hit in enumerate(result.sources, start=1):
            sources.append({"n": number, "file": Path(hit.source).name, **hit.to_dict()})
        return {
            "question": body.question,
            "answer": result.text,
            "found": result.found,
            "cited": result.cited,
            "sources": sources,
        }

    return await run_in_threadpool(answer)
