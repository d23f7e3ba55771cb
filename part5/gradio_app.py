"""python part5/gradio_app.py [--model NAME | --server URL] [--port 7860]

A Gradio app on the lab's own code: a Chat tab (replies stream in; the stop button ends a
reply part-way) and a Documents tab (upload files, ask a question, read the answer and the
sources it cites). It runs in one of two modes:

- in process (the default, or ``--model NAME``): the app loads the model itself through
  ``llmlab.backends`` and answers from documents with ``llmlab.rag``, in the same store as
  ``part3/document_qa.py`` and the server (``$LLMLAB_HOME/rag``);
- against a running lab server (``--server http://127.0.0.1:8000``): chat goes through the
  server's ``/v1`` API (the ``openai`` client, inside ``llmlab.backends.remote``) and
  documents through its ``/api/collections`` routes, as the web page does.

Either way a chat reply is one :class:`~llmlab.chat.ChatSession` turn, so the context
budget (old turns dropped when the history is too long) is the command-line chat's.
``make gradio`` runs this with the defaults. Stop it with Ctrl-C.
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))  # run as a file: make `llmlab` importable from a checkout

import httpx  # noqa: E402

from llmlab import backends, registry  # noqa: E402
from llmlab.backends.base import Backend, BackendError  # noqa: E402
from llmlab.chat import ChatError, ChatSession  # noqa: E402
from llmlab.rag import (  # noqa: E402
    DEFAULT_COLLECTION,
    SUPPORTED_SUFFIXES,
    DocumentStore,
    EmptyCollectionError,
    QuestionAnswerer,
    RagError,
    UnknownCollectionError,
)
from llmlab.rag.store import check_name  # noqa: E402
from llmlab.settings import get_settings  # noqa: E402

EPILOG = """examples:
  python part5/gradio_app.py                                  # http://127.0.0.1:7860/
  python part5/gradio_app.py --model qwen2.5-0.5b-instruct --port 7861
  python part5/gradio_app.py --server http://127.0.0.1:8000   # against `make serve`
  python part5/gradio_app.py --server http://127.0.0.1:8000 --api-key s3cret

In process, the model loads on the first request; LLMLAB_THREADS sets its CPU threads.
"""

SYSTEM_PROMPT = "You are a helpful, concise assistant."
DOCUMENT_TYPES = sorted(SUPPORTED_SUFFIXES)
SOURCE_COLUMNS = ["n", "file", "location", "score", "text"]


class LabError(Exception):
    """Something the user can fix (the message says what); the UI shows it, never a traceback.

    ``code`` is the server's error code (``collection_not_found`` ...) when it sent one.
    """

    def __init__(self, message: str, code: str | None = None) -> None:
        super().__init__(message)
        self.code = code


def supported_types_hint() -> str:
    """The file types the document loader reads, for messages."""
    return "Upload one of: " + ", ".join(DOCUMENT_TYPES) + "."


def check_upload_names(paths: list[str]) -> list[Path]:
    """The uploaded files as paths, or LabError naming the first one the loader cannot read."""
    if not paths:
        raise LabError(
            "No files chosen. Pick one or more documents to add. " + supported_types_hint()
        )
    files = [Path(p) for p in paths]
    for file in files:
        if file.suffix.lower() not in SUPPORTED_SUFFIXES:
            raise LabError(f"{file.name}: this file type cannot be read. {supported_types_hint()}")
    return files


def no_documents(collection: str) -> LabError:
    """The message for asking before any document was added."""
    return LabError(
        f"There are no documents in collection {collection!r} yet. Upload files and press "
        "'Add documents' first."
    )


class InProcessLab:
    """The model and the document store in this process (``--model``)."""

    def __init__(self, model: str | None = None) -> None:
        self.settings = get_settings()
        self.db_dir = self.settings.home / "rag"  # the store of part3/document_qa.py and the server
        self.spec = registry.resolve(model, self.settings)
        self.backend: Backend = backends.load(self.spec)
        self.description = f"{self.spec.ref}, in this process"
        # Chroma's local store is not made for concurrent opens and ingests (the server
        # serialises them too); answering, the long part, runs outside the lock.
        self._store_lock = threading.Lock()

    def chat_backend(self) -> Backend:
        """The chat model (loaded on its first request)."""
        return self.backend

    def add_files(self, collection: str, paths: list[str]) -> dict[str, Any]:
        """Copy uploads to ``$LLMLAB_HOME/uploads/<collection>/`` and index them there.

        The server keeps its uploads in the same folder, so a file is indexed once whichever
        of the two received it; Gradio's own copies are temporary.
        """
        folder = self.settings.home / "uploads" / collection
        with self._store_lock:
            folder.mkdir(parents=True, exist_ok=True)
            saved = []
            for path in paths:
                target = folder / Path(path).name  # Gradio has made the name a plain one
                shutil.copyfile(path, target)
                saved.append(target)
            report = DocumentStore(collection, self.db_dir, create=True).ingest(saved)
            for outcome in report.failed:  # not indexed: do not keep it as if it were
                outcome.path.unlink(missing_ok=True)
        return {"summary": report.summary(), **report.to_dict()}

    def ask(self, collection: str, question: str) -> dict[str, Any]:
        """Answer from the collection; the same shape as the server's ``/ask`` response."""
        try:
            with self._store_lock:
                store = DocumentStore(collection, self.db_dir)
            answer = QuestionAnswerer(store, model=self.backend).ask(question)
        except (UnknownCollectionError, EmptyCollectionError):
            raise no_documents(collection) from None
        sources = [
            {"n": n, "file": Path(hit.source).name, **hit.to_dict()}
            for n, hit in enumerate(answer.sources, start=1)
        ]
        return {"answer": answer.text, "found": answer.found, "sources": sources}

    def close(self) -> None:
        """Free the model's memory."""
        self.backend.close()


class ServerLab:
    """A running lab server (``--server URL``): its /v1 API and its document routes."""

    def __init__(self, url: str, api_key: str | None = None, timeout: float = 600.0) -> None:
        self.url = url.rstrip("/")
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.http = httpx.Client(base_url=self.url, headers=headers, timeout=timeout)
        self.backend: Backend = backends.load(
            None, backend="openai", base_url=f"{self.url}/v1", api_key=api_key, timeout=timeout
        )
        self.description = f"the lab server at {self.url}"

    def chat_backend(self) -> Backend:
        """The server's chat model, through the openai client."""
        return self.backend

    def add_files(self, collection: str, paths: list[str]) -> dict[str, Any]:
        """Upload the files to the server, which saves and indexes them."""
        with contextlib.ExitStack() as stack:
            files = [("files", (Path(p).name, stack.enter_context(open(p, "rb")))) for p in paths]
            return self._call("POST", f"/api/collections/{collection}/files", files=files)

    def ask(self, collection: str, question: str) -> dict[str, Any]:
        """The server's answer and sources."""
        try:
            return self._call(
                "POST", f"/api/collections/{collection}/ask", json={"question": question}
            )
        except LabError as exc:
            if exc.code in ("collection_not_found", "collection_empty"):
                raise no_documents(collection) from None
            raise

    def _call(self, method: str, path: str, **kwargs: Any) -> dict[str, Any]:
        try:
            response = self.http.request(method, path, **kwargs)
        except httpx.TransportError as exc:
            raise LabError(
                f"Cannot reach the lab server at {self.url} ({type(exc).__name__}). Start it "
                "(make serve, or python part5/combined_app/scripts/server.py), or fix --server."
            ) from None
        if response.is_success:
            return response.json()
        try:
            detail = response.json()["error"]
        except (ValueError, KeyError, TypeError):
            detail = {"message": response.text[:300] or response.reason_phrase}
        raise LabError(
            f"The server answered {response.status_code}: {detail.get('message')}",
            code=detail.get("code"),
        )

    def close(self) -> None:
        """Close the connections to the server."""
        self.http.close()
        self.backend.close()


# ----- what the UI's events call ---------------------------------------------------


def history_messages(history: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Gradio's chat history as ChatSession messages (text turns only)."""
    messages = []
    for turn in history:
        content = turn.get("content")
        if isinstance(content, list):  # Gradio may hand back [{"type": "text", "text": ...}]
            content = "".join(part.get("text", "") for part in content if isinstance(part, dict))
        if turn.get("role") in ("user", "assistant") and isinstance(content, str):
            messages.append({"role": turn["role"], "content": content, "tokens": 0})
    return messages


def chat_reply(
    lab: InProcessLab | ServerLab,
    message: str,
    history: list[dict[str, Any]],
    system: str = SYSTEM_PROMPT,
    max_tokens: int = 256,
    temperature: float = 0.7,
) -> Iterator[str]:
    """Stream the reply to ``message`` after ``history``: yields the text so far.

    Closing the iterator (the stop button) closes the model's stream, which frees the
    engine at once.

    Raises:
        LabError: an empty message, a history too long for the model, or the model or
            server failing (the message says what to do).
    """
    if not (message or "").strip():
        raise LabError("The message is empty: type something to ask.")
    try:
        session = ChatSession(
            lab.chat_backend(),
            system=system,
            params={"max_tokens": int(max_tokens), "temperature": float(temperature)},
        )
        session.messages = history_messages(history)
        for turn in session.messages:
            turn["tokens"] = session.count_tokens(turn["content"])
        text = ""
        for chunk in session.stream(message):
            text += chunk.text
            yield text
    except (ChatError, BackendError, registry.RegistryError) as exc:
        raise LabError(str(exc)) from None


def add_documents(lab: InProcessLab | ServerLab, collection: str, paths: list[str] | None) -> str:
    """Index the uploaded files; returns a Markdown report (a line per file).

    Raises:
        LabError: no files, a file type the loader does not take, a bad collection name,
            or the server failing.
    """
    collection = check_collection(collection)
    files = check_upload_names(list(paths or []))
    try:
        result = lab.add_files(collection, [str(f) for f in files])
    except RagError as exc:
        raise LabError(str(exc)) from None
    lines = [f"**{collection}**: {result['summary']}"]
    for entry in result["files"]:
        line = f"- {Path(entry['path']).name}: {entry['status']}, {entry['chunks']} chunks"
        lines.append(f"{line}. {entry['error']}" if entry.get("error") else line)
    return "\n".join(lines)


def ask_documents(
    lab: InProcessLab | ServerLab, collection: str, question: str
) -> tuple[str, list[list[Any]]]:
    """The answer (Markdown) and its sources (table rows: n, file, location, score, text).

    Raises:
        LabError: an empty question, no documents yet, or the model or server failing.
    """
    collection = check_collection(collection)
    if not (question or "").strip():
        raise LabError("The question is empty. Type a question about your documents.")
    try:
        result = lab.ask(collection, question.strip())
    except (RagError, BackendError, registry.RegistryError) as exc:
        raise LabError(str(exc)) from None
    rows = [[s["n"], s["file"], s["location"], s["score"], s["text"]] for s in result["sources"]]
    return result["answer"], rows


def check_collection(name: str) -> str:
    """The collection name, stripped, or LabError saying which names are allowed."""
    try:
        return check_name((name or "").strip() or DEFAULT_COLLECTION)
    except RagError as exc:
        raise LabError(str(exc)) from None


# ----- the Gradio UI -------------------------------------------------------------


def shown(handler):
    """Wrap an event handler so a LabError reaches the user as a Gradio error message."""
    import functools
    import inspect

    import gradio as gr

    if inspect.isgeneratorfunction(handler):

        @functools.wraps(handler)
        def stream(*args, **kwargs):
            try:
                yield from handler(*args, **kwargs)
            except LabError as exc:
                raise gr.Error(str(exc), print_exception=False) from None

        return stream

    @functools.wraps(handler)
    def call(*args, **kwargs):
        try:
            return handler(*args, **kwargs)
        except LabError as exc:
            raise gr.Error(str(exc), print_exception=False) from None

    return call


def build_app(lab: InProcessLab | ServerLab, concurrency: int = 1):
    """The Gradio Blocks: a Chat tab and a Documents tab, calling ``lab``.

    ``concurrency``: requests of each kind that may run at once. In process the model
    answers one request at a time anyway (the backend waits for the one before), while a
    server decodes several together.
    """
    import gradio as gr

    queue = {"concurrency_limit": concurrency}

    @shown
    def chat(message, history, system, max_tokens, temperature):
        yield from chat_reply(lab, message, history, system, max_tokens, temperature)

    @shown
    def add(collection, paths):
        return add_documents(lab, collection, paths)

    @shown
    def ask(collection, question):
        return ask_documents(lab, collection, question)

    # analytics off: the lab works offline and sends nothing anywhere
    with gr.Blocks(title="Local LLM Lab", analytics_enabled=False) as app:
        gr.Markdown(f"# Local LLM Lab\nModel: {lab.description}.")
        with gr.Tab("Chat"):
            gr.ChatInterface(
                chat,
                additional_inputs=[
                    gr.Textbox(SYSTEM_PROMPT, label="System prompt"),
                    gr.Slider(1, 1024, value=256, step=1, label="Max tokens"),
                    gr.Slider(0, 2, value=0.7, step=0.05, label="Temperature"),
                ],
                additional_inputs_accordion=gr.Accordion("Settings", open=False),
                api_name="chat",
                analytics_enabled=False,
                **queue,
            )
        with gr.Tab("Documents"):
            collection = gr.Textbox(DEFAULT_COLLECTION, label="Collection")
            # No file_types filter: Gradio would refuse other types with its own message;
            # check_upload_names() says which file it is and what the loader reads.
            files = gr.File(
                file_count="multiple",
                type="filepath",
                label=f"Files ({', '.join(DOCUMENT_TYPES)})",
            )
            add_button = gr.Button("Add documents")
            report = gr.Markdown()
            question = gr.Textbox(label="Question", placeholder="Ask about your documents")
            ask_button = gr.Button("Ask", variant="primary")
            answer = gr.Markdown(label="Answer")
            sources = gr.Dataframe(headers=SOURCE_COLUMNS, label="Sources", wrap=True)
            add_button.click(add, [collection, files], report, api_name="add_documents", **queue)
            for trigger in (ask_button.click, question.submit):
                trigger(ask, [collection, question], [answer, sources], api_name="ask", **queue)
    return app


def build_parser() -> argparse.ArgumentParser:
    """The command line."""
    parser = argparse.ArgumentParser(
        description="A Gradio app for the lab: chat with streaming, and questions on documents.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--model", help="chat model to load in this process (default: the lab's)")
    mode.add_argument("--server", metavar="URL", help="use a running lab server instead")
    parser.add_argument("--api-key", help="the server's API key, if it was started with one")
    parser.add_argument("--host", default="127.0.0.1", help="interface (default: 127.0.0.1)")
    parser.add_argument("--port", type=int, default=7860, help="TCP port (default: 7860)")
    return parser


def make_lab(args: argparse.Namespace) -> InProcessLab | ServerLab:
    """The lab the options name (a server, or a model in this process)."""
    if args.server:
        return ServerLab(args.server, api_key=args.api_key)
    return InProcessLab(args.model)


def launch(lab: InProcessLab | ServerLab, host: str, port: int, **options: Any):
    """Build and start the app without blocking; returns the Blocks (``.close()`` stops it)."""
    app = build_app(lab, concurrency=4 if isinstance(lab, ServerLab) else 1)
    app.queue().launch(
        server_name=host, server_port=port, prevent_thread_lock=True, quiet=True, **options
    )
    return app


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        lab = make_lab(args)
    except (registry.RegistryError, ValueError) as exc:
        print(exc, file=sys.stderr)
        return 2
    if isinstance(lab, ServerLab):
        try:
            lab.http.get("/health", timeout=5)
        except httpx.TransportError:
            print(
                f"Note: no lab server answers at {lab.url} yet; start it (make serve) before asking.",
                file=sys.stderr,
            )
    try:
        app = launch(lab, args.host, args.port)
    except OSError as exc:
        print(
            f"Cannot listen on {args.host}:{args.port}: {exc}. Pick another --port.",
            file=sys.stderr,
        )
        lab.close()
        return 2
    print(f"Gradio app on {app.local_url} ({lab.description}). Stop it with Ctrl-C.")
    try:
        app.block_thread()
    except KeyboardInterrupt:
        pass
    finally:
        app.close()
        lab.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
