"""The OpenAI-compatible routes: ``/v1/models``, ``/v1/chat/completions``, ``/v1/completions``,
``/v1/embeddings``. Any OpenAI client works against them::

    from openai import OpenAI
    client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="unused")
    client.chat.completions.create(model="smollm2-135m-instruct",
                                   messages=[{"role": "user", "content": "Hi"}])
"""

from __future__ import annotations

import asyncio
import base64
import json
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import replace
from typing import Any, TypeVar

import numpy as np
from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, Response
from sse_starlette import EventSourceResponse

from llmlab import registry
from llmlab.backends.base import Chunk, GenerationParams, Message, Usage
from part5.combined_app import jsonmode
from part5.combined_app.errors import APIError, error_body, responses
from part5.combined_app.metrics import Metrics
from part5.combined_app.schemas import (
    ChatCompletionRequest,
    CompletionRequest,
    EmbeddingRequest,
    SamplingFields,
    TextRoute,
)
from part5.combined_app.service import Generation, ModelService

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

# nginx's "client closed request": logged for a reply nobody is left to read.
CLIENT_CLOSED = 499

T = TypeVar("T")


def _service(request: Request) -> ModelService:
    return request.app.state.service


def _metrics(request: Request) -> Metrics:
    return request.app.state.metrics


def _usage(usage: Usage | None) -> dict[str, int]:
    usage = usage or Usage()
    return {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.total_tokens,
    }


def _finish(reason: str | None) -> str:
    return "length" if reason == "length" else "stop"


def _refuse_unsupported(body: SamplingFields) -> None:
    if body.n != 1:
        raise APIError(400, "Only n=1 is supported: send one request per reply.", param="n")
    if body.logprobs:
        raise APIError(400, "logprobs are not supported by this server.", param="logprobs")


def _params(body: SamplingFields, service: ModelService) -> GenerationParams:
    limit = service.settings.max_tokens_limit
    for name in ("max_tokens", "max_completion_tokens"):
        asked = getattr(body, name)
        if asked is not None and asked > limit:
            raise APIError(
                400,
                f"{name} is {asked}, over this server's limit of {limit}. Ask for fewer.",
                param=name,
                code="max_tokens_too_large",
            )
    max_tokens = (
        body.max_completion_tokens or body.max_tokens or service.settings.default_max_tokens
    )
    return GenerationParams.from_kwargs(
        max_tokens=max_tokens,
        temperature=body.temperature,
        top_p=body.top_p,
        top_k=body.top_k,
        seed=body.seed,
        stop=body.stop or [],
        repeat_penalty=body.repeat_penalty,
    )


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


# --- chat and text completions ---------------------------------------------------------------


class _Timed:
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


async def _collect(generation: Generation, timed: _Timed) -> tuple[str, Chunk]:
    parts: list[str] = []
    last = Chunk("")
    try:
        async for last in generation:
            timed.chunk(last)
            parts.append(last.text)
    finally:
        generation.cancel()  # no-op when finished; frees the slot if this task was cancelled
    return "".join(parts), last


async def _json_reply(
    service: ModelService,
    generation: Generation,
    messages: list[Message],
    params: GenerationParams,
    timed: _Timed,
) -> tuple[str, Chunk, str]:
    """The reply as a JSON object string, its last chunk, and how it was made valid (jsonmode)."""
    text, last = await _collect(generation, timed)
    fixed, how = jsonmode.repair(text)
    if how == "wrapped":  # no object at all: one greedy retry before wrapping the text
        retry = await service.submit(
            messages=messages, params=replace(params, temperature=0.0), grammar=jsonmode.GRAMMAR
        )
        text2, last2 = await _collect(retry, timed)
        fixed2, how2 = jsonmode.repair(text2)
        if last.usage and last2.usage:
            last2.usage = Usage(
                last2.usage.prompt_tokens + last.usage.prompt_tokens,
                last2.usage.completion_tokens + last.usage.completion_tokens,
            )
        if how2 != "wrapped":
            return fixed2, last2, how2
        last = last2
    return fixed, last, how


async def _client_left(request: Request) -> None:
    """Return when the client closes its connection (the body has been read by then)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _unless_client_leaves(request: Request, work: Awaitable[T], metrics: Metrics) -> T | None:
    """Await ``work`` (a whole, non-streamed reply) unless the client hangs up first (None).

    Starlette goes on running a handler whose client has gone, so without this a closed
    connection would keep its slot until ``max_tokens``. Cancelling ``work`` cancels its
    generations (``_collect`` cancels them on the way out).
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


def _stream_response(events: AsyncIterator[dict[str, Any]]) -> EventSourceResponse:
    # A comment ping every 15 s keeps proxies from closing a stream that waits in the queue.
    return EventSourceResponse(events, ping=15, sep="\n")


async def _timed_chunks(generation: Generation, timed: _Timed) -> AsyncIterator[Chunk]:
    """The generation's chunks, each fed to the metrics on the way."""
    async for chunk in generation:
        timed.chunk(chunk)
        yield chunk


async def _sse_events(
    chunks: AsyncIterator[Chunk],
    generation: Generation,
    metrics: Metrics,
    *,
    text_event: Callable[[str], str],
    finish_event: Callable[[str], str],
    usage_event: Callable[[dict[str, Any]], str] | None,
    first_event: str | None = None,
) -> AsyncIterator[dict[str, Any]]:
    """OpenAI's stream shape for chat and completions alike: text pieces, a finish event,
    usage when asked, ``[DONE]``; an error mid-stream is sent as an error event. A client
    that goes away cancels the generation, which frees its slot."""
    finished = False
    try:
        if first_event is not None:
            yield {"data": first_event}
        last = Chunk("")
        async for last in chunks:
            if last.text:
                yield {"data": text_event(last.text)}
        finished = True
        yield {"data": finish_event(_finish(last.finish_reason))}
        if usage_event is not None:
            yield {"data": usage_event(_usage(last.usage))}
        yield {"data": "[DONE]"}
    except APIError as exc:
        finished = True
        yield {"data": json.dumps(error_body(exc.status, exc.message, exc.param, exc.code))}
    finally:
        if not finished:
            metrics.cancelled.inc()
        generation.cancel()


@router.post("/chat/completions", responses={**_REPLY, **_GENERATION_ERRORS})
async def chat_completions(body: ChatCompletionRequest, request: Request):
    """A chat reply, whole or streamed as server-sent events in OpenAI's chunk format."""
    service, metrics = _service(request), _metrics(request)
    service.check_chat_model(body.model)
    _refuse_unsupported(body)
    if body.tools:
        raise APIError(400, "Tool calls are not supported by this server.", param="tools")
    messages: list[Message] = [
        {"role": "system" if m.role == "developer" else m.role, "content": m.text()}
        for m in body.messages
    ]
    json_mode = body.response_format is not None and body.response_format.type == "json_object"
    if json_mode:
        messages = jsonmode.with_instruction(messages)
    params = _params(body, service)
    prompt_tokens = len(await run_in_threadpool(service.prompt_ids, messages=messages))
    service.check_limits(prompt_tokens, params.max_tokens, "messages")
    grammar = jsonmode.GRAMMAR if json_mode else None
    generation = await service.submit(messages=messages, params=params, grammar=grammar)
    timed = _Timed(metrics)
    reply_id = f"chatcmpl-{uuid.uuid4().hex[:24]}"
    created = int(time.time())
    model = service.model_id

    def chunk_body(delta: dict[str, Any], finish: str | None) -> str:
        return json.dumps(
            {
                "id": reply_id,
                "object": "chat.completion.chunk",
                "created": created,
                "model": model,
                "system_fingerprint": None,
                "choices": [
                    {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
                ],
            }
        )

    if not body.stream:

        async def whole() -> tuple[str, Chunk, dict[str, str]]:
            if json_mode:
                text, last, how = await _json_reply(service, generation, messages, params, timed)
                return text, last, {"X-LLMLab-JSON": how}
            text, last = await _collect(generation, timed)
            return text, last, {}

        reply = await _unless_client_leaves(request, whole(), metrics)
        if reply is None:
            return Response(status_code=CLIENT_CLOSED)
        text, last, headers = reply
        content = {
            "id": reply_id,
            "object": "chat.completion",
            "created": created,
            "model": model,
            "system_fingerprint": None,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": text},
                    "logprobs": None,
                    "finish_reason": _finish(last.finish_reason),
                }
            ],
            "usage": _usage(last.usage),
        }
        return JSONResponse(content, headers=headers)

    include_usage = bool(body.stream_options and body.stream_options.include_usage)

    async def json_chunks() -> AsyncIterator[Chunk]:
        # The whole object is repaired first, then sent as one piece.
        text, last, _ = await _json_reply(service, generation, messages, params, timed)
        yield Chunk(text)
        yield Chunk("", last.finish_reason, last.usage, last.timings)

    def usage_event(usage: dict[str, Any]) -> str:
        return json.dumps({**json.loads(chunk_body({}, None)), "choices": [], "usage": usage})

    chunks = json_chunks() if json_mode else _timed_chunks(generation, timed)
    events = _sse_events(
        chunks,
        generation,
        metrics,
        first_event=chunk_body({"role": "assistant", "content": ""}, None),
        text_event=lambda text: chunk_body({"content": text}, None),
        finish_event=lambda finish: chunk_body({}, finish),
        usage_event=usage_event if include_usage else None,
    )
    return _stream_response(events)


@router.post("/completions", responses={**_REPLY, **_GENERATION_ERRORS})
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
    params = _params(body, service)
    for prompt in prompts:
        ids = await run_in_threadpool(service.prompt_ids, prompt=prompt)
        service.check_limits(len(ids), params.max_tokens, "prompt")
    generations: list[Generation] = []
    try:
        for prompt in prompts:
            generations.append(await service.submit(prompt=prompt, params=params))
    except APIError:
        for generation in generations:
            generation.cancel()
        raise
    reply_id = f"cmpl-{uuid.uuid4().hex[:24]}"
    created = int(time.time())
    model = service.model_id

    def choice(index: int, text: str, finish: str | None) -> dict[str, Any]:
        return {"index": index, "text": text, "logprobs": None, "finish_reason": finish}

    def envelope(choices: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            "id": reply_id,
            "object": "text_completion",
            "created": created,
            "model": model,
            "system_fingerprint": None,
            "choices": choices,
        }

    if not body.stream:
        results = await _unless_client_leaves(
            request,
            asyncio.gather(*(_collect(g, _Timed(metrics)) for g in generations)),
            metrics,
        )
        if results is None:
            return Response(status_code=CLIENT_CLOSED)
        total = Usage()
        for _, last in results:
            if last.usage:
                total.prompt_tokens += last.usage.prompt_tokens
                total.completion_tokens += last.usage.completion_tokens
        content = envelope(
            [choice(i, text, _finish(last.finish_reason)) for i, (text, last) in enumerate(results)]
        )
        content["usage"] = _usage(total)
        return content

    generation = generations[0]
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    timed = _Timed(metrics)

    events = _sse_events(
        _timed_chunks(generation, timed),
        generation,
        metrics,
        text_event=lambda text: json.dumps(envelope([choice(0, text, None)])),
        finish_event=lambda finish: json.dumps(envelope([choice(0, "", finish)])),
        usage_event=(lambda usage: json.dumps({**envelope([]), "usage": usage}))
        if include_usage
        else None,
    )
    return _stream_response(events)


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
