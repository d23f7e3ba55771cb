"""python part3/document_qa.py ingest part3/data/docs  -- then: ask "Who founded the makerspace?"

Ask questions about your own files, offline, and see which passages each answer came from.

    ingest PATH...        read .txt .md .html .pdf .py files into a collection (re-runs only
                          embed what changed; --prune drops files deleted from disk)
    ask "QUESTION"        answer from the documents with citations [1], [2] ...
                          (no question: interactive, one question per line)
    search "QUERY"        the best-matching passages with scores, no language model
                          (--retrieval hybrid, the default, fuses keywords and embeddings)
    list                  collections, with chunk and file counts
    remove --collection   delete a collection

Collections live in $LLMLAB_HOME/rag unless --db names another folder.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time
from collections.abc import Iterator
from pathlib import Path

from rich.console import Console
from rich.markup import escape

from llmlab import registry
from llmlab.backends.base import BackendError, ContextOverflowError
from llmlab.rag import (
    DEFAULT_CHUNK_OVERLAP,
    DEFAULT_CHUNK_SIZE,
    DEFAULT_COLLECTION,
    DEFAULT_THRESHOLD,
    DEFAULT_TOP_K,
    DocumentStore,
    EmptyCollectionError,
    QuestionAnswerer,
    RagError,
    find_files,
    get_embedder,
    list_collections,
    make_splitter,
    remove_collection,
)
from llmlab.rag.store import (
    RETRIEVAL_MODES,
    FileOutcome,
    Hit,
    IngestInterrupted,
    default_db_dir,
    display_path,
)

# Hybrid measured better than dense on the held-out questions (recall@3; recall@1 equal):
# see notebook 05 and part3/README.md.
DEFAULT_RETRIEVAL = "hybrid"

EPILOG = """examples:
  python part3/document_qa.py ingest part3/data/docs
  python part3/document_qa.py ingest ~/notes --collection notes --chunk-size 600 --prune
  python part3/document_qa.py ask "How much does a day pass cost?"
  python part3/document_qa.py ask "Who is the chair?" --top-k 2 --json
  python part3/document_qa.py ask                      # interactive; empty line to quit
  python part3/document_qa.py search "laser cutter safety" --top-k 3
  python part3/document_qa.py search "MAX_BOOKING_HOURS" --retrieval bm25
  python part3/document_qa.py search --json < queries.txt   # one process, one JSON line a query
  python part3/document_qa.py list
  python part3/document_qa.py remove --collection notes

exit codes: 0 done, 1 some files unreadable / empty collection / model error,
            2 bad arguments, missing path, unknown collection or model, 130 Ctrl-C
"""


def build_parser() -> argparse.ArgumentParser:
    """The command line: one sub-command per action, shared --db and --collection."""
    parser = argparse.ArgumentParser(
        prog="document_qa.py",
        description="Answer questions from your own documents, offline, with sources.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--db", type=Path, default=None, help="store folder (default: $LLMLAB_HOME/rag)"
    )
    named = argparse.ArgumentParser(add_help=False)
    named.add_argument(
        "--collection",
        default=DEFAULT_COLLECTION,
        help=f"collection name (default: {DEFAULT_COLLECTION})",
    )
    as_json = argparse.ArgumentParser(add_help=False)
    as_json.add_argument(
        "--json", action="store_true", help="print one JSON object instead of text"
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    ingest = sub.add_parser(
        "ingest", parents=[common, named], help="add or update files in a collection"
    )
    ingest.add_argument(
        "paths", nargs="+", metavar="PATH", help="files or folders (searched recursively)"
    )
    ingest.add_argument(
        "--chunk-size",
        type=int,
        default=DEFAULT_CHUNK_SIZE,
        help=f"characters per chunk (default: {DEFAULT_CHUNK_SIZE})",
    )
    ingest.add_argument(
        "--chunk-overlap",
        type=int,
        default=DEFAULT_CHUNK_OVERLAP,
        help=f"characters shared by neighbouring chunks (default: {DEFAULT_CHUNK_OVERLAP})",
    )
    ingest.add_argument(
        "--prune", action="store_true", help="remove files that were deleted from the given folders"
    )
    ingest.add_argument(
        "--embedding-model",
        default=None,
        help="registry name of the embedding model (default: $LLMLAB_EMBEDDING_MODEL or all-minilm-l6-v2)",
    )

    retrieval = argparse.ArgumentParser(add_help=False)
    retrieval.add_argument(
        "--top-k",
        type=int,
        default=DEFAULT_TOP_K,
        help=f"passages to retrieve (default: {DEFAULT_TOP_K})",
    )
    retrieval.add_argument(
        "--retrieval",
        choices=RETRIEVAL_MODES,
        default=DEFAULT_RETRIEVAL,
        help="dense (embeddings), bm25 (keywords) or hybrid (both, rank fusion; "
        f"default: {DEFAULT_RETRIEVAL})",
    )

    ask = sub.add_parser(
        "ask", parents=[common, named, retrieval, as_json], help="answer a question with sources"
    )
    ask.add_argument("question", nargs="?", help="the question (leave out for interactive mode)")
    ask.add_argument(
        "--model", default=None, help="chat model name (default: the lab's default model)"
    )
    ask.add_argument(
        "--threshold",
        type=float,
        default=DEFAULT_THRESHOLD,
        help=f"minimum similarity of a relevant passage (default: {DEFAULT_THRESHOLD})",
    )
    ask.add_argument(
        "--max-tokens", type=int, default=120, help="longest answer in tokens (default: 120)"
    )

    search = sub.add_parser(
        "search",
        parents=[common, named, retrieval, as_json],
        help="retrieve passages only, no model",
    )
    search.add_argument(
        "query", nargs="?", help="what to look for (none: one query a line, empty line to quit)"
    )

    sub.add_parser("list", parents=[common, as_json], help="list collections")
    remove = sub.add_parser("remove", parents=[common], help="delete a collection")
    remove.add_argument("--collection", required=True, help="the collection to delete")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one command; returns the exit code."""
    args = build_parser().parse_args(argv)
    console = Console(highlight=False, soft_wrap=True)
    errors = Console(stderr=True, highlight=False, soft_wrap=True)
    try:
        if args.command == "ingest":
            return cmd_ingest(args, console)
        if args.command == "ask":
            return cmd_ask(args, console)
        if args.command == "search":
            return cmd_search(args, console)
        if args.command == "list":
            return cmd_list(args, console)
        return cmd_remove(args, console)
    except EmptyCollectionError as exc:
        errors.print(f"error: {escape(str(exc))}")
        return 1
    except (RagError, registry.RegistryError, ValueError) as exc:
        errors.print(f"error: {escape(str(exc))}")
        return 2
    except ContextOverflowError as exc:
        errors.print(
            f"error: The question is too long: with the passages it needs {exc.prompt_tokens} "
            f"tokens, and the model's context holds {exc.context_length} (answer included). "
            "Ask a shorter question, or set a larger context with LLMLAB_N_CTX."
        )
        return 2
    except BackendError as exc:
        errors.print(f"error: {escape(str(exc))}")
        return 1
    except KeyboardInterrupt:
        errors.print("Interrupted (Ctrl-C).")
        return 130


def cmd_ingest(args: argparse.Namespace, console: Console) -> int:
    """Ingest files with a progress bar (plain lines when piped) and print the summary."""
    # Imported here: a one-shot search waits for every import at the top of this file.
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    # Check everything before the store is touched, so a typo changes nothing.
    make_splitter(".txt", args.chunk_size, args.chunk_overlap)
    files = find_files(args.paths)
    embedder = get_embedder(args.embedding_model) if args.embedding_model else None
    store = DocumentStore(args.collection, args.db, embedder=embedder, create=True)
    with Progress(
        TextColumn("[bold]ingest[/]"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.description}"),
        TimeElapsedColumn(),
        console=console,
        disable=not console.is_terminal,
        transient=True,
    ) as progress:
        task = progress.add_task("", total=len(files))

        def report_file(outcome: FileOutcome) -> None:
            if outcome.status != "removed":
                progress.advance(task)
            progress.update(task, description=escape(display_path(outcome.path)))
            if not console.is_terminal:
                console.print(
                    f"{outcome.status:9} {display_path(outcome.path)} ({outcome.chunks} chunks)"
                )

        try:
            report = store.ingest(
                args.paths,
                args.chunk_size,
                args.chunk_overlap,
                prune=args.prune,
                progress=report_file,
            )
        except IngestInterrupted as stop:
            report, interrupted = stop.report, True
        else:
            interrupted = False
    for failed in report.failed:
        console.print(
            f"[yellow]skipped (unreadable):[/] {escape(failed.error or str(failed.path))}"
        )
    console.print(
        f"Collection [bold]{escape(store.name)}[/] in {escape(display_path(store.db_dir))}: {report.summary()}"
    )
    if interrupted:
        console.print(
            f"Interrupted after {len(report.files)} of {len(files)} files: those done are kept, "
            "each one whole. Run the same command again to ingest the rest (files already "
            "stored are skipped)."
        )
        return 130
    if report.failed:
        console.print(f"{len(report.failed)} file(s) could not be read; the others were ingested.")
        return 1
    return 0


def _start_loading_embedder() -> None:
    """Load the default embedding model while the store opens (collections are usually
    built with it); if it is not installed, opening the store says what to do."""
    with contextlib.suppress(registry.RegistryError):
        get_embedder().start_loading()


def cmd_ask(args: argparse.Namespace, console: Console) -> int:
    """Answer one question, or read questions until an empty line in interactive mode."""
    _start_loading_embedder()
    store = DocumentStore(args.collection, args.db, retrieval=args.retrieval)
    store.require_chunks()
    qa = QuestionAnswerer(
        store, args.model, top_k=args.top_k, threshold=args.threshold, max_tokens=args.max_tokens
    )
    try:
        if args.question is not None:
            return _answer(qa, args.question, args, console)
        console.print(
            f"Ask about the {store.count()} chunks in collection {escape(store.name)!r}. Empty line to quit."
        )
        for question in _read_lines("question> ", console):
            _answer(qa, question, args, console)
        return 0
    finally:
        qa.close()


def _read_lines(prompt: str, console: Console) -> Iterator[str]:
    """Lines typed (or piped) one by one, until an empty line, ``quit`` or end of input."""
    while True:
        try:
            line = input(prompt).strip()
        except (EOFError, KeyboardInterrupt):
            console.print()
            return
        if line.lower() in ("", "exit", "quit"):
            return
        yield line


def _answer(qa: QuestionAnswerer, question: str, args: argparse.Namespace, console: Console) -> int:
    if not question.strip():
        raise RagError("The question is empty. Type a question about your documents.")
    if args.json:
        print(json.dumps(qa.ask(question).to_dict(), ensure_ascii=False))
        return 0
    started = time.perf_counter()
    stream = console.is_terminal
    answer = qa.ask(
        question, on_text=(lambda t: console.print(escape(t), end="")) if stream else None
    )
    if stream:
        console.print()
    else:
        console.print(escape(answer.text))
    if not answer.found:
        console.print(
            f"(the best passage scored {answer.best_score:.2f}, below the threshold {qa.threshold:.2f})"
        )
        return 0
    console.print("Sources:")
    _print_hits(answer.sources, console, full=False)
    if console.is_terminal:
        console.print(f"[dim]{time.perf_counter() - started:.1f} s[/]")
    return 0


def cmd_search(args: argparse.Namespace, console: Console) -> int:
    """Print the best passages with scores (retrieval only) for one query, or for each line
    read in interactive mode (start-up is paid once, each further query takes milliseconds)."""
    _start_loading_embedder()
    store = DocumentStore(args.collection, args.db, retrieval=args.retrieval)
    if args.query is not None:
        _search(store, args.query, args, console)
        return 0
    if not args.json:
        console.print(
            f"Search the {store.count()} chunks in collection {escape(store.name)!r}. Empty line to quit."
        )
    for query in _read_lines("" if args.json else "search> ", console):
        _search(store, query, args, console)
    return 0


def _search(store: DocumentStore, query: str, args: argparse.Namespace, console: Console) -> None:
    hits = store.search(query, args.top_k)
    if args.json:
        sources = [h.to_dict() for h in hits]
        print(json.dumps({"query": query, "sources": sources}, ensure_ascii=False), flush=True)
        return
    _print_hits(hits, console, full=True)


def _print_hits(hits: list[Hit], console: Console, full: bool) -> None:
    for n, hit in enumerate(hits, start=1):
        console.print(
            f"{escape(f'[{n}]')} {escape(display_path(hit.source))}, {hit.location} (score {hit.score:.2f})"
        )
        if full:
            console.print(escape(hit.text.strip()), style="dim")
            console.print()


def cmd_list(args: argparse.Namespace, console: Console) -> int:
    """Print each collection with its chunk and file counts."""
    infos = list_collections(args.db)
    if args.json:
        print(json.dumps([info.__dict__ for info in infos]))
        return 0
    where = display_path(args.db or default_db_dir())
    if not infos:
        console.print(
            f"No collections in {escape(where)} yet. Create one with: "
            "python part3/document_qa.py ingest PATH"
        )
        return 0
    console.print(f"Collections in {escape(where)}:")
    for info in infos:
        console.print(
            f"  {escape(info.name):20} {info.chunks:6} chunks {info.files:5} files   {info.embedding_model or ''}"
        )
    return 0


def cmd_remove(args: argparse.Namespace, console: Console) -> int:
    """Delete one collection."""
    count = remove_collection(args.collection, args.db)
    console.print(f"Removed collection {escape(args.collection)!r} ({count} chunks).")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
