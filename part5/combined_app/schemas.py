"""Request bodies of the OpenAI-compatible routes, the document routes and the batch routes.

Only what the lab supports is accepted; fields OpenAI defines that the lab cannot honour
(``n`` > 1, ``logprobs``, ``tools``) are refused with a 400 that says so, rather than
silently ignored. Unknown extra fields are ignored, as OpenAI-compatible servers do.

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


class _TextRequest(Request):
    async def json(self) -> Any:
        data = await super().json()
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


# A string with something in it besides spaces (the pattern says the same for the schema).
Text = Annotated[
    str, AfterValidator(_has_text), WithJsonSchema({"type": "string", "pattern": r"\S"})
]
NonEmpty = Annotated[str, Field(min_length=1)]

# llmlab.rag.store.check_name's rule, as the route checks it (with its message): 3-512
# letters, digits, '.', '_' or '-', a letter or digit at each end, no '..'.
COLLECTION_PATTERN = r"^[A-Za-z0-9](?:\.?[A-Za-z0-9_-])*\.?[A-Za-z0-9]$"
CollectionName = Annotated[
    str,
    Path(
        description="3-512 letters, digits, '.', '_' or '-', starting and ending with a "
        "letter or digit, no '..'.",
        json_schema_extra={"pattern": COLLECTION_PATTERN, "minLength": 3, "maxLength": 512},
    ),
]


class _Lenient(BaseModel):
    model_config = ConfigDict(extra="ignore")


class TextPart(_Lenient):
    """One part of a message's content: only text (no images or audio)."""

    type: Literal["text"]
    text: str


class ChatMessage(_Lenient):
    """One turn. ``content`` may be a string or OpenAI's list of text parts."""

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = ""

    def text(self) -> str:
        """The content as plain text (text parts joined)."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class StreamOptions(_Lenient):
    include_usage: bool = False


class ResponseFormat(_Lenient):
    type: Literal["text", "json_object"] = "text"


class SamplingFields(_Lenient):
    """Sampling settings both completion routes share."""

    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=0)
    seed: int | None = None
    stop: str | Annotated[list[str], Field(max_length=4)] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(1, ge=1)
    logprobs: bool | int | None = None
    repeat_penalty: float | None = Field(None, gt=0)

    @field_validator("stop")
    @classmethod
    def _stops(cls, value: str | list[str] | None) -> list[str] | None:
        if value is None:
            return None
        stops = [value] if isinstance(value, str) else value
        return [s for s in stops if s]


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    response_format: ResponseFormat | None = None
    tools: list[dict[str, Any]] | None = None


class CompletionRequest(SamplingFields):
    prompt: NonEmpty | Annotated[list[NonEmpty], Field(min_length=1)]
    echo: bool = False
    suffix: str | None = None


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

    id: str | int | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None


class BatchRequest(_Lenient):
    """A batch job: prompts (plain strings or items) and the sampling settings for all of them."""

    prompts: list[str | BatchItem] = Field(min_length=1)
    system: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    seed: int | None = None
    stop: list[str] | None = None


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
                "BatchRequest",
                "AskRequest",
            ):
                for field in ("max_tokens", "max_completion_tokens"):
                    if field in models[name]["properties"]:
                        _cap(
                            models[name]["properties"][field], "maximum", settings.max_tokens_limit
                        )
            _cap(
                models["BatchRequest"]["properties"]["prompts"],
                "maxItems",
                settings.max_batch_prompts,
            )
        return app.openapi_schema

    app.openapi = openapi
