"""Request bodies of the OpenAI-compatible routes, the document routes and the batch routes.

Only what the lab supports is accepted; fields OpenAI defines that the lab cannot honour
(``n`` > 1, ``logprobs``, ``tools``) are refused with a 400 that says so, rather than
silently ignored. Unknown extra fields are ignored, as OpenAI-compatible servers do.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator


class _Lenient(BaseModel):
    model_config = ConfigDict(extra="ignore")


class ChatMessage(_Lenient):
    """One turn. ``content`` may be a string or OpenAI's list of text parts."""

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[dict[str, Any]] | None = ""

    def text(self) -> str:
        """The content as plain text (text parts joined; other part types refused)."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        parts = []
        for part in self.content:
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise ValueError("only text content parts are supported (no images or audio)")
            parts.append(part["text"])
        return "".join(parts)


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
    stop: str | list[str] | None = None
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
        if len(stops) > 4:
            raise ValueError("at most 4 stop sequences")
        return [s for s in stops if s]


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    response_format: ResponseFormat | None = None
    tools: list[dict[str, Any]] | None = None


class CompletionRequest(SamplingFields):
    prompt: str | list[str]
    echo: bool = False
    suffix: str | None = None


class EmbeddingRequest(_Lenient):
    model: str | None = None
    input: str | list[str] | list[int] | list[list[int]]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = None


class AskRequest(_Lenient):
    """A question for the document QA routes."""

    question: str = Field(min_length=1, max_length=4000)
    top_k: int = Field(4, ge=1, le=20)
    max_tokens: int = Field(200, ge=1)


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
