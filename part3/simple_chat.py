"""python part3/simple_chat.py [--model NAME] [--prompt TEXT] [--history FILE] ...

A streaming chat with a quantized model on your own machine. Interactive by default
with the lab's default model (SmolLM2-135M-Instruct, Q4_1, through llama.cpp); type
``/help`` for the commands. Ctrl-C stops a reply and keeps the chat; Ctrl-C or Ctrl-D
at the prompt exits (saving the history when ``--history`` is given).

The conversation itself (history, context budget, figures, transcripts) is
:class:`llmlab.chat.ChatSession`; this file is the terminal around it.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from llmlab import backends, registry
from llmlab.backends.base import Backend, BackendError, GenerationParams, Result
from llmlab.chat import ChatError, ChatSession, parse_param
from llmlab.settings import get_settings
from llmlab.structured import StructuredOutputError

DOCS = Path(__file__).resolve().parent / "data" / "docs"  # what --tools searches

EXAMPLES = """\
examples:
  python part3/simple_chat.py                                   chat with the default model
  python part3/simple_chat.py --system "Answer in one sentence." --temperature 0.2
  python part3/simple_chat.py --history ~/chat.json             resume a chat and keep saving it
  python part3/simple_chat.py --prompt "What is a GGUF file?"   one question, one answer
  echo "Name a colour." | python part3/simple_chat.py --prompt - --json
  python part3/simple_chat.py --backend transformers            the same GGUF through PyTorch
  python part3/simple_chat.py --tools --prompt "What is 17 * 23?"   the model may call tools
  python part3/simple_chat.py --backend openai --base-url http://localhost:8000/v1 --model smollm2-135m-instruct

commands inside the chat:
  /help  /reset  /system TEXT  /save FILE  /load FILE  /model NAME
  /params [name=value ...]  /stats  /exit
"""

HELP = [
    ("/help", "this list"),
    ("/reset", "forget the conversation (system prompt and parameters stay)"),
    ("/system TEXT", "set the system prompt (no TEXT: show it; /system - removes it)"),
    ("/save FILE", "write the transcript as JSON"),
    ("/load FILE", "continue a saved transcript"),
    ("/model NAME", "switch model, keeping the conversation"),
    (
        "/params [k=v ...]",
        "show sampling parameters, or set some: /params temperature=0.2 top_p=0.9",
    ),
    ("/stats", "history size, context use and the last reply's speed"),
    ("/exit", "leave (Ctrl-D or Ctrl-C at the prompt do the same)"),
]


def build_parser() -> argparse.ArgumentParser:
    """The command line, with the lab settings as defaults."""
    settings = get_settings()
    parser = argparse.ArgumentParser(
        description="Chat with a local (or remote OpenAI-compatible) language model, streaming.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--model", default=None, help=f"model name or name:tag (default: {settings.default_model})"
    )
    parser.add_argument(
        "--backend",
        default=settings.backend,
        choices=["auto", "llama.cpp", "transformers", "openai"],
        help="engine (default: %(default)s: llama.cpp for GGUF files)",
    )
    parser.add_argument(
        "--base-url",
        default=settings.base_url,
        help="OpenAI-compatible server, with --backend openai",
    )
    parser.add_argument("--api-key", default=settings.api_key, help="API key for --base-url")
    parser.add_argument("--system", default=None, help="system prompt (default: the model's own)")
    # Sampling options default to None so a resumed --history keeps its own settings
    # unless one is given; new chats get GenerationParams' defaults.
    defaults = GenerationParams()
    parser.add_argument(
        "--temperature",
        type=_param("temperature"),
        help=f"0 to 2, 0 is greedy (default: {defaults.temperature})",
    )
    parser.add_argument(
        "--top-p",
        type=_param("top_p"),
        help=f"nucleus sampling, above 0 up to 1 (default: {defaults.top_p})",
    )
    parser.add_argument(
        "--max-tokens",
        type=_param("max_tokens"),
        help=f"reply length limit, at least 1 (default: {defaults.max_tokens})",
    )
    parser.add_argument(
        "--ctx",
        type=_positive,
        help=f"context window in tokens (default: {settings.n_ctx}; a server's own for openai)",
    )
    parser.add_argument(
        "--threads",
        type=_positive,
        help=f"CPU threads for local engines (default: {settings.threads})",
    )
    parser.add_argument(
        "--seed", type=_param("seed"), default=None, help="sampling seed, for repeatable replies"
    )
    parser.add_argument(
        "--history",
        type=Path,
        default=None,
        metavar="FILE",
        help="resume this transcript and keep saving to it",
    )
    parser.add_argument(
        "--no-stream", action="store_true", help="print each reply when it is complete"
    )
    parser.add_argument(
        "--prompt",
        default=None,
        metavar="TEXT",
        help="ask one question, print the answer, exit ('-': read stdin)",
    )
    parser.add_argument(
        "--json",
        action="store_true",
        help="with --prompt: print one JSON object (reply, usage, timings)",
    )
    parser.add_argument(
        "--tools",
        action="store_true",
        help="let the model call tools: a calculator and a search over part3/data/docs "
        "(document_qa.py's default collection, built on first use)",
    )
    parser.add_argument(
        "--max-tool-steps",
        type=_positive,
        default=4,
        metavar="N",
        help="with --tools: rounds of tool calls before the model must answer (default: 4)",
    )
    return parser


def _param(name: str):
    """An argparse type for sampling setting ``name``: parsed and range-checked as
    ``/params`` and the server do (:data:`llmlab.chat.PARAM_RANGES`)."""

    def parse(text: str) -> Any:
        try:
            return parse_param(name, text)
        except ChatError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    parse.__name__ = name  # argparse names the type in some messages
    return parse


def _positive(text: str) -> int:
    """An argparse type for a count that must be 1 or more."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number, not {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


class Ui:
    """Terminal output: rich colours when stdout is a terminal, plain text when piped."""

    def __init__(self) -> None:
        self.rich = sys.stdout.isatty()
        if self.rich:
            from rich.console import Console

            self.console = Console(highlight=False)
            self.err = Console(stderr=True, highlight=False)

    def piece(self, text: str) -> None:
        """One streamed piece of a reply."""
        if self.rich:
            self.console.print(text, end="", style="cyan", markup=False, soft_wrap=True)
        else:
            sys.stdout.write(text)
            sys.stdout.flush()

    def line(self, text: str = "", style: str = "") -> None:
        """A whole line (style is used only on a terminal)."""
        if self.rich:
            self.console.print(text, style=style or None, markup=False, soft_wrap=True)
        else:
            print(text, flush=True)

    def notice(self, text: str) -> None:
        """Something the user should know about the chat, e.g. dropped turns."""
        self.line(f"[{text}]", style="yellow")

    def error(self, text: str) -> None:
        """One line on stderr."""
        if self.rich:
            self.err.print(f"error: {text}", style="bold red", markup=False, soft_wrap=True)
        else:
            print(f"error: {text}", file=sys.stderr, flush=True)

    def table(self, rows: dict[str, Any]) -> None:
        """Name/value pairs, e.g. for /stats and /params."""
        if self.rich:
            from rich.table import Table

            table = Table(show_header=False, box=None)
            for key, value in rows.items():
                table.add_row(key, _fmt(value))
            self.console.print(table)
        else:
            for key, value in rows.items():
                print(f"{key}: {_fmt(value)}")

    def ask(self, prompt: str) -> str:
        """Read one line; EOFError on Ctrl-D, KeyboardInterrupt on Ctrl-C."""
        if self.rich:
            return self.console.input(f"[bold green]{prompt}[/]")
        line = input(prompt)
        if not sys.stdin.isatty():
            print(line, flush=True)  # echo piped input so the output reads as a transcript
        return line


def chat_tools(ui: Ui, quiet: bool = False) -> list[Any]:
    """The built-in tools for ``--tools``: the calculator, and a search over the documents in
    document_qa.py's default collection (built from part3/data/docs if it is empty).

    Without an embedding model (or with a broken store) the search is left out, and a
    notice says why; the chat goes on with the calculator.
    """
    from llmlab.rag import DEFAULT_COLLECTION, DocumentStore, RagError
    from llmlab.rag.store import display_path
    from llmlab.tools import calculator, document_search

    say = (lambda text: None) if quiet else ui.notice
    try:
        store = DocumentStore(DEFAULT_COLLECTION, create=True)
        if store.count() == 0:
            say(f"building the document index from {display_path(DOCS)} (first use only)")
            store.ingest([DOCS])
        search = document_search(store)
    except (RagError, BackendError, OSError, ValueError) as exc:
        say(f"tools: calculator (no document search: {exc})")
        return [calculator]
    say(
        f"tools: calculator, search_documents (collection {store.name!r}: {store.count()} "
        f"chunks in {display_path(store.db_dir)})"
    )
    return [calculator, search]


def _show_step(ui: Ui, step: Any) -> None:
    arguments = ", ".join(f"{k}={v!r}" for k, v in step.arguments.items())
    outcome = f"error: {step.error}" if step.error else json.dumps(step.to_dict()["result"])
    if len(outcome) > 160:
        outcome = outcome[:157] + "..."
    ui.notice(f"tool {step.name}({arguments}) -> {outcome}")


def _fmt(value: Any) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def load_model(args: argparse.Namespace, name: str | None) -> Backend:
    """Load ``name`` with the command-line options and check it works before chatting.

    Raises:
        registry.RegistryError: unknown or missing model.
        backends.BackendError: the engine cannot load it, or the server cannot be reached.
        ValueError: an option the chosen engine does not take.
    """
    options: dict[str, Any] = {
        "n_ctx": args.ctx,
        "base_url": args.base_url,
        "api_key": args.api_key,
    }
    remote = backends.canonical_backend(args.backend) == "openai" or bool(args.base_url)
    if not remote:
        options["threads"] = args.threads  # servers choose their own threads
        problem = registry.path_instead_of_name(name)
        if problem:
            raise BackendError(problem)
    model = backends.load(name, backend=args.backend, **options)
    # Backends load lazily; do it now so a bad file or an unreachable server shows up
    # before the user has typed anything.
    ensure = getattr(model, "ensure_loaded", None)
    if callable(ensure):
        ensure()
    else:
        model.count_tokens("hello")
    return model


class ChatApp:
    """The interactive loop and its slash commands around one ChatSession."""

    def __init__(self, args: argparse.Namespace, session: ChatSession, ui: Ui) -> None:
        self.args = args
        self.session = session
        self.ui = ui
        self.commands = {
            "/help": self.cmd_help,
            "/reset": self.cmd_reset,
            "/system": self.cmd_system,
            "/save": self.cmd_save,
            "/load": self.cmd_load,
            "/model": self.cmd_model,
            "/params": self.cmd_params,
            "/stats": self.cmd_stats,
        }

    # ----- one reply -----------------------------------------------------------------

    def reply(self, text: str, stream: bool = True) -> Result | None:
        """Ask ``text`` and show the reply; None if it could not be asked."""
        try:
            chunks = self.session.stream(text)
        except (ChatError, BackendError) as exc:
            self.ui.error(str(exc))
            return None
        if self.session.last_dropped:
            self.ui.notice(_dropped_notice(self.session.last_dropped, self.session.context_length))
        try:
            for chunk in chunks:
                if stream:
                    self.ui.piece(chunk.text)
        except KeyboardInterrupt:
            chunks.close()  # type: ignore[attr-defined]  # keeps the partial reply, marked
        except (BackendError, StructuredOutputError) as exc:  # the latter: a --tools reply
            self.ui.line()
            self.ui.error(str(exc))
            return None
        result = self.session.last_result
        if not stream:
            self.ui.piece(result.text)
        self.ui.line()
        if result.finish_reason == "interrupted":
            self.ui.notice("reply interrupted; the partial reply is kept in the history")
        elif result.finish_reason == "length":
            self.ui.notice(
                f"reply cut at {result.usage.completion_tokens} tokens (/params max_tokens=N)"
            )
        return result

    def save_history(self) -> bool:
        """Write the transcript to --history, if given; False (and a message) if it failed."""
        if self.args.history is None:
            return True
        try:
            self.session.save(self.args.history)
        except OSError as exc:
            self.ui.error(
                f"Could not save the history to {self.args.history}: {exc.strerror or exc}. "
                "The chat is still in memory: /save FILE writes it elsewhere."
            )
            return False
        return True

    # ----- the loop ------------------------------------------------------------------

    def run(self) -> int:
        """Read lines until /exit, Ctrl-D or Ctrl-C; return the exit code."""
        info = self.session.backend.info()
        self.ui.line(
            f"Chatting with {self.session.model} ({info.get('backend', self.session.backend.name)}, "
            f"context {self.session.context_length} tokens). /help for commands, Ctrl-D to leave.",
            style="bold",
        )
        while True:
            try:
                line = self.ui.ask("you> ").strip()
            except (EOFError, KeyboardInterrupt):
                self.ui.line()
                break
            if not line:
                continue
            if line.startswith("/"):
                if not self.command(line):
                    break
                continue
            self.reply(line, stream=not self.args.no_stream)
            self.save_history()
        if not self.save_history():
            return 1
        if self.args.history is not None:
            self.ui.notice(f"history saved to {self.args.history}")
        return 0

    def command(self, line: str) -> bool:
        """Run a slash command; False means leave the chat."""
        name, _, arg = line.partition(" ")
        name, arg = name.lower(), arg.strip()
        if name in ("/exit", "/quit", "/bye"):
            return False
        handler = self.commands.get(name)
        if handler is None:
            self.ui.error(f"Unknown command {name}. Type /help for the list.")
        else:
            handler(arg)
        return True

    # ----- commands ------------------------------------------------------------------

    def cmd_help(self, arg: str) -> None:
        self.ui.table(dict(HELP))

    def cmd_reset(self, arg: str) -> None:
        self.session.reset()
        self.ui.notice("conversation cleared")

    def cmd_system(self, arg: str) -> None:
        if not arg:
            self.ui.line(
                f"system prompt: {self.session.system or '(none: the model template default)'}"
            )
            return
        self.session.set_system(None if arg == "-" else arg)
        self.ui.notice("system prompt removed" if arg == "-" else "system prompt set")

    def cmd_save(self, arg: str) -> None:
        if not arg:
            self.ui.error("Usage: /save FILE")
            return
        try:
            path = self.session.save(arg)
        except OSError as exc:
            self.ui.error(f"Could not write {arg}: {exc.strerror or exc}. Pick another path.")
            return
        self.ui.notice(f"saved {len(self.session.messages)} messages to {path}")

    def cmd_load(self, arg: str) -> None:
        if not arg:
            self.ui.error("Usage: /load FILE")
            return
        try:
            data = self.session.load(arg)
        except FileNotFoundError:
            self.ui.error(f"No such file: {arg}. Check the path (/save FILE writes one).")
            return
        except (ChatError, OSError) as exc:
            self.ui.error(str(exc))
            return
        self.ui.notice(f"loaded {len(self.session.messages)} messages from {arg}")
        recorded = data.get("model")
        if recorded and recorded != self.session.model:
            self.ui.notice(
                f"it was recorded with {recorded}; continuing with {self.session.model} (/model {recorded} to switch)"
            )

    def cmd_model(self, arg: str) -> None:
        if not arg:
            self.ui.line(f"model: {self.session.model}")
            return
        try:
            model = load_model(self.args, arg)
        except (registry.RegistryError, BackendError, ValueError) as exc:
            self.ui.error(f"{exc} Still chatting with {self.session.model}.")
            return
        old = self.session.backend
        self.session.use_backend(model)
        old.close()
        self.ui.notice(f"now chatting with {self.session.model}; the conversation is kept")

    def cmd_params(self, arg: str) -> None:
        if arg:
            changes = {}
            for item in arg.split():
                name, eq, value = item.partition("=")
                if not eq:
                    self.ui.error(
                        f"Write parameters as name=value, e.g. /params temperature=0.2 (got {item!r})."
                    )
                    return
                try:
                    changes[name] = parse_param(name, value)
                except ChatError as exc:
                    self.ui.error(str(exc))
                    return
            self.session.set_params(**changes)
        self.ui.table({k: v for k, v in vars(self.session.params).items()})

    def cmd_stats(self, arg: str) -> None:
        self.ui.table(self.session.stats())


def _dropped_notice(dropped: list[dict[str, Any]], context: int) -> str:
    turns = sum(1 for m in dropped if m["role"] == "user")
    tokens = sum(m.get("tokens", 0) for m in dropped)
    return (
        f"dropped the oldest {turns} turn{'s' * (turns != 1)} ({len(dropped)} messages, "
        f"{tokens} tokens) to fit the {context}-token context"
    )


def one_shot(app: ChatApp, text: str, as_json: bool) -> int:
    """Answer one question (``--prompt``); with ``as_json`` print one JSON object."""
    if not text.strip():
        app.ui.error(
            "The prompt is empty. Pass some text with --prompt, or pipe it in with --prompt -."
        )
        return 2
    if not as_json:
        result = app.reply(text, stream=not app.args.no_stream)
        if not app.save_history() or result is None:
            return 1
        return 130 if result.finish_reason == "interrupted" else 0
    try:
        result = app.session.send(text)
    except (ChatError, BackendError, StructuredOutputError) as exc:
        app.ui.error(str(exc))
        return 1
    saved = app.save_history()
    data = {
        "model": app.session.model,
        "reply": result.text,
        **result.to_dict(),
        "dropped_messages": len(app.session.last_dropped),
    }
    if app.session.tools:
        data["tool_steps"] = app.session.messages[-1].get("tool_steps", [])
    del data["text"]
    print(json.dumps(data, ensure_ascii=False))
    if not saved:
        return 1
    return 130 if result.finish_reason == "interrupted" else 0


def _history_problem(path: Path) -> str | None:
    """Why ``path`` cannot be a transcript file (a folder, or under a file), else None."""
    path = path.expanduser()
    if path.is_dir():
        return f"is a folder; name a file in it, e.g. {path / 'chat.json'}"
    parent = next((p for p in path.parents if p.exists()), None)
    if parent is not None and not parent.is_dir():
        return f"cannot be created: {parent} is a file, not a folder"
    return None


def main(argv: list[str] | None = None) -> int:
    """Run the chat; returns the exit code (2: usage, unknown model, missing file, no server)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.json and args.prompt is None:
        parser.error("--json needs --prompt TEXT (one question, one JSON answer)")
    if args.history is not None and (problem := _history_problem(args.history)):
        parser.error(f"--history {args.history} {problem}")
    ui = Ui()
    text = None
    if args.prompt is not None:
        text = sys.stdin.read() if args.prompt == "-" else args.prompt
    given = {
        "temperature": args.temperature,
        "top_p": args.top_p,
        "max_tokens": args.max_tokens,
        "seed": args.seed,
    }
    params = {k: v for k, v in given.items() if v is not None}
    try:
        model = load_model(args, args.model)
    except (registry.RegistryError, BackendError, ValueError) as exc:
        ui.error(str(exc))
        return 2
    except KeyboardInterrupt:
        ui.error("Interrupted while loading the model.")
        return 130
    with model:
        session = ChatSession(model, system=args.system, params=params)
        if args.tools:
            session.tools = chat_tools(ui, quiet=args.json)
            session.max_tool_steps = args.max_tool_steps
            if not args.json:
                session.on_tool_step = lambda step: _show_step(ui, step)
        if args.history is not None and args.history.exists():
            try:
                session.load(args.history)
            except (ChatError, OSError) as exc:
                ui.error(f"{exc} Fix or move {args.history}, or pass another --history file.")
                return 2
            if args.system is not None:
                session.set_system(args.system)
            session.set_params(**params)
            if text is None:
                ui.notice(f"resumed {len(session.messages)} messages from {args.history}")
        app = ChatApp(args, session, ui)
        if text is not None:
            return one_shot(app, text, args.json)
        return app.run()


if __name__ == "__main__":
    raise SystemExit(main())
