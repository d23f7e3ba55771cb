"""Request bodies of the OpenAI-compatible routes, the document routes and the batch routes.

Only what the lab supports is accepted; fields OpenAI defines that the lab cannot honour
(``echo``, ``suffix``, ``previous_response_id``) are refused with a 400 that says so, rather
than silently ignored. Unknown extra fields are ignored, as OpenAI-compatible servers do.

The rules are declared here (lengths, ranges, patterns), so ``/openapi.json`` states what
the server accepts. Every route reads its JSON body through :class:`TextRoute`, which
refuses text that is not Unicode (a lone surrogate such as ``"\\ud83d"``) before the route runs.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Coroutine
from typing import Annotated, Any, Literal

from fastapi import FastAPI, Path, Request, Response
from fastapi.routing import APIRoute
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, WithJsonSchema, field_validator
from pydantic_core import PydanticCustomError

from part5.combined_app.config import ServerSettings
from part5.combined_app.errors import APIError, document_errors, field_path
from part5.combined_app.middleware import OPEN_PATHS


def lone_surrogate(value: Any, where: tuple = ()) -> tuple[tuple, str] | None:
    """Where in parsed JSON a string (or key) holds a lone UTF-16 surrogate, and which one."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as exc:
            return where, value[exc.start]
    elif isinstance(value, dict):
        for key, item in value.items():
            found = lone_surrogate(key, (*where, key)) or lone_surrogate(item, (*where, key))
            if found:
                return found
    elif isinstance(value, list):
        for index, item in enumerate(value):
            found = lone_surrogate(item, (*where, index))
            if found:
                return found
    return None


def _number(text: str) -> float | int:
    # JSON Schema reads 1.0 as the integer 1; so do the (strict) models.
    value = float(text)
    return int(value) if value.is_integer() else value


class _TextRequest(Request):
    async def json(self) -> Any:
        if not hasattr(self, "_json"):
            self._json = json.loads(await self.body(), parse_float=_number)
        data = self._json
        found = lone_surrogate(data)
        if found:
            where, char = found
            param = field_path(where)
            raise APIError(
                400,
                f"Invalid value for '{param or 'body'}': it holds a lone surrogate "
                f"({json.dumps(char)}), which is not a character. Send UTF-8 text, or pair "
                "the escape with its other half (as in \\ud83d\\ude00).",
                param=param,
                code="invalid_unicode",
            )
        return data


class TextRoute(APIRoute):
    """A route whose JSON body must be text: a lone surrogate is a 400 before the route runs.

    Every router of the app uses it (``APIRouter(route_class=TextRoute)``).
    """

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def checked(request: Request) -> Response:
            return await handler(_TextRequest(request.scope, request.receive))

        return checked


def _has_text(value: str) -> str:
    if not value.strip():
        raise PydanticCustomError("empty_text", "there is no text in it, only spaces or nothing")
    return value


# What str.strip() removes, spelled out: regex engines disagree on what "\\s" covers.
SPACES = "".join(c for c in map(chr, range(0x3001)) if c.isspace())

# A string with something in it besides spaces (the pattern says the same for the schema).
Text = Annotated[
    str, AfterValidator(_has_text), WithJsonSchema({"type": "string", "pattern": f"[^{SPACES}]"})
]
NonEmpty = Annotated[str, Field(min_length=1)]

# llmlab.rag.store.check_name's rule, as the route checks it (with its message): 3-512
# letters, digits, '.', '_' or '-', a letter or digit at each end, no '..'.
COLLECTION_PATTERN = r"^[A-Za-z0-9](?:\.?[A-Za-z0-9_-])*\.?[A-Za-z0-9]$"
# documents.safe_file_name's refusals, for the schema: no '/', '\\' or NUL, and something
# besides spaces and dots.
FileName = Annotated[
    str,
    Path(json_schema_extra={"pattern": f"^[^/\\\\\x00]*[^/\\\\\x00.{SPACES}][^/\\\\\x00]*$"}),
]
CollectionName = Annotated[
    str,
    Path(
        description="3-512 letters, digits, '.', '_' or '-', starting and ending with a "
        "letter or digit, no '..'.",
        json_schema_extra={"pattern": COLLECTION_PATTERN, "minLength": 3, "maxLength": 512},
    ),
]


class _Lenient(BaseModel):
    # strict: a JSON value of another type is refused (0 is not false), as the schema says.
    model_config = ConfigDict(extra="ignore", strict=True)


class TextPart(_Lenient):
    """One part of a message's content: only text (no images or audio)."""

    type: Literal["text"]
    text: str


class FunctionCall(_Lenient):
    """The function an assistant turn called: its name and its arguments as JSON text."""

    name: str
    arguments: str


class AssistantToolCall(_Lenient):
    """One tool call of an earlier assistant turn, as OpenAI sends it back."""

    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class Turn(_Lenient):
    """One turn of a plain conversation. ``content`` may be a string or OpenAI's list of text parts."""

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = ""

    def text(self) -> str:
        """The content as plain text (text parts joined)."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class ChatMessage(Turn):
    """One turn of a chat: also an assistant turn with ``tool_calls``, or a ``tool`` turn that
    answers one of them by ``tool_call_id``."""

    role: Literal["system", "developer", "user", "assistant", "tool"]
    name: str | None = None
    tool_calls: list[AssistantToolCall] | None = None
    tool_call_id: str | None = None

    def as_message(self) -> dict[str, Any]:
        """The turn as an OpenAI message dict (``developer`` read as ``system``)."""
        message: dict[str, Any] = {
            "role": "system" if self.role == "developer" else self.role,
            "content": self.text(),
        }
        if self.tool_calls:
            message["tool_calls"] = [call.model_dump() for call in self.tool_calls]
        if self.tool_call_id is not None:
            message["tool_call_id"] = self.tool_call_id
        return message


class StreamOptions(_Lenient):
    include_usage: bool = False


# OpenAI's rule for function (and schema) names.
NAME_PATTERN = r"^[A-Za-z0-9_-]{1,64}$"
Name = Annotated[str, Field(pattern=NAME_PATTERN)]


class TextFormat(_Lenient):
    """Plain text replies (the default)."""

    type: Literal["text"]


class JSONObjectFormat(_Lenient):
    """Replies that are one JSON object (any keys), held by llama.cpp's JSON grammar."""

    type: Literal["json_object"]


class JSONSchemaSpec(_Lenient):
    """A JSON schema the reply must follow (held by a grammar made from it)."""

    name: Name
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None


class JSONSchemaFormat(_Lenient):
    type: Literal["json_schema"]
    json_schema: JSONSchemaSpec


ResponseFormat = Annotated[
    TextFormat | JSONObjectFormat | JSONSchemaFormat, Field(discriminator="type")
]


class FunctionDefinition(_Lenient):
    """A tool the model may call: its name, what it does, and its parameters' JSON schema."""

    name: Name
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class ChatTool(_Lenient):
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(_Lenient):
    name: str


class NamedToolChoice(_Lenient):
    """``{"type": "function", "function": {"name": ...}}``: call this tool."""

    type: Literal["function"]
    function: NamedFunction


ToolChoice = Literal["none", "auto", "required"] | NamedToolChoice


# Below these the sampler's numbers overflow (logits / 1e-300 is inf, then NaN): the fuzz
# test found that such a request stopped the engine. 0 stays greedy decoding.
MIN_TEMPERATURE = 0.001
MIN_REPEAT_PENALTY = 0.01


def _temperature(value: float) -> float:
    if 0 < value < MIN_TEMPERATURE:
        raise PydanticCustomError(
            "temperature_too_small",
            f"use 0 for greedy decoding, or at least {MIN_TEMPERATURE} for sampling",
        )
    return value


Temperature = Annotated[
    float,
    Field(ge=0, le=2),
    AfterValidator(_temperature),
    WithJsonSchema(
        {
            "anyOf": [
                {"type": "number", "enum": [0]},
                {"type": "number", "minimum": MIN_TEMPERATURE, "maximum": 2},
            ]
        }
    ),
]


def refused(*allowed: Any) -> WithJsonSchema:
    """The schema of a field OpenAI defines that the lab cannot honour: only ``allowed`` values.

    The route refuses the others with a 400 that says why (so the check is not here).
    """
    return WithJsonSchema({"enum": list(allowed)})


class Sampling(_Lenient):
    """The sampling settings every generating route takes (chat, completions, batch jobs)."""

    max_tokens: int | None = Field(None, ge=1)
    temperature: Temperature | None = None
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=0)
    seed: int | None = Field(None, ge=0)
    stop: str | Annotated[list[str], Field(max_length=4)] | None = None
    repeat_penalty: float | None = Field(None, ge=MIN_REPEAT_PENALTY)

    @field_validator("stop")
    @classmethod
    def _stops(cls, value: str | list[str] | None) -> list[str] | None:
        if value is None:
            return None
        stops = [value] if isinstance(value, str) else value
        return [s for s in stops if s]

    def length_fields(self) -> list[tuple[str, int | None]]:
        """The fields that ask for the reply's length and their values, the one that wins first."""
        return [("max_tokens", self.max_tokens)]


class LoraScale(_Lenient):
    """One adapter for a request, in llama.cpp server's shape: its id and its scale."""

    id: int = Field(ge=0)
    scale: float = 1.0


class SamplingFields(Sampling):
    """What both OpenAI completion routes share."""

    model: str | None = None
    max_completion_tokens: int | None = Field(None, ge=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(1, ge=1, description="Choices from the one prompt (at most the server's slots).")
    lora: list[LoraScale] | None = Field(
        None, description="LoRA adapters for this request, by their ids in GET /lora-adapters."
    )
    keep_alive: float | str | None = Field(
        None,
        description="Ollama's keep_alive for a model loaded on demand: seconds or '5m'; 0 "
        "unloads it once this reply is done, -1 keeps it (default: the server's --keep-alive).",
    )
    cache: bool = Field(
        True,
        description="Lab extension: false keeps this request out of the response cache "
        "(only deterministic requests use it, and only when the server has one).",
    )

    def length_fields(self) -> list[tuple[str, int | None]]:
        return [("max_completion_tokens", self.max_completion_tokens), *super().length_fields()]

    def logprob_count(self) -> int | None:
        """How many alternatives each token's logprobs list (None: no logprobs asked for)."""
        return None


# OpenAI's limit: at most 20 alternatives per position.
MAX_TOP_LOGPROBS = 20


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    response_format: ResponseFormat | None = None
    tools: list[ChatTool] | None = None
    tool_choice: ToolChoice | None = None
    parallel_tool_calls: bool | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)

    def logprob_count(self) -> int | None:
        """``top_logprobs`` alternatives when ``logprobs`` is true (a 400 without it)."""
        if not self.logprobs:
            if self.top_logprobs:
                raise APIError(
                    400,
                    "top_logprobs needs logprobs: true. Send both, or leave top_logprobs out.",
                    param="top_logprobs",
                )
            return None
        return self.top_logprobs or 0


class CompletionRequest(SamplingFields):
    # A stream takes one prompt: the route refuses a list of several with stream on.
    model_config = ConfigDict(
        json_schema_extra={
            "if": {"properties": {"stream": {"const": True}}, "required": ["stream"]},
            "then": {"properties": {"prompt": {"anyOf": [{"type": "string"}, {"maxItems": 1}]}}},
        }
    )

    prompt: NonEmpty | Annotated[list[NonEmpty], Field(min_length=1)]
    echo: Annotated[bool, refused(False)] = False
    suffix: Annotated[str | None, refused("", None)] = None
    logprobs: int | None = Field(None, ge=0, le=5)

    def logprob_count(self) -> int | None:
        return self.logprobs


class TokenizeRequest(_Lenient):
    """``POST /tokenize``, in llama.cpp server's shape."""

    content: str
    add_special: bool = Field(False, description="Add BOS (and EOS) where the model wants them.")
    parse_special: bool = Field(True, description="Read control-token text as those tokens.")
    with_pieces: bool = Field(False, description="Return {id, piece} objects, not bare ids.")


class DetokenizeRequest(_Lenient):
    """``POST /detokenize``: token ids back to text."""

    tokens: list[Annotated[int, Field(ge=0)]]


# --- the Responses API (stateless) ----------------------------------------------------------


class InputText(_Lenient):
    """A text part of an input message (``output_text`` in an earlier assistant turn)."""

    type: Literal["input_text", "output_text"]
    text: str


class InputMessage(_Lenient):
    type: Literal["message"] = "message"
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[InputText]

    def text(self) -> str:
        """The content as plain text (parts joined)."""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class FunctionCallInput(_Lenient):
    """A call the model made in an earlier turn, sent back with its result."""

    type: Literal["function_call"]
    call_id: str
    name: str
    arguments: str
    id: str | None = None
    status: str | None = None


class FunctionCallOutput(_Lenient):
    """A tool's result for the call ``call_id``."""

    type: Literal["function_call_output"]
    call_id: str
    output: str
    id: str | None = None
    status: str | None = None


InputItem = InputMessage | FunctionCallInput | FunctionCallOutput


class ResponseTool(_Lenient):
    """A function tool in the Responses API's flat shape (no ``function`` wrapper)."""

    type: Literal["function"]
    name: Name
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class ResponseToolChoice(_Lenient):
    type: Literal["function"]
    name: str


class ResponseJSONSchema(_Lenient):
    """``text.format`` ``json_schema``: the name and schema sit beside ``type``."""

    type: Literal["json_schema"]
    name: Name
    schema_: dict[str, Any] = Field(alias="schema")
    description: str | None = None
    strict: bool | None = None


class ResponseText(_Lenient):
    format: Annotated[
        TextFormat | JSONObjectFormat | ResponseJSONSchema, Field(discriminator="type")
    ] = TextFormat(type="text")


class ResponsesRequest(Sampling):
    """``POST /v1/responses``: stateless (nothing is stored, ``previous_response_id`` is refused)."""

    model: str | None = None
    input: str | Annotated[list[InputItem], Field(min_length=1)]
    instructions: str | None = None
    max_output_tokens: int | None = Field(None, ge=1)
    stream: bool = False
    text: ResponseText | None = None
    tools: list[ResponseTool] | None = None
    tool_choice: Literal["none", "auto", "required"] | ResponseToolChoice | None = None
    parallel_tool_calls: bool | None = None
    store: bool | None = None
    metadata: dict[str, str] | None = None
    previous_response_id: Annotated[str | None, refused(None)] = None

    def length_fields(self) -> list[tuple[str, int | None]]:
        return [("max_output_tokens", self.max_output_tokens), *super().length_fields()]


MAX_EMBEDDING_INPUTS = 2048


class EmbeddingRequest(_Lenient):
    model: str | None = None
    input: Text | Annotated[list[Text], Field(min_length=1, max_length=MAX_EMBEDDING_INPUTS)] = (
        Field(description="A text or a list of texts (token ids are not supported).")
    )
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = None


class AskRequest(_Lenient):
    """A question for the document QA routes."""

    question: str = Field(min_length=1, max_length=4000)
    top_k: int = Field(4, ge=1, le=20)
    max_tokens: int | None = Field(None, ge=1, description="Default: the server's default.")


class BatchItem(_Lenient):
    """One prompt of a batch job: a ``prompt`` or a list of ``messages``, and an optional id."""

    model_config = ConfigDict(
        json_schema_extra={
            "anyOf": [
                {"required": ["prompt"], "properties": {"prompt": {"type": "string"}}},
                {"required": ["messages"], "properties": {"messages": {"type": "array"}}},
            ]
        }
    )

    id: str | int | None = None
    prompt: str | None = None
    messages: list[Turn] | None = None


class BatchRequest(Sampling):
    """A batch job: prompts (plain strings or items) and the sampling settings for all of them."""

    prompts: list[str | BatchItem] = Field(min_length=1)
    system: str | None = None


def _cap(prop: dict[str, Any], key: str, value: int) -> None:
    """Set ``key`` on the integer/array members of one property's schema."""
    for member in prop.get("anyOf", [prop]):
        if member.get("type") in ("integer", "array"):
            member[key] = value


def install_openapi(app: FastAPI, settings: ServerSettings) -> None:
    """Make ``/openapi.json`` say what the app does: its errors in OpenAI's shape (400, not
    FastAPI's 422; 401 and 413 from the middleware) and this server's own limits."""
    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = build()
            document_errors(schema, api_key=bool(settings.api_key), open_paths=OPEN_PATHS)
            models = schema["components"]["schemas"]
            for name in (
                "ChatCompletionRequest",
                "CompletionRequest",
                "ResponsesRequest",
                "BatchRequest",
                "AskRequest",
            ):
                for field in ("max_tokens", "max_completion_tokens", "max_output_tokens"):
                    if field in models[name]["properties"]:
                        _cap(
                            models[name]["properties"][field], "maximum", settings.max_tokens_limit
                        )
            for name in ("ChatCompletionRequest", "CompletionRequest"):
                properties = models[name]["properties"]
                _cap(properties["n"], "maximum", settings.parallel)
                if not settings.lora:  # nothing to ask for
                    _cap(properties["lora"], "maxItems", 0)
            if settings.lora:
                _cap(models["LoraScale"]["properties"]["id"], "maximum", len(settings.lora) - 1)
            _cap(
                models["BatchRequest"]["properties"]["prompts"],
                "maxItems",
                settings.max_batch_prompts,
            )
        return app.openapi_schema

    app.openapi = openapi
