"""``POST /v1/responses``: OpenAI's Responses API, stateless (nothing is stored between calls)::

    from openai import OpenAI
    client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="unused")
    reply = client.responses.create(model="smollm2-135m-instruct", input="Name three colours.",
                                    instructions="Answer briefly.", max_output_tokens=32)
    reply.output_text

``input`` is a text or a list of items (messages, earlier ``function_call`` items and their
``function_call_output`` results); ``text.format`` ``json_schema`` holds the reply to a
schema and ``tools`` (the flat ``{"type": "function", "name", "parameters"}`` shape) lets the
model answer with ``function_call`` items. It runs as a chat completion does (same grammar,
same engine); a stream is the Responses API's typed events (``response.created``,
``response.output_text.delta``, ..., ``response.completed``).
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response

from llmlab.structured import ToolCall
from part5.combined_app import replies
from part5.combined_app.errors import APIError
from part5.combined_app.errors import responses as error_responses
from part5.combined_app.generation import (
    CLIENT_CLOSED,
    ChatJob,
    Reply,
    Timed,
    Where,
    argument_pieces,
    event_stream,
    plan_chat,
    read_reply,
    sampling_params,
    start_chat,
    stream_reply,
    streamed_reply_doc,
    unless_client_leaves,
)
from part5.combined_app.models import Hints
from part5.combined_app.schemas import (
    FunctionCallInput,
    InputMessage,
    JSONObjectFormat,
    ResponseJSONSchema,
    ResponsesRequest,
    TextRoute,
)
from part5.combined_app.service import ModelService

router = APIRouter(prefix="/v1", tags=["OpenAI-compatible"], route_class=TextRoute)

_REPLY = streamed_reply_doc("Events: response.created ... response.completed.")
WHERE = Where(messages="input", schema="text.format.schema")


def _messages(body: ResponsesRequest) -> list[dict[str, Any]]:
    """The request's instructions and input as OpenAI chat messages."""
    out: list[dict[str, Any]] = []
    if body.instructions:
        out.append({"role": "system", "content": body.instructions})
    items = (
        [InputMessage(role="user", content=body.input)]
        if isinstance(body.input, str)
        else body.input
    )
    for item in items:
        if isinstance(item, InputMessage):
            role = "system" if item.role == "developer" else item.role
            out.append({"role": role, "content": item.text()})
        elif isinstance(item, FunctionCallInput):
            call = {
                "id": item.call_id,
                "type": "function",
                "function": {"name": item.name, "arguments": item.arguments},
            }
            if out and out[-1].get("tool_calls"):  # calls made in one turn go together
                out[-1]["tool_calls"].append(call)
            else:
                out.append({"role": "assistant", "content": "", "tool_calls": [call]})
        else:
            out.append({"role": "tool", "tool_call_id": item.call_id, "content": item.output})
    return out


def _job(body: ResponsesRequest, service: ModelService) -> ChatJob:
    format_ = body.text.format if body.text else None
    choice = body.tool_choice or "auto"
    tools = [
        {
            "type": "function",
            "function": tool.model_dump(
                include={"name", "description", "parameters"}, exclude_none=True
            ),
        }
        for tool in body.tools or []
    ]
    return plan_chat(
        _messages(body),
        sampling_params(body, service.settings),
        json_object=isinstance(format_, JSONObjectFormat),
        schema=format_.schema_ if isinstance(format_, ResponseJSONSchema) else None,
        tools=tools,
        tool_choice=choice if isinstance(choice, str) else choice.name,
        parallel_tool_calls=body.parallel_tool_calls is not False,
        where=WHERE,
        tool_format=service.tool_format,
    )


class _Ids:
    """The ids of one response and of its output items (known before any is streamed)."""

    def __init__(self) -> None:
        self.response = f"resp_{uuid.uuid4().hex}"
        self.message = f"msg_{uuid.uuid4().hex}"
        self.created = int(time.time())

    @staticmethod
    def call(call: ToolCall) -> str:
        return "fc_" + call.id.removeprefix("call_")


def _message(ids: _Ids, text: str, status: str = "completed") -> replies.OutputMessage:
    content = [replies.OutputText(text=text)] if status != "in_progress" else []
    return replies.OutputMessage(id=ids.message, status=status, content=content)


def _call_item(call: ToolCall, status: str = "completed") -> replies.FunctionCallItem:
    arguments = call.arguments if status == "completed" else ""
    return replies.FunctionCallItem(
        id=_Ids.call(call), call_id=call.id, name=call.name, arguments=arguments, status=status
    )


def _response(
    body: ResponsesRequest, ids: _Ids, model: str, reply: Reply | None
) -> replies.Response:
    """The response object: in progress (``reply`` None), or finished with its output."""
    output: list[replies.OutputMessage | replies.FunctionCallItem] = []
    status, incomplete, usage = "in_progress", None, None
    if reply is not None:
        cut = reply.finish_reason == "length"
        status = "incomplete" if cut else "completed"
        incomplete = replies.IncompleteDetails(reason="max_output_tokens") if cut else None
        if reply.content or not reply.tool_calls:
            output.append(_message(ids, reply.content or "", status))
        output += [_call_item(call) for call in reply.tool_calls]
        usage = replies.ResponseUsage(
            input_tokens=reply.usage.prompt_tokens,
            output_tokens=reply.usage.completion_tokens,
            total_tokens=reply.usage.total_tokens,
            input_tokens_details=replies.InputTokensDetails(
                cached_tokens=reply.usage.cached_tokens
            ),
        )
    text_format = body.text.model_dump(by_alias=True, exclude_none=True) if body.text else None
    return replies.Response(
        id=ids.response,
        created_at=ids.created,
        status=status,
        model=model,
        output=output,
        output_text="".join(
            part.text for item in output if item.type == "message" for part in item.content
        ),
        usage=usage,
        incomplete_details=incomplete,
        instructions=body.instructions,
        max_output_tokens=body.max_output_tokens,
        temperature=body.temperature,
        top_p=body.top_p,
        tools=[tool.model_dump(exclude_none=True) for tool in body.tools or []],
        tool_choice=body.tool_choice.model_dump()
        if body.tool_choice is not None and not isinstance(body.tool_choice, str)
        else body.tool_choice or "auto",
        parallel_tool_calls=body.parallel_tool_calls is not False,
        **({"text": text_format} if text_format else {}),
        metadata=body.metadata or {},
    )


async def _events(
    body: ResponsesRequest,
    ids: _Ids,
    model: str,
    pieces: AsyncIterator[str | ToolCall | Reply],
    plain: bool,
) -> AsyncIterator[dict[str, Any]]:
    """The Responses API's stream: each event as ``event: <type>`` and its JSON ``data``."""
    sequence = 0

    def event(kind: str, **fields: Any) -> dict[str, str]:
        nonlocal sequence
        data = {"type": kind, "sequence_number": sequence, **fields}
        sequence += 1
        return {"event": kind, "data": json.dumps(data)}

    def dump(model_: Any) -> dict[str, Any]:
        return model_.model_dump(mode="json", by_alias=True)

    message = {"item_id": ids.message, "content_index": 0}
    index = 0  # of the output item being written
    text: list[str] = []
    opened = False

    def open_message() -> list[dict[str, str]]:
        return [
            event(
                "response.output_item.added",
                output_index=index,
                item=dump(_message(ids, "", "in_progress")),
            ),
            event(
                "response.content_part.added",
                output_index=index,
                **message,
                part=dump(replies.OutputText(text="")),
            ),
        ]

    def close_message(status: str) -> list[dict[str, str]]:
        whole = "".join(text)
        return [
            event(
                "response.output_text.done", output_index=index, **message, text=whole, logprobs=[]
            ),
            event(
                "response.content_part.done",
                output_index=index,
                **message,
                part=dump(replies.OutputText(text=whole)),
            ),
            event(
                "response.output_item.done",
                output_index=index,
                item=dump(_message(ids, whole, status)),
            ),
        ]

    started = dump(_response(body, ids, model, None))
    yield event("response.created", response=started)
    yield event("response.in_progress", response=started)
    if plain:
        for item in open_message():
            yield item
        opened = True
    async for piece in pieces:
        if isinstance(piece, str):
            if not opened:
                for item in open_message():
                    yield item
                opened = True
            text.append(piece)
            yield event(
                "response.output_text.delta",
                output_index=index,
                **message,
                delta=piece,
                logprobs=[],
            )
            continue
        if opened:
            status = (
                "incomplete"
                if isinstance(piece, Reply) and piece.finish_reason == "length"
                else "completed"
            )
            for item in close_message(status):
                yield item
            opened, index = False, index + 1
        if isinstance(piece, ToolCall):
            item_id = _Ids.call(piece)
            yield event(
                "response.output_item.added",
                output_index=index,
                item=dump(_call_item(piece, "in_progress")),
            )
            for part in argument_pieces(piece.arguments):
                yield event(
                    "response.function_call_arguments.delta",
                    item_id=item_id,
                    output_index=index,
                    delta=part,
                )
            yield event(
                "response.function_call_arguments.done",
                item_id=item_id,
                output_index=index,
                name=piece.name,
                arguments=piece.arguments,
            )
            yield event(
                "response.output_item.done", output_index=index, item=dump(_call_item(piece))
            )
            index += 1
        elif isinstance(piece, Reply):
            if not piece.tool_calls and index == 0 and not plain and not text:
                for item in [*open_message(), *close_message("completed")]:
                    yield item
            final = dump(_response(body, ids, model, piece))
            kind = (
                "response.incomplete" if final["status"] == "incomplete" else "response.completed"
            )
            yield event(kind, response=final)


@router.post(
    "/responses",
    response_model=replies.Response,
    responses={**_REPLY, **error_responses(400, 404, 500, 503)},
)
async def create_response(body: ResponsesRequest, request: Request):
    """A model response (text, JSON held by a schema, or function calls), whole or streamed."""
    metrics, pool = request.app.state.metrics, request.app.state.models
    name, via = pool.choose(body.model, Hints(tools=bool(body.tools)))
    pool.require_chat(name)
    if body.previous_response_id is not None:
        raise APIError(
            400,
            "This server is stateless: it keeps no earlier responses. Send the conversation "
            "so far in input instead of previous_response_id.",
            param="previous_response_id",
        )
    async with pool.use(name, None) as service:
        job = _job(body, service)
        generation = await start_chat(service, job, param="input")
    metrics.routed.labels(model=name, via=via).inc()
    ids = _Ids()
    if not body.stream:
        reply = await unless_client_leaves(
            request, read_reply(generation, job, Timed(metrics)), metrics
        )
        if reply is None:
            return Response(status_code=CLIENT_CLOSED)
        return _response(body, ids, name, reply)
    pieces = stream_reply(generation, job, Timed(metrics))
    events = _events(body, ids, name, pieces, plain=not job.tools)
    return event_stream(events, generation, metrics)
