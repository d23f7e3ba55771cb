"""Chat sessions: system prompt, history, a context budget, per-reply figures, transcripts.

A :class:`ChatSession` wraps any :class:`~llmlab.backends.base.Backend`::

    from llmlab import backends
    from llmlab.chat import ChatSession

    session = ChatSession(backends.load(), system="You are a concise assistant.")
    reply = session.send("Name a primary colour.")          # whole reply: a Result
    for chunk in session.stream("And another one?"):         # or piece by piece
        print(chunk.text, end="", flush=True)
    session.last_dropped        # turns removed to make room, if the context was full
    session.last_result.timings.tokens_per_second
    session.save("chat.json")   # resume later with ChatSession.from_file("chat.json", model)

Before each reply the session makes the prompt fit: prompt tokens plus the reply budget
(``max_tokens``) must fit in the model's context. It drops whole turns, oldest first, never
the system prompt and never the newest user message, and reports what it dropped.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import asdict, fields
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NamedTuple

from llmlab.backends.base import (
    Backend,
    Chunk,
    ContextOverflowError,
    GenerationParams,
    Message,
    Result,
    Timings,
    Usage,
)

TRANSCRIPT_FORMAT = "llmlab-chat/1"
# Template tokens around each message when the backend cannot render its chat template
# (remote servers): role markers and separators, a little more than ChatML's 4.
MESSAGE_OVERHEAD = 5
# Smallest reply budget worth generating when the newest message nearly fills the context.
MIN_REPLY_TOKENS = 16


class Fit(NamedTuple):
    """What :meth:`ChatSession.fit_context` did: messages dropped, reply budget, prompt size."""

    dropped: list[dict[str, Any]]
    reply_budget: int
    prompt_tokens: int


class ChatError(ValueError):
    """A chat request or transcript that cannot be used; the message says what to do."""


class Range(NamedTuple):
    """The values a sampling setting may take: from ``low`` (or above it) up to ``high``."""

    low: float
    high: float | None = None
    low_open: bool = False  # True: the value must be above ``low``, not equal to it
    note: str = ""
    next_above_low: float | None = None  # values between ``low`` and this are refused

    def __contains__(self, value: object) -> bool:
        if not isinstance(value, int | float) or value != value:  # NaN is in no range
            return False
        above = value > self.low if self.low_open else value >= self.low
        gap = self.next_above_low is not None and self.low < value < self.next_above_low
        return above and not gap and (self.high is None or value <= self.high)

    def describe(self) -> str:
        """The range in words, e.g. ``0, or at least 0.001 and at most 2 (0 is greedy)``."""
        text = f"above {self.low:g}" if self.low_open else f"at least {self.low:g}"
        if self.next_above_low is not None:
            text = f"{self.low:g}, or at least {self.next_above_low:g}"
        if self.high is not None:
            text += f" and at most {self.high:g}"
        return f"{text} ({self.note})" if self.note else text


# What the server accepts (part5/combined_app/schemas.py); a test keeps the two the same,
# so a setting the command line takes is one the server takes too. Temperatures just above
# 0 and tiny repeat penalties overflow the sampler's arithmetic (logits / 1e-300 is inf).
PARAM_RANGES = {
    "max_tokens": Range(1, note="the longest reply, in tokens"),
    "temperature": Range(0, 2, note="0 is greedy", next_above_low=0.001),
    "top_p": Range(0, 1, low_open=True, note="1 keeps every token"),
    "top_k": Range(0, note="0 keeps every token"),
    "seed": Range(0),
    "repeat_penalty": Range(0.01, note="1 is no penalty"),
}


def check_param(name: str, value: Any) -> Any:
    """Return ``value`` if it is in the valid range of sampling setting ``name`` (or None).

    Raises:
        ChatError: the value is outside :data:`PARAM_RANGES` (the message gives the range).
    """
    allowed = PARAM_RANGES.get(name)
    if allowed is not None and value is not None and value not in allowed:
        raise ChatError(f"{name} must be {allowed.describe()}, not {value!r}.")
    return value


def parse_param(name: str, value: str) -> Any:
    """Convert ``value`` (text typed by a user) to the type of GenerationParams field ``name``.

    ``seed=none`` clears the seed; ``stop`` takes comma-separated strings.

    Raises:
        ChatError: unknown name, a value of the wrong type or out of range.
    """
    known = {f.name: f for f in fields(GenerationParams)}
    if name not in known:
        raise ChatError(f"Unknown parameter {name!r}. Known: {', '.join(known)}.")
    if name == "stop":
        return [s for s in value.split(",") if s]
    if name == "seed" and value.lower() in ("none", ""):
        return None
    kind = int if name in ("max_tokens", "top_k", "seed") else float
    try:
        number = kind(value)
    except ValueError:
        raise ChatError(
            f"{name} must be {'an integer' if kind is int else 'a number'}, not {value!r}."
        ) from None
    return check_param(name, number)


def make_params(**values: Any) -> GenerationParams:
    """GenerationParams from keyword arguments, each checked against :data:`PARAM_RANGES`.

    Raises:
        TypeError: a name that is not a sampling setting.
        ChatError: a value out of range.
    """
    params = GenerationParams.from_kwargs(**values)
    for name in PARAM_RANGES:
        check_param(name, getattr(params, name))
    return params


class ChatSession:
    """A conversation with one model: history, budget, per-reply figures and transcripts.

    Each message in :attr:`messages` is a dict with ``role``, ``content`` and ``tokens``
    (the content's length in the model's tokens); assistant messages also carry ``usage``
    and ``timings``, and ``interrupted: True`` when the reply was stopped part-way.
    """

    def __init__(
        self,
        backend: Backend,
        system: str | None = None,
        params: GenerationParams | dict[str, Any] | None = None,
        model: str | None = None,
        tools: list[Any] | None = None,
        max_tool_steps: int = 4,
    ) -> None:
        self.backend = backend
        self.model = model or _model_name(backend)
        if isinstance(params, dict):
            params = make_params(**params)
        self.params = params or GenerationParams()
        self.system = system or None
        self.messages: list[dict[str, Any]] = []
        self.last_dropped: list[dict[str, Any]] = []
        self.last_result: Result | None = None
        self.created = _now()
        # With tools each reply runs llmlab.tools.run_tools: the model may call them (each
        # call is passed to on_tool_step as it finishes) before it answers.
        self.tools = tools or []
        self.max_tool_steps = max_tool_steps
        self.on_tool_step: Any = None
        self.last_tool_run: Any = None

    # ----- history -------------------------------------------------------------------

    def reset(self) -> None:
        """Forget the conversation (the system prompt and parameters stay)."""
        self.messages.clear()
        self.last_dropped = []
        self.last_result = None

    def set_system(self, text: str | None) -> None:
        """Replace the system prompt (``None`` or ``""`` removes it); history stays."""
        self.system = text or None

    def set_params(self, **changes: Any) -> GenerationParams:
        """Change sampling parameters, e.g. ``set_params(temperature=0.2)``; returns them."""
        merged = {**asdict(self.params), **changes}
        self.params = make_params(**merged)
        return self.params

    def use_backend(self, backend: Backend, model: str | None = None) -> None:
        """Continue the same conversation with another model; token counts are redone."""
        self.backend = backend
        self.model = model or _model_name(backend)
        for message in self.messages:
            message["tokens"] = self.count_tokens(message["content"])

    def count_tokens(self, text: str) -> int:
        """Length of ``text`` in this model's tokens."""
        return self.backend.count_tokens(text) if text else 0

    def prompt_messages(self) -> list[Message]:
        """The messages as the model sees them: system prompt first, role and content only."""
        head = [{"role": "system", "content": self.system}] if self.system else []
        return head + [{"role": m["role"], "content": m["content"]} for m in self.messages]

    def prompt_tokens(self, messages: list[dict[str, Any]] | None = None) -> int:
        """Tokens the next prompt takes, template included (for ``messages``, default the history).

        Local backends render their own chat template and count it exactly; for remote
        ones the per-message counts plus a small per-message overhead are an estimate.
        """
        history = self.messages if messages is None else messages
        head = [{"role": "system", "content": self.system}] if self.system else []
        plain = head + [{"role": m["role"], "content": m["content"]} for m in history]
        exact = self.backend.prompt_tokens(plain)
        if exact is not None:
            return exact
        counted = sum(m.get("tokens", 0) for m in history)
        system = self.count_tokens(self.system) if self.system else 0
        return system + counted + MESSAGE_OVERHEAD * (len(head) + len(history) + 1)

    @property
    def context_length(self) -> int:
        """The model's context window in tokens."""
        return self.backend.context_length

    def fit_context(self, max_tokens: int | None = None) -> Fit:
        """Drop the oldest turns until prompt + reply budget fit; say what was dropped.

        A turn is a user message and the replies that follow it. The system prompt and the
        newest user message are never dropped. If they alone leave less than the asked reply
        budget, the budget shrinks to what is left.

        Raises:
            ContextOverflowError: (a BackendError) when they leave room for fewer than
                MIN_REPLY_TOKENS.
        """
        budget = self.params.max_tokens if max_tokens is None else max_tokens
        limit = self.context_length
        kept = list(self.messages)
        used = self.prompt_tokens(kept)
        while used + budget > limit and len(kept) > 1:
            # Oldest turn: the first message plus any non-user messages after it.
            end = 1
            while end < len(kept) - 1 and kept[end]["role"] != "user":
                end += 1
            del kept[:end]
            used = self.prompt_tokens(kept)
        room = limit - used
        if room < min(budget, MIN_REPLY_TOKENS):
            # History is left as it was: nothing is dropped for a request that cannot run.
            raise ContextOverflowError(used, min(budget, MIN_REPLY_TOKENS), limit)
        dropped = self.messages[: len(self.messages) - len(kept)]
        self.messages = kept
        return Fit(dropped, min(budget, room), used)

    # ----- replies -------------------------------------------------------------------

    def send(self, text: str, **params: Any) -> Result:
        """Ask ``text`` and wait for the whole reply (streamed underneath, so Ctrl-C keeps the part)."""
        chunks = self.stream(text, **params)
        try:
            for _ in chunks:
                pass
        except KeyboardInterrupt:
            chunks.close()  # type: ignore[attr-defined]
        assert self.last_result is not None
        return self.last_result

    def stream(self, text: str, **params: Any) -> Iterator[Chunk]:
        """Ask ``text``; return an iterator of reply chunks.

        The user message is added and the context fitted right away (so
        :attr:`last_dropped` is already set when this returns); the reply is generated as
        the iterator is consumed. The last chunk carries ``finish_reason``, ``usage`` and
        ``timings``. If the reply is stopped (Ctrl-C inside the loop, or the caller closes
        the iterator), the partial reply is kept and marked ``interrupted``; a Ctrl-C that
        lands inside the generation ends the stream with ``finish_reason="interrupted"``.

        Raises:
            ContextOverflowError: the message does not fit even with the history dropped.
        """
        if not text.strip():
            raise ChatError("Empty message: type something to ask.")
        overrides = {k: v for k, v in params.items() if v is not None}
        self.messages.append({"role": "user", "content": text, "tokens": self.count_tokens(text)})
        try:
            fit = self.fit_context(overrides.get("max_tokens"))
        except ContextOverflowError:
            self.messages.pop()
            raise
        self.last_dropped = fit.dropped
        request = {**asdict(self.params), **overrides, "max_tokens": fit.reply_budget}
        if self.tools:
            return self._tool_reply(request, fit.prompt_tokens)
        return self._generate(request, fit.prompt_tokens)

    def _tool_reply(self, request: dict[str, Any], prompt_tokens: int) -> Iterator[Chunk]:
        """The reply after the tool loop: one chunk with the answer, then the totals.

        The answer is the model's ``response`` field (its raw reply is JSON, not for showing);
        the assistant message also records ``tool_steps``, each call with its result or error.
        """
        from llmlab.tools import run_tools

        start = time.perf_counter()
        try:
            run = run_tools(
                self.backend,
                self.prompt_messages(),
                self.tools,
                self.max_tool_steps,
                on_step=self.on_tool_step,
                **request,
            )
        except KeyboardInterrupt:  # nothing was answered yet: an empty, interrupted reply
            self._finish([], None, start, None, prompt_tokens)
            yield Chunk("", "interrupted", self.last_result.usage, self.last_result.timings)
            return
        except Exception:
            self.messages.pop()
            raise
        self.last_tool_run = run
        total = time.perf_counter() - start
        completion = self.count_tokens(run.answer)
        final = Chunk(
            "", "stop", Usage(prompt_tokens, completion), Timings(total, total, completion)
        )
        self._finish([run.answer], final, start, start + total, prompt_tokens)
        self.messages[-1]["tool_steps"] = [step.to_dict() for step in run.steps]
        yield Chunk(run.answer)
        yield final

    def _generate(self, request: dict[str, Any], prompt_tokens: int) -> Iterator[Chunk]:
        parts: list[str] = []
        final: Chunk | None = None
        first: float | None = None
        start = time.perf_counter()
        inner: Iterator[Chunk] = iter(())
        interrupted = failed = False
        try:
            inner = self.backend.stream_chat(self.prompt_messages(), **request)
            for chunk in inner:
                if chunk.text:
                    first = first or time.perf_counter()
                    parts.append(chunk.text)
                if chunk.finish_reason is not None:
                    final = chunk
                yield chunk
        except KeyboardInterrupt:
            interrupted = True
        except Exception:
            if not parts:  # the request failed before any text: nothing to keep
                failed = True
                self.messages.pop()
            raise
        finally:
            close = getattr(inner, "close", None)
            if close is not None:
                close()  # stops the engine's own generation (and frees its state) at once
            if not failed:
                # Normal end, Ctrl-C, the caller closing us early (GeneratorExit), or an error
                # part-way: the reply so far is kept (marked interrupted unless it finished).
                self._finish(parts, final, start, first, prompt_tokens)
        if interrupted:
            last = self.last_result
            yield Chunk("", "interrupted", last.usage, last.timings)

    def _finish(
        self,
        parts: list[str],
        final: Chunk | None,
        start: float,
        first: float | None,
        prompt_tokens: int,
    ) -> None:
        """Record the assistant message and :attr:`last_result` from what was generated."""
        text = "".join(parts)
        now = time.perf_counter()
        completion = self.count_tokens(text)
        usage = (
            final.usage
            if final is not None and final.usage is not None
            else Usage(prompt_tokens, completion)
        )
        if final is not None and final.timings is not None:
            timings = final.timings
        else:
            ttft = (first or now) - start
            timings = Timings(ttft, now - start, usage.completion_tokens)
        reason = final.finish_reason if final is not None else "interrupted"
        message: dict[str, Any] = {
            "role": "assistant",
            "content": text,
            "tokens": completion,
            "usage": asdict(usage),
            "timings": {**asdict(timings), "tokens_per_second": timings.tokens_per_second},
        }
        if reason == "interrupted":
            message["interrupted"] = True
        self.messages.append(message)
        self.last_result = Result(text, reason, usage, timings)

    # ----- figures -------------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        """Figures for ``/stats``: history size, context use, last reply and session averages."""
        replies = [m for m in self.messages if m["role"] == "assistant" and "timings" in m]
        speeds = [
            m["timings"]["tokens_per_second"] for m in replies if m["timings"]["tokens_per_second"]
        ]
        stats: dict[str, Any] = {
            "model": self.model,
            "messages": len(self.messages),
            "history_tokens": sum(m.get("tokens", 0) for m in self.messages),
            "prompt_tokens": self.prompt_tokens(),
            "context_length": self.context_length,
            "replies": len(replies),
            "completion_tokens_total": sum(m["usage"]["completion_tokens"] for m in replies),
            "mean_tokens_per_second": sum(speeds) / len(speeds) if speeds else 0.0,
        }
        if self.last_result is not None:
            last = self.last_result
            stats.update(
                last_prompt_tokens=last.usage.prompt_tokens,
                last_completion_tokens=last.usage.completion_tokens,
                last_time_to_first_token=last.timings.time_to_first_token,
                last_tokens_per_second=last.timings.tokens_per_second,
                last_finish_reason=last.finish_reason,
            )
        return stats

    # ----- transcripts ---------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """The transcript as plain JSON-ready data."""
        head = [
            {"role": "system", "content": self.system, "tokens": self.count_tokens(self.system)}
        ]
        return {
            "format": TRANSCRIPT_FORMAT,
            "model": self.model,
            "backend": self.backend.name,
            "parameters": asdict(self.params),
            "created": self.created,
            "updated": _now(),
            "messages": (head if self.system else []) + self.messages,
        }

    def save(self, path: str | Path) -> Path:
        """Write the transcript as JSON (atomically, so a crash never leaves half a file)."""
        path = Path(path).expanduser()
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=2, ensure_ascii=False) + "\n")
        tmp.replace(path)
        return path

    def load(self, path: str | Path) -> dict[str, Any]:
        """Replace system prompt, history and parameters with a saved transcript's; return its data.

        Raises:
            FileNotFoundError: no such file.
            ChatError: the file is not a chat transcript.
        """
        path = Path(path).expanduser()
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except UnicodeDecodeError as exc:
            raise ChatError(
                f"{path} is not UTF-8 text (byte {exc.start}: {exc.reason}); it is not a chat "
                "transcript, which is UTF-8 JSON."
            ) from exc
        except json.JSONDecodeError as exc:
            raise ChatError(
                f"{path} is not valid JSON ({exc}); it is not a chat transcript."
            ) from exc
        if not isinstance(data, dict) or not isinstance(data.get("messages"), list):
            raise ChatError(f"{path} is not a chat transcript (no 'messages' list).")
        messages = []
        for m in data["messages"]:
            if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant"):
                raise ChatError(f"{path} has a message without a valid role: {m!r}")
            messages.append(dict(m, content=str(m.get("content", ""))))
        system = [m["content"] for m in messages if m["role"] == "system"]
        self.system = system[0] if system else None
        self.messages = [m for m in messages if m["role"] != "system"]
        for m in self.messages:
            m.setdefault("tokens", self.count_tokens(m["content"]))
        saved = data.get("parameters", {})
        if not isinstance(saved, dict):
            raise ChatError(f"{path} has bad parameters: {saved!r} is not an object.")
        try:
            self.params = make_params(**saved)
        except (TypeError, ChatError) as exc:
            raise ChatError(f"{path} has bad parameters: {exc}") from exc
        self.created = data.get("created", self.created)
        self.last_dropped, self.last_result = [], None
        return data

    @classmethod
    def from_file(cls, path: str | Path, backend: Backend) -> ChatSession:
        """A session resumed from a transcript written by :meth:`save`."""
        session = cls(backend)
        session.load(path)
        return session


def _model_name(backend: Backend) -> str:
    try:
        info = backend.info()
    except Exception:  # a remote server may be down; the name is only a label
        return backend.name
    return str(info.get("model") or info.get("ref") or info.get("name") or backend.name)


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")
