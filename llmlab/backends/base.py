"""The one interface every engine implements, and the result types it returns.

Scripts, notebooks and the server only ever talk to a :class:`Backend`::

    model = backends.load("smollm2-135m-instruct")
    reply = model.chat([{"role": "user", "content": "Name a colour."}], max_tokens=16)
    reply.text, reply.usage.completion_tokens, reply.timings.tokens_per_second
    for chunk in model.stream_chat(messages):
        print(chunk.text, end="")
    person = model.chat(messages, schema=Person)    # a validated Person (pydantic model)

With ``schema=`` (a pydantic model, a type or a JSON-schema dict) the reply is held to the
schema while it is decoded (a grammar in llama.cpp and transformers, ``response_format`` on a
server) and comes back parsed and validated; every backend gets this from :meth:`Backend.chat`,
which passes ``json_schema=`` to its ``stream_chat``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

from llmlab import structured

Message = dict[str, str]  # {"role": "system" | "user" | "assistant", "content": "..."}


@dataclass
class GenerationParams:
    """Sampling settings shared by all backends. ``temperature=0`` means greedy."""

    max_tokens: int = 256
    temperature: float = 0.7
    top_p: float = 0.95
    top_k: int = 40
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    repeat_penalty: float = 1.0

    @classmethod
    def from_kwargs(cls, **kwargs: Any) -> GenerationParams:
        """Build from keyword arguments, rejecting names that are not sampling settings."""
        unknown = set(kwargs) - set(cls.__dataclass_fields__)
        if unknown:
            raise TypeError(f"Unknown generation parameter(s): {', '.join(sorted(unknown))}")
        params = cls(**{k: v for k, v in kwargs.items() if v is not None})
        if isinstance(params.stop, str):
            params.stop = [params.stop]
        return params


@dataclass
class Usage:
    """Token counts of one request, counted by the model's own tokenizer."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens a prefix cache saved (not computed again)

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass
class Timings:
    """Wall-clock figures of one request, in seconds."""

    time_to_first_token: float = 0.0
    total_seconds: float = 0.0
    completion_tokens: int = 0

    @property
    def tokens_per_second(self) -> float:
        """Decode speed: tokens after the first, over the time after the first."""
        decode = self.total_seconds - self.time_to_first_token
        return (
            (self.completion_tokens - 1) / decode
            if self.completion_tokens > 1 and decode > 0
            else 0.0
        )


@dataclass
class TopLogprob:
    """One of the most likely tokens at a step: its text, its bytes and its log-probability."""

    token: str
    bytes: list[int]
    logprob: float


@dataclass
class TokenLogprob:
    """The log-probability of a generated token, and the most likely tokens at that step
    (OpenAI's ``logprobs.content`` entries)."""

    token: str
    bytes: list[int]
    logprob: float
    top_logprobs: list[TopLogprob] = field(default_factory=list)


@dataclass
class Result:
    """A finished generation. ``finish_reason`` is ``stop``, ``length`` or ``interrupted``.

    ``logprobs`` is set only when they were asked for (one entry per generated token).
    """

    text: str
    finish_reason: str
    usage: Usage
    timings: Timings
    logprobs: list[TokenLogprob] | None = None

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready dict, with tokens/s included (``logprobs`` only when present)."""
        data = asdict(self)
        data["timings"]["tokens_per_second"] = self.timings.tokens_per_second
        if self.logprobs is None:
            del data["logprobs"]
        return data


@dataclass
class Chunk:
    """One streamed piece. The last chunk has ``finish_reason``, ``usage`` and ``timings`` set.

    ``logprobs``: the tokens whose text is in this chunk, when they were asked for.
    ``index``: which choice the chunk belongs to when one prompt has several (``n > 1``).
    """

    text: str
    finish_reason: str | None = None
    usage: Usage | None = None
    timings: Timings | None = None
    logprobs: list[TokenLogprob] | None = None
    index: int = 0


class BackendError(Exception):
    """A backend could not load or run a model; the message says what to do."""


class ContextOverflowError(BackendError):
    """The prompt plus ``max_tokens`` does not fit in the context window."""

    def __init__(self, prompt_tokens: int, max_tokens: int, context_length: int):
        self.prompt_tokens = prompt_tokens
        self.max_tokens = max_tokens
        self.context_length = context_length
        self.over = prompt_tokens + max_tokens - context_length
        super().__init__(
            f"The request needs {prompt_tokens} prompt + {max_tokens} reply tokens = "
            f"{prompt_tokens + max_tokens}, which is {self.over} over the context window of "
            f"{context_length} tokens. Use a shorter prompt (or fewer history turns), a smaller "
            "--max-tokens, or a larger --ctx (LLMLAB_N_CTX)."
        )


def collect(chunks: Iterator[Chunk]) -> Result:
    """Join a stream of chunks into one :class:`Result` (its last chunk carries the totals)."""
    parts: list[str] = []
    last = Chunk("")
    for last in chunks:
        parts.append(last.text)
    return Result(
        "".join(parts),
        last.finish_reason or "stop",
        last.usage or Usage(),
        last.timings or Timings(),
    )


def typed_reply(result: Result, schema: Any) -> Any:
    """``result``'s text parsed and validated against ``schema``; a reply that ``max_tokens``
    cut short is a :class:`~llmlab.structured.ReplyCutShortError` saying so."""
    return structured.validate_reply(complete_reply(result).text, schema)


def complete_reply(result: Result) -> Result:
    """``result``, unless ``max_tokens`` or an interrupt ended its JSON before it was complete."""
    if result.finish_reason == "length":
        raise structured.ReplyCutShortError(
            f"The reply was cut short at max_tokens ({result.usage.completion_tokens} tokens) "
            f"before its JSON was complete: {result.text[:80]!r}... Raise max_tokens "
            "(or ask for a smaller object)."
        )
    if result.finish_reason == "interrupted":
        raise structured.StructuredOutputError(
            "The reply was interrupted before its JSON was complete."
        )
    return result


class Backend(ABC):
    """A loaded (or lazily loadable) model behind one interface.

    Implementations load their model on first use and free it in :meth:`close`; they can
    be used as context managers.
    """

    name: str = "base"

    def chat(self, messages: list[Message], schema: Any = None, **params: Any) -> Any:
        """Reply to a conversation, using the model's own chat template.

        Returns a :class:`Result`; with ``schema`` (a pydantic model, a type or a JSON-schema
        dict) the reply is held to the schema and returned parsed and validated instead (a
        pydantic object, or a dict/list for a dict schema).

        Raises:
            SchemaError: a schema this backend cannot hold (the message names the part).
            ReplyCutShortError: ``max_tokens`` ended the reply before the JSON was complete.
            StructuredOutputError: the reply does not validate (a server that ignored the schema).
        """
        if schema is None:
            return collect(self.stream_chat(messages, **params))
        json_schema = structured.json_schema_of(schema)
        result = collect(self.stream_chat(messages, json_schema=json_schema, **params))
        return typed_reply(result, schema)

    @abstractmethod
    def stream_chat(
        self, messages: list[Message], json_schema: dict | None = None, **params: Any
    ) -> Iterator[Chunk]:
        """Like :meth:`chat`, yielding text pieces as they are decoded; with ``json_schema``
        the text is held to that JSON schema."""

    @abstractmethod
    def complete(self, prompt: str, **params: Any) -> Result:
        """Continue raw text, with no chat template."""

    @abstractmethod
    def count_tokens(self, text: str) -> int:
        """Number of tokens ``text`` takes with this model's tokenizer (no BOS added)."""

    @abstractmethod
    def info(self) -> dict[str, Any]:
        """What is loaded: backend, model ref, path, context length, threads, device, dtype."""

    @abstractmethod
    def close(self) -> None:
        """Free the model's memory. The object may be used again (it reloads)."""

    @property
    @abstractmethod
    def context_length(self) -> int:
        """The context window in tokens that requests must fit in."""

    def prompt_tokens(self, messages: list[Message]) -> int | None:
        """Exact tokens of the chat prompt for ``messages`` (template and generation prompt
        included), or None where only a server knows them (callers then estimate)."""
        return None

    def scorer(self, n_ctx: int = 512) -> Any:
        """An object with ``tokenize(text)`` and ``logits(ids)`` (every position's scores),
        for :mod:`llmlab.perplexity`."""
        raise BackendError(
            f"The {self.name} backend cannot score text: perplexity needs the logits of every "
            "position. Use a local model (a GGUF file or a transformers checkpoint)."
        )

    def stream_complete(self, prompt: str, **params: Any) -> Iterator[Chunk]:
        """Streaming :meth:`complete`. The default yields the whole result as one chunk."""
        result = self.complete(prompt, **params)
        yield Chunk(result.text, result.finish_reason, result.usage, result.timings)

    def __enter__(self) -> Backend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
