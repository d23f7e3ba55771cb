"""How the routes run a generation: one place that turns a request into sampling parameters,
a prompt and a grammar, and reads the engine's chunks back as a whole reply or a stream.

Chat completions and the Responses API both go through :func:`plan_chat`, then::

    job = plan_chat(messages, sampling_params(body, settings), schema=..., tools=..., tool_choice=...)
    generation = await start_chat(service, job)
    reply = await read_reply(generation, job, Timed(metrics))      # whole: a Reply
    async for piece in stream_reply(generation, job, Timed(metrics)):  # or streamed:
        ...  # Text (str, with its logprobs), ToolCall (one whole call), and last the Reply

Several choices of one prompt (OpenAI's ``n``), logprobs and LoRA adapters come from
:func:`choice_options`; :func:`start_choices` queues the choices (one prefill),
:func:`read_replies` reads them whole and :func:`stream_choices` streams them as
``(index, piece)`` pairs. Each choice is read as a single reply is (tools parsed the same way).

Structured output is held by grammars (``llmlab.structured``): a JSON schema becomes a grammar
with llama.cpp's converter. Tools go in the model's tool format (``llmlab.tool_formats``, chosen
once per model from its chat template): its template's own ``<tool_call>`` format where it
knows tools, else the generic format (the whole reply is JSON, a call or a text response),
either held by a grammar built from the tools' parameter schemas. A reply with tools must be
parsed whole before it can be told apart from a text answer, so with tools a stream sends the
reply (text or calls) once it is finished.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from fastapi import Request
from sse_starlette import EventSourceResponse

from llmlab import structured
from llmlab.backends.base import Chunk, GenerationParams, Message, TokenLogprob, Usage
from llmlab.tool_formats import GENERIC, ToolFormat
from part5.combined_app import jsonmode
from part5.combined_app.config import ServerSettings
from part5.combined_app.errors import APIError, error_body
from part5.combined_app.metrics import Metrics
from part5.combined_app.schemas import Sampling, SamplingFields
from part5.combined_app.service import Generation, ModelService

T = TypeVar("T")


def sampling_params(body: Sampling, settings: ServerSettings) -> GenerationParams:
    """The engine's sampling parameters for a request (every generating route calls this).

    Unset fields take the lab's defaults; a length over the server's limit is a 400 naming
    the field that asked for it (every length field is checked, whichever one wins).
    """
    limit = settings.max_tokens_limit
    asked = [(name, value) for name, value in body.length_fields() if value is not None]
    for name, value in asked:
        if value > limit:
            raise APIError(
                400,
                f"{name} is {value}, over this server's limit of {limit}. Ask for fewer.",
                param=name,
                code="max_tokens_too_large",
            )
    return GenerationParams.from_kwargs(
        max_tokens=asked[0][1] if asked else settings.default_max_tokens,
        temperature=body.temperature,
        top_p=body.top_p,
        top_k=body.top_k,
        seed=body.seed,
        stop=body.stop or [],
        repeat_penalty=body.repeat_penalty,
    )


@dataclass
class Options:
    """What a request asks of the engine besides sampling: ``n`` choices, ``logprobs``
    alternatives per token (None: off) and LoRA adapters by name with their scales."""

    n: int = 1
    logprobs: int | None = None
    lora: dict[str, float] | None = None


def choice_options(body: SamplingFields, settings: ServerSettings) -> Options:
    """The request's ``n``, logprobs and ``lora`` (ids as ``GET /lora-adapters`` lists
    them) checked against this server: a 400 names the field and what it allows."""
    if body.n > settings.parallel:
        raise APIError(
            400,
            f"n is {body.n}, but this server decodes at most {settings.parallel} sequences at "
            f"once (--parallel {settings.parallel}). Ask for n of 1 to {settings.parallel}.",
            param="n",
        )
    return Options(body.n, body.logprob_count(), _lora(body, settings))


def _lora(body: SamplingFields, settings: ServerSettings) -> dict[str, float] | None:
    if not body.lora:
        return None
    names = list(settings.lora)
    if not names:
        raise APIError(
            400,
            "This server has no LoRA adapters loaded. Start it with --lora NAME=PATH to "
            "serve one, or leave lora out.",
            param="lora",
        )
    chosen: dict[str, float] = {}
    for position, adapter in enumerate(body.lora):
        if adapter.id >= len(names):
            loaded = ", ".join(f"{i} ({name})" for i, name in enumerate(names))
            raise APIError(
                400,
                f"lora[{position}] asks for adapter id {adapter.id}, which is not loaded. "
                f"Loaded adapters (GET /lora-adapters): {loaded}.",
                param=f"lora.{position}.id",
            )
        chosen[names[adapter.id]] = adapter.scale
    return chosen


@dataclass
class Where:
    """Which request fields to name in a 400 (the chat route's names by default)."""

    messages: str = "messages"
    schema: str = "response_format.json_schema.schema"
    tools: str = "tools"
    tool_choice: str = "tool_choice"


@dataclass
class ChatJob:
    """What to run: the prompt's messages (and the tools its template renders), sampling,
    the grammar that holds the reply, and the tools and format when the reply may call them."""

    messages: list[Message]
    params: GenerationParams
    grammar: str | None = None
    tools: list[structured.Tool] = field(default_factory=list)
    options: Options = field(default_factory=Options)
    template_tools: list[dict[str, Any]] | None = None
    tool_format: ToolFormat = GENERIC


def plan_chat(
    messages: list[dict[str, Any]],
    params: GenerationParams,
    *,
    json_object: bool = False,
    schema: dict[str, Any] | None = None,
    tools: list[dict[str, Any]] | None = None,
    tool_choice: str = "auto",
    parallel_tool_calls: bool = True,
    where: Where | None = None,
    options: Options | None = None,
    tool_format: ToolFormat = GENERIC,
) -> ChatJob:
    """A :class:`ChatJob` for OpenAI-shaped ``messages`` (assistant ``tool_calls`` and ``tool``
    results included). ``schema`` (or ``json_object``) holds the reply to JSON; ``tools``
    (OpenAI's ``{"type": "function", "function": {...}}`` entries) with ``tool_choice``
    ``auto``, ``required`` or a tool's name hold it to ``tool_format`` (the model's, see
    ``ModelService.tool_format``; ``none``: plain text), with one call at most unless
    ``parallel_tool_calls``. ``options``: choices, logprobs, adapters (default: one choice,
    the base model).

    Raises a 400 :class:`APIError` naming the field for a schema the converter cannot hold,
    an unknown tool name, or a tool result that answers no call.
    """
    where = where or Where()
    job = _plan(
        messages,
        params,
        json_object,
        schema,
        tools,
        tool_choice,
        parallel_tool_calls,
        tool_format,
        where,
    )
    job.options = options or Options()
    return job


def _plan(
    messages: list[dict[str, Any]],
    params: GenerationParams,
    json_object: bool,
    schema: dict[str, Any] | None,
    tools: list[dict[str, Any]] | None,
    tool_choice: str,
    parallel_tool_calls: bool,
    fmt: ToolFormat,
    where: Where,
) -> ChatJob:
    try:
        known = structured.tools_from_openai(tools or [])
    except ValueError as exc:
        raise APIError(400, f"Invalid tools: {exc}.", param=where.tools) from exc
    names = [tool.name for tool in known]
    if tool_choice not in ("none", "auto", "required") and tool_choice not in names:
        raise APIError(
            400,
            f"tool_choice names the function {tool_choice!r}, which is not among the tools "
            f"({', '.join(names) or 'none given'}). Name one of them, or send it in tools.",
            param=where.tool_choice,
        )
    if tool_choice == "required" and not known:
        raise APIError(
            400, "tool_choice 'required' needs at least one tool in tools.", param=where.tool_choice
        )
    active = known if tool_choice != "none" else []
    try:
        prepared, template_tools = fmt.prepare(messages, active or None)
    except ValueError as exc:
        raise APIError(400, f"Invalid messages: {exc}.", param=where.messages) from exc
    if active:
        grammar = _grammar(
            lambda: fmt.grammar(active, tool_choice, parallel_tool_calls), where.tools
        )
        return ChatJob(
            prepared, params, grammar, active, template_tools=template_tools, tool_format=fmt
        )
    if schema is not None:
        grammar = _grammar(lambda: structured.grammar_for_schema(schema), where.schema)
        return ChatJob(jsonmode.with_instruction(prepared, schema), params, grammar)
    if json_object:
        return ChatJob(jsonmode.with_instruction(prepared), params, jsonmode.GRAMMAR)
    return ChatJob(prepared, params)


def _grammar(make: Any, param: str) -> str:
    try:
        return make()
    except structured.SchemaError as exc:
        raise APIError(
            400,
            f"This JSON schema cannot be held by a grammar: {exc}. Remove that part, or check "
            "the value elsewhere.",
            param=param,
            code="invalid_schema",
        ) from exc


async def start_chat(service: ModelService, job: ChatJob, param: str = "messages") -> Generation:
    """Queue the job, its prompt checked against the limits once tokenized in a worker
    thread (its first choice: the Responses API has one)."""
    return (await start_choices(service, job, param))[0]


async def start_choices(
    service: ModelService, job: ChatJob, param: str = "messages"
) -> list[Generation]:
    """As :func:`start_chat`, for every choice of the job (``job.options.n``)."""
    return await service.submit_choices(
        messages=job.messages,
        params=job.params,
        grammar=job.grammar,
        tools=job.template_tools,
        param=param,
        **vars(job.options),
    )


async def start_completions(
    service: ModelService, prompts: list[str], params: GenerationParams, options: Options
) -> list[list[Generation]]:
    """Queue ``options.n`` choices of each raw-text prompt (one list per prompt), each
    checked against the limits once tokenized; if one is refused or cannot be queued,
    those already queued are cancelled."""
    groups: list[list[Generation]] = []
    try:
        for prompt in prompts:
            groups.append(
                await service.submit_choices(
                    prompt=prompt, params=params, param="prompt", **vars(options)
                )
            )
    except APIError:
        for generation in (g for group in groups for g in group):
            generation.cancel()
        raise
    return groups


# --- reading a generation ------------------------------------------------------------------


@dataclass
class Reply:
    """A finished chat reply: text or tool calls, why it ended, and its token counts."""

    content: str | None
    tool_calls: list[structured.ToolCall]
    finish_reason: str  # stop, length or tool_calls
    usage: Usage
    logprobs: list[TokenLogprob] | None = None  # one per generated token, when asked for


class Text(str):
    """A streamed piece of reply text, with the logprobs of its tokens (None: not asked for)."""

    logprobs: list[TokenLogprob] | None = None

    @classmethod
    def of(cls, text: str, logprobs: list[TokenLogprob] | None) -> Text:
        piece = cls(text)
        piece.logprobs = logprobs
        return piece


def choices_usage(usages: list[Usage]) -> Usage:
    """The usage of several choices of one prompt: its prompt (read once) and every choice's
    completion tokens."""
    first = usages[0] if usages else Usage()
    return Usage(
        prompt_tokens=first.prompt_tokens,
        completion_tokens=sum(u.completion_tokens for u in usages),
        cached_tokens=first.cached_tokens,
    )


def add_usage(usages: list[Usage]) -> Usage:
    """The usage of separate prompts, added up."""
    return Usage(
        prompt_tokens=sum(u.prompt_tokens for u in usages),
        completion_tokens=sum(u.completion_tokens for u in usages),
        cached_tokens=sum(u.cached_tokens for u in usages),
    )


def finish_reason(reason: str | None) -> str:
    """OpenAI's finish reason for the engine's (``length``, else ``stop``)."""
    return "length" if reason == "length" else "stop"


class Timed:
    """Feeds token counts and time to first token of one generation into the metrics."""

    def __init__(self, metrics: Metrics):
        self.metrics = metrics
        self.started = time.perf_counter()
        self.first = False

    def chunk(self, chunk: Chunk) -> None:
        if chunk.text and not self.first:
            self.first = True
            self.metrics.ttft.observe(time.perf_counter() - self.started)
        if chunk.usage is not None:
            self.metrics.count_tokens(chunk.usage.prompt_tokens, chunk.usage.completion_tokens)


class _Pieces:
    """The text and logprobs of a generation's chunks so far."""

    def __init__(self) -> None:
        self.parts: list[str] = []
        self.logprobs: list[TokenLogprob] | None = None
        self.last = Chunk("")

    def add(self, chunk: Chunk) -> None:
        self.last = chunk
        self.parts.append(chunk.text)
        if chunk.logprobs is not None:
            self.logprobs = (self.logprobs or []) + chunk.logprobs

    def reply(self, job: ChatJob | None) -> Reply:
        text, last = "".join(self.parts), self.last
        usage = last.usage or Usage()
        if job is None or not job.tools or last.finish_reason == "length":
            return Reply(text, [], finish_reason(last.finish_reason), usage, self.logprobs)
        content, calls = job.tool_format.parse(text)
        return Reply(content, calls, "tool_calls" if calls else "stop", usage, self.logprobs)


async def read_reply(generation: Generation, job: ChatJob | None, timed: Timed) -> Reply:
    """The whole reply (tool calls parsed; ``job`` None: a raw text completion)."""
    pieces = _Pieces()
    try:
        async for chunk in generation:
            timed.chunk(chunk)
            pieces.add(chunk)
    finally:
        generation.cancel()  # no-op when finished; frees the slot if this task was cancelled
    return pieces.reply(job)


async def read_replies(
    generations: list[Generation], job: ChatJob | None, metrics: Metrics
) -> list[Reply]:
    """Every choice's whole reply, in choice order."""
    return list(await asyncio.gather(*(read_reply(g, job, Timed(metrics)) for g in generations)))


async def stream_reply(
    generation: Generation, job: ChatJob | None, timed: Timed
) -> AsyncIterator[str | structured.ToolCall | Reply]:
    """:class:`Text` pieces as they are decoded (with tools: the text or the calls once the
    reply is whole), then the :class:`Reply`. ``job`` None: a raw text completion."""
    if job is not None and job.tools:
        reply = await read_reply(generation, job, timed)
        if reply.content:
            yield Text.of(reply.content, reply.logprobs)
        for call in reply.tool_calls:
            yield call
        yield reply
        return
    pieces = _Pieces()
    async for chunk in generation:
        timed.chunk(chunk)
        pieces.add(chunk)
        if chunk.text or chunk.logprobs:
            yield Text.of(chunk.text, chunk.logprobs)
    yield pieces.reply(job)


_END = object()  # one choice's stream is over


async def stream_choices(
    generations: list[Generation], job: ChatJob | None, metrics: Metrics
) -> AsyncIterator[tuple[int, Text | structured.ToolCall | Reply]]:
    """Every choice's :func:`stream_reply` pieces as ``(choice index, piece)``, in the order
    they are decoded (each choice's own pieces keep their order)."""
    if len(generations) == 1:  # the common case needs no task and queue between (a hop per piece)
        async for piece in stream_reply(generations[0], job, Timed(metrics)):
            yield 0, piece
        return
    queue: asyncio.Queue[tuple[int, Any]] = asyncio.Queue()

    async def pump(index: int, generation: Generation) -> None:
        try:
            async for piece in stream_reply(generation, job, Timed(metrics)):
                await queue.put((index, piece))
        except Exception as exc:  # handed on to the reader, which raises it
            await queue.put((index, exc))
        await queue.put((index, _END))

    tasks = [asyncio.ensure_future(pump(i, g)) for i, g in enumerate(generations)]
    try:
        running = len(tasks)
        while running:
            index, piece = await queue.get()
            if isinstance(piece, Exception):
                raise piece
            if piece is _END:
                running -= 1
            else:
                yield index, piece
    finally:
        for task in tasks:
            task.cancel()


# Streamed tool-call arguments go out in pieces of this many characters.
ARGUMENT_PIECE = 16


def argument_pieces(arguments: str) -> list[str]:
    """A tool call's JSON arguments cut into the pieces a stream sends."""
    return [arguments[i : i + ARGUMENT_PIECE] for i in range(0, len(arguments), ARGUMENT_PIECE)]


# --- connections ---------------------------------------------------------------------------

# nginx's "client closed request": logged for a reply nobody is left to read.
CLIENT_CLOSED = 499


async def _client_left(request: Request) -> None:
    """Return when the client closes its connection (the body has been read by then)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def unless_client_leaves(request: Request, work: Awaitable[T], metrics: Metrics) -> T | None:
    """Await ``work`` (a whole, non-streamed reply) unless the client hangs up first (None).

    Starlette goes on running a handler whose client has gone, so without this a closed
    connection would keep its slot until ``max_tokens``. Cancelling ``work`` cancels its
    generations (:func:`collect` cancels them on the way out).
    """
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_client_left(request))
    try:
        done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        task.cancel()
        watcher.cancel()
        raise
    if task in done:
        watcher.cancel()
        return task.result()
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    metrics.cancelled.inc()
    return None


async def _guarded(
    events: AsyncIterator[dict[str, Any]], generations: list[Generation], metrics: Metrics
) -> AsyncIterator[dict[str, Any]]:
    """``events``, with an error mid-stream sent as an error event; a client that goes away
    cancels the generation, which frees its slot."""
    finished = False
    try:
        async for event in events:
            yield event
        finished = True
    except APIError as exc:
        finished = True
        yield {"data": json.dumps(error_body(exc.status, exc.message, exc.param, exc.code))}
    finally:
        if not finished:
            metrics.cancelled.inc()
        for generation in generations:
            generation.cancel()


def streamed_reply_doc(events: str) -> dict[int, Any]:
    """OpenAPI ``responses`` entry for a route that answers JSON, or server-sent ``events``
    when the request asks for ``stream``."""
    return {200: {"content": {"text/event-stream": {"schema": {"description": events}}}}}


def event_stream(
    events: AsyncIterator[dict[str, Any]],
    generation: Generation | list[Generation],
    metrics: Metrics,
    headers: dict[str, str] | None = None,
) -> EventSourceResponse:
    """A server-sent event response of ``events`` (dicts with ``data``, maybe ``event``);
    ``generation`` (or each of a list) is cancelled when the stream ends or the client leaves."""
    generations = generation if isinstance(generation, list) else [generation]
    # A comment ping every 15 s keeps proxies from closing a stream that waits in the queue.
    return EventSourceResponse(
        _guarded(events, generations, metrics), ping=15, sep="\n", headers=headers
    )
