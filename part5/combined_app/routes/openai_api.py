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

import asyncio
import base64
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import numpy as np
from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import Response

from llmlab import registry
from llmlab.backends.base import Usage
from llmlab.structured import ToolCall
from part5.combined_app import replies
from part5.combined_app.errors import APIError, responses
from part5.combined_app.generation import (
    CLIENT_CLOSED,
    ChatJob,
    Reply,
    Timed,
    argument_pieces,
    collect,
    event_stream,
    finish_reason,
    plan_chat,
    read_reply,
    sampling_params,
    start_chat,
    stream_reply,
    unless_client_leaves,
)
from part5.combined_app.metrics import Metrics
from part5.combined_app.schemas import (
    ChatCompletionRequest,
    CompletionRequest,
    EmbeddingRequest,
    JSONObjectFormat,
    JSONSchemaFormat,
    SamplingFields,
    TextRoute,
)
from part5.combined_app.service import ModelService

router = APIRouter(prefix="/v1", tags=["OpenAI-compatible"], route_class=TextRoute)

# A reply is JSON, or server-sent events when the request asks for ``stream``.
_REPLY = {
    200: {
        "content": {
            "text/event-stream": {
                "schema": {"description": "Events: OpenAI's JSON chunks, then [DONE]."}
            }
        }
    }
}
_GENERATION_ERRORS = responses(400, 404, 500, 503)


def _service(request: Request) -> ModelService:
    return request.app.state.service


def _metrics(request: Request) -> Metrics:
    return request.app.state.metrics


def _usage(usage: Usage | None) -> replies.CompletionUsage:
    usage = usage or Usage()
    return replies.CompletionUsage(
        prompt_tokens=usage.prompt_tokens,
        completion_tokens=usage.completion_tokens,
        total_tokens=usage.total_tokens,
        prompt_tokens_details=replies.PromptTokensDetails(cached_tokens=usage.cached_tokens),
    )


def _refuse_unsupported(body: SamplingFields) -> None:
    """n > 1 and logprobs: declared and validated, not decoded by the engine yet."""
    if body.n != 1:
        raise APIError(400, "Only n=1 is supported: send one request per reply.", param="n")
    if body.logprobs:
        raise APIError(400, "logprobs are not supported by this server.", param="logprobs")


# --- models ------------------------------------------------------------------------------


def _model_entries(service: ModelService) -> list[dict[str, Any]]:
    created = int(time.time())
    entries = [
        {
            "id": service.model_id,
            "object": "model",
            "created": created,
            "owned_by": "llmlab",
            "capabilities": ["chat", "completion"],
            "ref": service.spec.ref if service.spec else None,
            "context_length": service.engine.n_ctx if service.engine else None,
        }
    ]
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
    """The chat model this server serves and its embedding model."""
    return {"object": "list", "data": _model_entries(_service(request))}


@router.get("/models/{model_id:path}", responses=responses(404))
async def get_model(model_id: str, request: Request) -> dict[str, Any]:
    """One served model by id (or ``name:tag``)."""
    for entry in _model_entries(_service(request)):
        if model_id in (entry["id"], entry["ref"]):
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
    )


def _tool_call(call: ToolCall) -> replies.ToolCall:
    return replies.ToolCall(
        id=call.id, function=replies.ToolCallFunction(name=call.name, arguments=call.arguments)
    )


def _chat_completion(
    reply: Reply, reply_id: str, created: int, model: str
) -> replies.ChatCompletion:
    message = replies.AssistantMessage(
        content=reply.content, tool_calls=[_tool_call(c) for c in reply.tool_calls] or None
    )
    # logprobs: the engine's per-token log probabilities go into ChatChoice.logprobs.
    choice = replies.ChatChoice(index=0, message=message, finish_reason=reply.finish_reason)
    return replies.ChatCompletion(
        id=reply_id, created=created, model=model, choices=[choice], usage=_usage(reply.usage)
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
    pieces: AsyncIterator[str | ToolCall | Reply],
    chunk: Any,
    include_usage: bool,
) -> AsyncIterator[dict[str, Any]]:
    """OpenAI's chunks: the role, text or tool-call deltas, the finish, usage, ``[DONE]``."""
    yield {"data": chunk(replies.ChatDelta(role="assistant", content=""))}
    calls = 0
    async for piece in pieces:
        if isinstance(piece, str):
            yield {"data": chunk(replies.ChatDelta(content=piece))}
        elif isinstance(piece, ToolCall):
            for delta in _call_deltas(calls, piece):
                yield {"data": chunk(delta)}
            calls += 1
        else:
            yield {"data": chunk(replies.ChatDelta(), piece.finish_reason)}
            if include_usage:
                yield {"data": chunk(None, usage=_usage(piece.usage))}
    yield {"data": "[DONE]"}


@router.post(
    "/chat/completions",
    response_model=replies.ChatCompletion,
    responses={**_REPLY, **_GENERATION_ERRORS},
)
async def chat_completions(body: ChatCompletionRequest, request: Request):
    """A chat reply (text, JSON held by a schema, or tool calls), whole or streamed as
    server-sent events in OpenAI's chunk format."""
    service, metrics = _service(request), _metrics(request)
    service.check_chat_model(body.model)
    _refuse_unsupported(body)
    job = _chat_job(body, service)
    generation = await start_chat(service, job)
    reply_id, created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())
    if not body.stream:
        reply = await unless_client_leaves(
            request, read_reply(generation, job, Timed(metrics)), metrics
        )
        if reply is None:
            return Response(status_code=CLIENT_CLOSED)
        return _chat_completion(reply, reply_id, created, service.model_id)

    def chunk(delta: replies.ChatDelta | None, finish: str | None = None, **extra: Any) -> str:
        choices = (
            []
            if delta is None
            else [replies.ChunkChoice(index=0, delta=delta, finish_reason=finish)]
        )
        return replies.ChatCompletionChunk(
            id=reply_id, created=created, model=service.model_id, choices=choices, **extra
        ).model_dump_json(exclude_none=delta is not None)

    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    pieces = stream_reply(generation, job, Timed(metrics))
    return event_stream(_chat_events(pieces, chunk, include_usage), generation, metrics)


# --- text completions ------------------------------------------------------------------------


@router.post(
    "/completions", response_model=replies.Completion, responses={**_REPLY, **_GENERATION_ERRORS}
)
async def completions(body: CompletionRequest, request: Request):
    """Raw text continuation (no chat template), whole or streamed."""
    service, metrics = _service(request), _metrics(request)
    service.check_chat_model(body.model)
    _refuse_unsupported(body)
    if body.echo:
        raise APIError(400, "echo is not supported by this server.", param="echo")
    if body.suffix:
        raise APIError(400, "suffix (fill-in-the-middle) is not supported.", param="suffix")
    prompts = [body.prompt] if isinstance(body.prompt, str) else list(body.prompt)
    if body.stream and len(prompts) > 1:
        raise APIError(400, "Streaming takes one prompt at a time.", param="prompt")
    params = sampling_params(body, service.settings)
    for prompt in prompts:
        ids = await run_in_threadpool(service.prompt_ids, prompt=prompt)
        service.check_limits(len(ids), params.max_tokens, "prompt")
    generations = []
    try:
        for prompt in prompts:
            generations.append(await service.submit(prompt=prompt, params=params))
    except APIError:
        for generation in generations:
            generation.cancel()
        raise
    reply_id, created = f"cmpl-{uuid.uuid4().hex[:24]}", int(time.time())

    def envelope(choices: list[replies.CompletionChoice], **extra: Any) -> replies.Completion:
        return replies.Completion(
            id=reply_id, created=created, model=service.model_id, choices=choices, **extra
        )

    if not body.stream:
        results = await unless_client_leaves(
            request, asyncio.gather(*(collect(g, Timed(metrics)) for g in generations)), metrics
        )
        if results is None:
            return Response(status_code=CLIENT_CLOSED)
        total = Usage()
        for _, last in results:
            if last.usage:
                total.prompt_tokens += last.usage.prompt_tokens
                total.completion_tokens += last.usage.completion_tokens
                total.cached_tokens += last.usage.cached_tokens
        choices = [
            replies.CompletionChoice(
                index=i, text=text, finish_reason=finish_reason(last.finish_reason)
            )
            for i, (text, last) in enumerate(results)
        ]
        return envelope(choices, usage=_usage(total))

    generation = generations[0]
    include_usage = bool(body.stream_options and body.stream_options.include_usage)

    def event(choices: list[replies.CompletionChoice], **extra: Any) -> dict[str, str]:
        return {"data": envelope(choices, **extra).model_dump_json()}

    async def events() -> AsyncIterator[dict[str, Any]]:
        async for piece in stream_reply(generation, None, Timed(metrics)):
            if isinstance(piece, str):
                yield event([replies.CompletionChoice(index=0, text=piece, finish_reason=None)])
            elif isinstance(piece, Reply):
                yield event(
                    [replies.CompletionChoice(index=0, text="", finish_reason=piece.finish_reason)]
                )
                if include_usage:
                    yield event([], usage=_usage(piece.usage))
        yield {"data": "[DONE]"}

    return event_stream(events(), generation, metrics)


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
