"""The OpenAI-compatible routes: ``/v1/models``, ``/v1/chat/completions``, ``/v1/completions``,
``/v1/embeddings``. Any OpenAI client works against them::

    from openai import OpenAI
    client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="unused")
    client.chat.completions.create(model="smollm2-135m-instruct",
                                   messages=[{"role": "user", "content": "Hi"}])

Each route validates its body (``schemas``), runs the generation (``generation``) and returns
a typed reply (``replies``); streams are server-sent events of the same types.
"""

from __future__ import annotations

import base64
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import numpy as np
from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import Response
from pydantic import BaseModel
from sse_starlette import EventSourceResponse

from llmlab import registry
from llmlab.backends.base import GenerationParams, TokenLogprob, Usage
from llmlab.structured import ToolCall
from part5.combined_app import replies
from part5.combined_app.cache import ResponseCache, cache_key, deterministic
from part5.combined_app.errors import APIError, responses
from part5.combined_app.generation import (
    CLIENT_CLOSED,
    ChatJob,
    Reply,
    Text,
    add_usage,
    argument_pieces,
    choice_options,
    choices_usage,
    event_stream,
    plan_chat,
    read_replies,
    sampling_params,
    start_choices,
    start_completions,
    stream_choices,
    streamed_reply_doc,
    unless_client_leaves,
)
from part5.combined_app.metrics import Metrics
from part5.combined_app.models import Hints, ModelPool
from part5.combined_app.schemas import (
    ChatCompletionRequest,
    CompletionRequest,
    EmbeddingRequest,
    JSONObjectFormat,
    JSONSchemaFormat,
    TextRoute,
)
from part5.combined_app.service import ModelService

router = APIRouter(prefix="/v1", tags=["OpenAI-compatible"], route_class=TextRoute)

_REPLY = streamed_reply_doc("Events: OpenAI's JSON chunks, then [DONE].")
_GENERATION_ERRORS = responses(400, 404, 500, 503)


def _service(request: Request) -> ModelService:
    return request.app.state.service


def _metrics(request: Request) -> Metrics:
    return request.app.state.metrics


# --- the response cache ------------------------------------------------------------------


def _cache_slot(request: Request, body: Any, params: GenerationParams, **parts: Any) -> str | None:
    """The cache key of a request that may be answered from the cache, or None: no cache,
    a sampled request without a seed, or one that opted out (``cache: false`` in the body,
    ``Cache-Control: no-cache`` or ``no-store``)."""
    cache: ResponseCache = request.app.state.cache
    control = request.headers.get("cache-control", "").lower()
    if (
        not cache.enabled
        or not body.cache
        or "no-cache" in control
        or "no-store" in control
        or not deterministic(params.temperature, params.seed)
    ):
        return None
    return cache_key({"route": request.url.path, "params": params, **parts})


def _from_cache(request: Request, key: str | None, model: str) -> Response | None:
    """The cached reply for ``key`` exactly as first sent (JSON or the stream's events)."""
    if key is None:
        return None
    stored = request.app.state.cache.get(key)
    metrics = _metrics(request)
    if stored is None:
        metrics.cache_misses.inc()
        return None
    metrics.cache_hits.inc()
    metrics.routed.labels(model=model, via="cache").inc()
    headers = {"X-Cache": "hit", "X-Model": model}
    if isinstance(stored, bytes):
        return Response(stored, media_type="application/json", headers=headers)

    async def replay() -> AsyncIterator[dict[str, str]]:
        for data in stored:
            yield {"data": data}

    return EventSourceResponse(replay(), ping=15, sep="\n", headers=headers)


def _json_reply(request: Request, key: str | None, reply: BaseModel, model: str) -> Response:
    """``reply`` as JSON, kept in the cache under ``key`` (when there is one); the
    ``X-Model`` header names the model that answered."""
    body = reply.model_dump_json().encode()
    if key is not None:
        request.app.state.cache.put(key, body)
    return Response(body, media_type="application/json", headers=_reply_headers(key, model))


def _reply_headers(key: str | None, model: str) -> dict[str, str]:
    return {"X-Model": model, **({"X-Cache": "miss"} if key is not None else {})}


def _pool(request: Request) -> ModelPool:
    return request.app.state.models


def _chat_hints(body: ChatCompletionRequest) -> Hints:
    """What the ``auto`` rules look at: prompt length, JSON or tools asked for, the text."""
    texts = [m.content for m in body.messages if isinstance(m.content, str)]
    users = [m.content for m in body.messages if m.role == "user" and isinstance(m.content, str)]
    return Hints(
        prompt_chars=sum(map(len, texts)),
        json_output=body.response_format is not None and body.response_format.type != "text",
        tools=bool(body.tools) and body.tool_choice != "none",
        text=users[-1] if users else "",
    )


async def _recorded(
    request: Request, key: str | None, events: AsyncIterator[dict[str, Any]]
) -> AsyncIterator[dict[str, Any]]:
    """``events`` passed on; kept in the cache once the stream has ended normally (an error
    or a client that leaves stops this generator before that)."""
    seen = []
    async for event in events:
        seen.append(event)
        yield event
    if key is not None and all(event.keys() == {"data"} for event in seen):
        request.app.state.cache.put(key, [event["data"] for event in seen])


def _usage(usage: Usage | None) -> replies.CompletionUsage:
    usage = usage or Usage()
    return replies.CompletionUsage(
        prompt_tokens=usage.prompt_tokens,
        completion_tokens=usage.completion_tokens,
        total_tokens=usage.total_tokens,
        prompt_tokens_details=replies.PromptTokensDetails(cached_tokens=usage.cached_tokens),
    )


def _chat_logprobs(entries: list[TokenLogprob] | None) -> replies.ChoiceLogprobs | None:
    """OpenAI's chat ``logprobs.content``: each token with its bytes and alternatives."""
    if entries is None:
        return None
    return replies.ChoiceLogprobs(
        content=[
            replies.TokenLogprob(
                token=e.token,
                logprob=e.logprob,
                bytes=e.bytes,
                top_logprobs=[
                    replies.TopLogprob(token=t.token, logprob=t.logprob, bytes=t.bytes)
                    for t in e.top_logprobs
                ],
            )
            for e in entries
        ]
    )


def _completion_logprobs(
    entries: list[TokenLogprob] | None, offset: int = 0
) -> replies.CompletionLogprobs | None:
    """OpenAI's legacy completion logprobs; ``text_offset`` counts characters from ``offset``
    (where this piece starts in the choice's text)."""
    if entries is None:
        return None
    offsets = []
    for entry in entries:
        offsets.append(offset)
        offset += len(entry.token)
    return replies.CompletionLogprobs(
        tokens=[e.token for e in entries],
        token_logprobs=[e.logprob for e in entries],
        top_logprobs=[{t.token: t.logprob for t in e.top_logprobs} for e in entries],
        text_offset=offsets,
    )


# --- models ------------------------------------------------------------------------------


def _model_entries(service: ModelService, pool: ModelPool) -> list[dict[str, Any]]:
    created = int(time.time())
    entries = [
        {
            "id": model["id"],
            "object": "model",
            "created": created,
            "owned_by": "llmlab",
            **model,
            "context_length": service.engine.n_ctx
            if service.engine and model["id"] == service.model_id
            else None,
        }
        for model in pool.describe()
    ]
    for alias in sorted(pool.aliases):
        target = pool.choose(alias, Hints())[0]
        entries.append(
            {
                "id": alias,
                "object": "model",
                "created": created,
                "owned_by": "llmlab",
                "alias_of": target,
                "capabilities": pool.capabilities(target),
            }
        )
    if pool.auto is not None:
        entries.append(
            {
                "id": "auto",
                "object": "model",
                "created": created,
                "owned_by": "llmlab",
                "capabilities": ["chat", "completion"],
            }
        )
    try:
        spec = registry.find(service.embedding_model_id)
        entries.append(
            {
                "id": spec.name,
                "object": "model",
                "created": created,
                "owned_by": "llmlab",
                "capabilities": ["embeddings"],
                "ref": spec.ref,
            }
        )
    except registry.RegistryError:
        pass  # no embedding model configured: /v1/embeddings says so when called
    return entries


@router.get("/models")
async def list_models(request: Request) -> dict[str, Any]:
    """The models this server serves: each chat model (``loaded`` or loaded on first use,
    its memory estimate and aliases), the aliases, ``auto`` if rules are set, and the
    embedding model."""
    return {"object": "list", "data": _model_entries(_service(request), _pool(request))}


@router.get("/models/{model_id:path}", responses=responses(404))
async def get_model(model_id: str, request: Request) -> dict[str, Any]:
    """One served model by id (or ``name:tag``)."""
    for entry in _model_entries(_service(request), _pool(request)):
        if model_id in (entry["id"], entry.get("ref")):
            return entry
    raise APIError(
        404,
        f"Unknown model {model_id!r}. GET /v1/models lists the served ones.",
        param="model",
        code="model_not_found",
    )


# --- chat completions ---------------------------------------------------------------------


def _chat_job(body: ChatCompletionRequest, service: ModelService) -> ChatJob:
    """The request's messages, sampling, grammar and tools, checked (400s name the field)."""
    format_ = body.response_format
    choice = body.tool_choice or "auto"
    return plan_chat(
        [m.as_message() for m in body.messages],
        sampling_params(body, service.settings),
        json_object=isinstance(format_, JSONObjectFormat)
        or (isinstance(format_, JSONSchemaFormat) and format_.json_schema.schema_ is None),
        schema=format_.json_schema.schema_ if isinstance(format_, JSONSchemaFormat) else None,
        tools=[t.model_dump(exclude_none=True) for t in body.tools or []],
        tool_choice=choice if isinstance(choice, str) else choice.function.name,
        parallel_tool_calls=body.parallel_tool_calls is not False,
        options=choice_options(body, service.settings),
        tool_format=service.tool_format,
    )


def _tool_call(call: ToolCall) -> replies.ToolCall:
    return replies.ToolCall(
        id=call.id, function=replies.ToolCallFunction(name=call.name, arguments=call.arguments)
    )


def _chat_completion(
    answers: list[Reply], reply_id: str, created: int, model: str
) -> replies.ChatCompletion:
    choices = [
        replies.ChatChoice(
            index=index,
            message=replies.AssistantMessage(
                content=reply.content,
                tool_calls=[_tool_call(c) for c in reply.tool_calls] or None,
            ),
            logprobs=_chat_logprobs(reply.logprobs),
            finish_reason=reply.finish_reason,
        )
        for index, reply in enumerate(answers)
    ]
    usage = choices_usage([reply.usage for reply in answers])
    return replies.ChatCompletion(
        id=reply_id, created=created, model=model, choices=choices, usage=_usage(usage)
    )


def _call_deltas(index: int, call: ToolCall) -> list[replies.ChatDelta]:
    """A streamed tool call: its id and name first, then its arguments in pieces."""
    first = replies.ToolCallDelta(
        index=index,
        id=call.id,
        type="function",
        function=replies.ToolCallDeltaFunction(name=call.name, arguments=""),
    )
    rest = [
        replies.ToolCallDelta(index=index, function=replies.ToolCallDeltaFunction(arguments=piece))
        for piece in argument_pieces(call.arguments)
    ]
    return [replies.ChatDelta(tool_calls=[delta]) for delta in (first, *rest)]


async def _chat_events(
    pieces: AsyncIterator[tuple[int, Text | ToolCall | Reply]],
    n: int,
    chunk: Any,
    include_usage: bool,
) -> AsyncIterator[dict[str, Any]]:
    """OpenAI's chunks: each choice's role, its text or tool-call deltas and its finish; then
    usage (all choices), ``[DONE]``."""
    for index in range(n):
        yield {"data": chunk(index, replies.ChatDelta(role="assistant", content=""))}
    calls = [0] * n
    usages = [Usage()] * n
    async for index, piece in pieces:
        if isinstance(piece, Text):
            delta = replies.ChatDelta(content=piece)
            yield {"data": chunk(index, delta, logprobs=_chat_logprobs(piece.logprobs))}
        elif isinstance(piece, ToolCall):
            for delta in _call_deltas(calls[index], piece):
                yield {"data": chunk(index, delta)}
            calls[index] += 1
        else:
            usages[index] = piece.usage
            yield {"data": chunk(index, replies.ChatDelta(), finish=piece.finish_reason)}
    if include_usage:
        yield {"data": chunk(None, None, usage=_usage(choices_usage(usages)))}
    yield {"data": "[DONE]"}


@router.post(
    "/chat/completions",
    response_model=replies.ChatCompletion,
    responses={**_REPLY, **_GENERATION_ERRORS},
)
async def chat_completions(body: ChatCompletionRequest, request: Request):
    """A chat reply (text, JSON held by a schema, or tool calls; ``n`` choices, with
    logprobs if asked), whole or streamed as server-sent events in OpenAI's chunk format."""
    metrics, pool = _metrics(request), _pool(request)
    name, via = pool.choose(body.model, _chat_hints(body))
    pool.require_chat(name)
    async with pool.use(name, body.keep_alive) as service:
        job = _chat_job(body, service)
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        key = _cache_slot(
            request,
            body,
            job.params,
            model=name,
            messages=job.messages,
            tools=job.template_tools,
            grammar=job.grammar,
            options=job.options,
            stream=[body.stream, include_usage],
        )
        if (cached := _from_cache(request, key, name)) is not None:
            return cached
        generations = await start_choices(service, job)
    metrics.routed.labels(model=name, via=via).inc()
    reply_id, created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())
    if not body.stream:
        answers = await unless_client_leaves(
            request, read_replies(generations, job, metrics), metrics
        )
        if answers is None:
            return Response(status_code=CLIENT_CLOSED)
        reply = _chat_completion(answers, reply_id, created, name)
        return _json_reply(request, key, reply, name)

    def chunk(
        index: int | None,
        delta: replies.ChatDelta | None,
        finish: str | None = None,
        logprobs: replies.ChoiceLogprobs | None = None,
        **extra: Any,
    ) -> str:
        choices = (
            []
            if delta is None
            else [
                replies.ChunkChoice(
                    index=index, delta=delta, logprobs=logprobs, finish_reason=finish
                )
            ]
        )
        return replies.ChatCompletionChunk(
            id=reply_id, created=created, model=name, choices=choices, **extra
        ).model_dump_json(exclude_none=delta is not None)

    pieces = stream_choices(generations, job, metrics)
    events = _chat_events(pieces, len(generations), chunk, include_usage)
    headers = _reply_headers(key, name)
    return event_stream(_recorded(request, key, events), generations, metrics, headers)


# --- text completions ------------------------------------------------------------------------


@router.post(
    "/completions", response_model=replies.Completion, responses={**_REPLY, **_GENERATION_ERRORS}
)
async def completions(body: CompletionRequest, request: Request):
    """Raw text continuation (no chat template), whole or streamed; ``n`` choices per
    prompt (choice ``i`` of prompt ``p`` has index ``p * n + i``), logprobs if asked."""
    metrics, pool = _metrics(request), _pool(request)
    if body.echo:
        raise APIError(400, "echo is not supported by this server.", param="echo")
    if body.suffix:
        raise APIError(400, "suffix (fill-in-the-middle) is not supported.", param="suffix")
    prompts = [body.prompt] if isinstance(body.prompt, str) else list(body.prompt)
    if body.stream and len(prompts) > 1:
        raise APIError(400, "Streaming takes one prompt at a time.", param="prompt")
    hints = Hints(prompt_chars=sum(map(len, prompts)), text="\n".join(prompts))
    name, via = pool.choose(body.model, hints)
    async with pool.use(name, body.keep_alive) as service:
        params = sampling_params(body, service.settings)
        options = choice_options(body, service.settings)
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        key = _cache_slot(
            request,
            body,
            params,
            model=name,
            prompts=prompts,
            options=options,
            stream=[body.stream, include_usage],
        )
        if (cached := _from_cache(request, key, name)) is not None:
            return cached
        groups = await start_completions(service, prompts, params, options)
    metrics.routed.labels(model=name, via=via).inc()
    generations = [g for group in groups for g in group]
    reply_id, created = f"cmpl-{uuid.uuid4().hex[:24]}", int(time.time())

    def envelope(choices: list[replies.CompletionChoice], **extra: Any) -> replies.Completion:
        return replies.Completion(
            id=reply_id, created=created, model=name, choices=choices, **extra
        )

    if not body.stream:
        answers = await unless_client_leaves(
            request, read_replies(generations, None, metrics), metrics
        )
        if answers is None:
            return Response(status_code=CLIENT_CLOSED)
        n = options.n
        usage = add_usage(
            [
                choices_usage([a.usage for a in answers[p : p + n]])
                for p in range(0, len(answers), n)
            ]
        )
        choices = [
            replies.CompletionChoice(
                index=index,
                text=answer.content or "",
                logprobs=_completion_logprobs(answer.logprobs),
                finish_reason=answer.finish_reason,
            )
            for index, answer in enumerate(answers)
        ]
        return _json_reply(request, key, envelope(choices, usage=_usage(usage)), name)

    def event(choices: list[replies.CompletionChoice], **extra: Any) -> dict[str, str]:
        return {"data": envelope(choices, **extra).model_dump_json()}

    async def events() -> AsyncIterator[dict[str, Any]]:
        offsets = [0] * len(generations)
        usages = [Usage()] * len(generations)
        async for index, piece in stream_choices(generations, None, metrics):
            if isinstance(piece, Text):
                logprobs = _completion_logprobs(piece.logprobs, offsets[index])
                offsets[index] += len(piece)
                choice = replies.CompletionChoice(
                    index=index, text=piece, logprobs=logprobs, finish_reason=None
                )
                yield event([choice])
            elif isinstance(piece, Reply):
                usages[index] = piece.usage
                yield event(
                    [
                        replies.CompletionChoice(
                            index=index, text="", finish_reason=piece.finish_reason
                        )
                    ]
                )
        if include_usage:
            yield event([], usage=_usage(choices_usage(usages)))
        yield {"data": "[DONE]"}

    headers = _reply_headers(key, name)
    return event_stream(_recorded(request, key, events()), generations, metrics, headers)


# --- embeddings ----------------------------------------------------------------------------------


@router.post("/embeddings", responses=responses(400, 404))
async def embeddings(body: EmbeddingRequest, request: Request) -> dict[str, Any]:
    """Vectors for one text or a list of texts (unit length; float or base64)."""
    service = _service(request)
    texts = [body.input] if isinstance(body.input, str) else body.input
    embedder = await run_in_threadpool(service.embedder, body.model)
    if body.dimensions is not None and body.dimensions != embedder.dimensions:
        raise APIError(
            400,
            f"{embedder.name} makes {embedder.dimensions}-number vectors; it "
            f"cannot make {body.dimensions}.",
            param="dimensions",
        )
    vectors, prompt_tokens = await run_in_threadpool(service.embed, embedder, texts)
    data = []
    for index, vector in enumerate(vectors):
        if body.encoding_format == "base64":
            value: Any = base64.b64encode(np.asarray(vector, dtype="<f4").tobytes()).decode()
        else:
            value = vector
        data.append({"object": "embedding", "index": index, "embedding": value})
    _metrics(request).count_tokens(prompt_tokens, 0)
    return {
        "object": "list",
        "data": data,
        "model": embedder.spec.name,
        "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens},
    }
