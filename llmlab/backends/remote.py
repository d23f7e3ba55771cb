"""The remote engine: any OpenAI-compatible server (Ollama, vLLM, llama-server, LM Studio,
or this lab's own server), through the ``openai`` client::

    from llmlab.backends.remote import RemoteBackend
    model = RemoteBackend("smollm2", base_url="http://127.0.0.1:8000/v1")
    model.chat([{"role": "user", "content": "Hi"}], max_tokens=16).text

Usage figures come from the server (``stream_options.include_usage``) when it sends
them. ``count_tokens`` asks the server's tokenizer (llama-server's and vLLM's
``/tokenize``, llama-cpp-python's ``/extras/tokenize``); a server with none of these gets
an approximation of one token per 4 characters, and ``info()["exact_token_counts"]``
says which one is in use.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Iterator
from typing import Any

import httpx

from llmlab.backends.base import (
    Backend,
    BackendError,
    Chunk,
    GenerationParams,
    Message,
    Result,
    Timings,
    Usage,
    collect,
)
from llmlab.settings import Settings, get_settings

CHARS_PER_TOKEN = 4  # the usual rule of thumb for English text with BPE vocabularies


class RemoteBackend(Backend):
    """A model served over HTTP with the OpenAI chat/completions API."""

    name = "openai"

    def __init__(
        self,
        model: str | None = None,
        *,
        base_url: str | None = None,
        api_key: str | None = None,
        n_ctx: int | None = None,
        timeout: float = 600.0,
        settings: Settings | None = None,
    ):
        self.settings = settings or get_settings()
        base_url = base_url or self.settings.base_url
        if not base_url:
            raise ValueError("The remote backend needs a base URL (--base-url or LLMLAB_BASE_URL).")
        self.base_url = base_url.rstrip("/")
        self.api_key = api_key or self.settings.api_key
        self.model = model
        self.timeout = timeout
        self._n_ctx = n_ctx
        self._client = None
        self._models: list[dict[str, Any]] | None = None
        self._tokenize: tuple[str, str] | None | bool = False  # False: not probed yet
        self._usage_option = True

    # --- connection ---------------------------------------------------------------

    @property
    def client(self):
        """The ``openai.OpenAI`` client (created on first use)."""
        if self._client is None:
            import openai

            # The client insists on a key; local servers ignore it, so any text will do.
            self._client = openai.OpenAI(
                base_url=self.base_url,
                api_key=self.api_key or "none",
                timeout=self.timeout,
                max_retries=0,
            )
        return self._client

    def _error(self, exc: Exception) -> BackendError:
        import openai

        if isinstance(exc, openai.APIConnectionError | httpx.TransportError):
            return BackendError(
                f"Cannot reach the model server at {self.base_url} ({exc.__class__.__name__}: "
                f"{exc}). Start the server (e.g. python part5/combined_app/scripts/server.py), "
                "or fix --base-url / LLMLAB_BASE_URL, or use a local --backend."
            )
        if isinstance(exc, openai.AuthenticationError | openai.PermissionDeniedError):
            return BackendError(
                f"The server at {self.base_url} refused the API key ({exc.status_code}). "
                "Set the right key with --api-key or LLMLAB_API_KEY."
            )
        if isinstance(exc, openai.NotFoundError):
            return BackendError(
                f"The server at {self.base_url} has no model {self.model!r} ({exc.message}). "
                f"Models it serves: {', '.join(self.models()) or 'none listed'}."
            )
        if isinstance(exc, openai.APIStatusError):
            return BackendError(
                f"The server at {self.base_url} answered {exc.status_code}: {exc.message}. "
                "Check the request (prompt length, --max-tokens) and the server's log."
            )
        return BackendError(f"Request to {self.base_url} failed: {exc}")

    def _list_models(self) -> list[dict[str, Any]]:
        if self._models is None:
            try:
                self._models = [m.model_dump() for m in self.client.models.list().data]
            except Exception as exc:
                raise self._error(exc) from exc
        return self._models

    def models(self) -> list[str]:
        """Ids of the models the server offers."""
        return [m["id"] for m in self._list_models()]

    def _model_id(self) -> str:
        if self.model is None:
            ids = self.models()
            if not ids:
                raise BackendError(
                    f"The server at {self.base_url} lists no models. Name one with --model."
                )
            self.model = ids[0]
        return self.model

    @property
    def context_length(self) -> int:
        """From the server's model list where it says (vLLM, llama-server, this lab's
        server), else ``n_ctx`` / ``LLMLAB_N_CTX``."""
        if self._n_ctx:
            return self._n_ctx
        try:
            entry = next((m for m in self._list_models() if m["id"] == self._model_id()), {})
        except BackendError:
            entry = {}
        meta = entry.get("meta") or {}
        for value in (
            entry.get("context_length"),
            entry.get("max_model_len"),
            meta.get("n_ctx_train"),
        ):
            if isinstance(value, int) and value > 0:
                self._n_ctx = value
                return value
        return self.settings.n_ctx

    # --- tokens -------------------------------------------------------------------

    def _probe_tokenizer(self) -> tuple[str, str] | None:
        root = self.base_url.removesuffix("/v1")
        for url, field in ((f"{root}/tokenize", "content"), (f"{root}/extras/tokenize", "input")):
            try:
                if self._tokens_from(url, field, "a") is not None:
                    return url, field
            except httpx.TransportError as exc:
                raise self._error(exc) from exc
        return None

    def _tokens_from(self, url: str, field: str, text: str) -> int | None:
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        # "content" is llama-server's field, "prompt" + "model" vLLM's, "input" llama-cpp-python's.
        body = (
            {field: text, "prompt": text, "model": self.model}
            if field == "content"
            else {field: text}
        )
        response = httpx.post(url, json=body, headers=headers, timeout=self.timeout)
        if response.status_code != 200:
            return None
        data = response.json()
        if isinstance(data.get("count"), int):
            return data["count"]
        return len(data["tokens"]) if isinstance(data.get("tokens"), list) else None

    @property
    def exact_token_counts(self) -> bool:
        """True when the server has a tokenizer endpoint (else counts are approximate)."""
        if self._tokenize is False:
            self._model_id()
            self._tokenize = self._probe_tokenizer()
        return self._tokenize is not None

    def count_tokens(self, text: str) -> int:
        """Tokens in ``text`` by the server's tokenizer, or ``ceil(len/4)`` if it has none."""
        if self.exact_token_counts:
            count = self._tokens_from(*self._tokenize, text)
            if count is not None:
                return count
        return math.ceil(len(text) / CHARS_PER_TOKEN)

    # --- requests -----------------------------------------------------------------

    def _request(self, params: GenerationParams, raw: dict[str, Any]) -> dict[str, Any]:
        body: dict[str, Any] = {
            "model": self._model_id(),
            "max_tokens": params.max_tokens,
            "temperature": params.temperature,
            "top_p": params.top_p,
        }
        if params.seed is not None:
            body["seed"] = params.seed
        if params.stop:
            body["stop"] = params.stop
        # top_k and repeat_penalty are not OpenAI fields: send them only when asked for,
        # since strict servers reject unknown fields.
        extra = {k: raw[k] for k in ("top_k", "repeat_penalty") if raw.get(k) is not None}
        if extra:
            body["extra_body"] = extra
        return body

    def stream_chat(
        self, messages: list[Message], json_schema: dict | None = None, **params: Any
    ) -> Iterator[Chunk]:
        gen = GenerationParams.from_kwargs(**params)
        body = self._request(gen, params)
        if (
            json_schema is not None
        ):  # the server holds the reply to it (OpenAI's structured outputs)
            body["response_format"] = {
                "type": "json_schema",
                "json_schema": {
                    "name": _schema_name(json_schema),
                    "schema": json_schema,
                    "strict": True,
                },
            }
        prompt_text = "\n".join(m.get("content", "") for m in messages)
        return self._stream(
            self.client.chat.completions.create, dict(body, messages=messages), prompt_text
        )

    def stream_complete(self, prompt: str, **params: Any) -> Iterator[Chunk]:
        gen = GenerationParams.from_kwargs(**params)
        body = self._request(gen, params)
        return self._stream(self.client.completions.create, dict(body, prompt=prompt), prompt)

    def complete(self, prompt: str, **params: Any) -> Result:
        return collect(self.stream_complete(prompt, **params))

    def _open(self, create, body: dict[str, Any]):
        import openai

        if self._usage_option:
            try:
                return create(stream=True, stream_options={"include_usage": True}, **body)
            except openai.BadRequestError:
                self._usage_option = False  # an older server that rejects stream_options
        return create(stream=True, **body)

    def _stream(self, create, body: dict[str, Any], prompt_text: str) -> Iterator[Chunk]:
        # Connect before the first next(), so an unreachable server fails where the
        # stream is created.
        start = time.perf_counter()
        try:
            stream = self._open(create, body)
        except Exception as exc:
            raise self._error(exc) from exc
        return self._chunks(stream, start, prompt_text)

    def _chunks(self, stream, start: float, prompt_text: str) -> Iterator[Chunk]:
        parts: list[str] = []
        first = None
        pieces = 0
        finish = "interrupted"
        usage = None
        try:
            for event in stream:
                if event.usage is not None:
                    usage = Usage(event.usage.prompt_tokens, event.usage.completion_tokens)
                for choice in event.choices:
                    text = getattr(choice, "delta", None)
                    text = text.content if text is not None else getattr(choice, "text", None)
                    if text:
                        if first is None:
                            first = time.perf_counter() - start
                        pieces += 1
                        parts.append(text)
                        yield Chunk(text)
                    if choice.finish_reason:
                        finish = "length" if choice.finish_reason == "length" else "stop"
        except KeyboardInterrupt:
            finish = "interrupted"
        except Exception as exc:
            raise self._error(exc) from exc
        finally:
            stream.close()
        if usage is None:  # the server sent no usage: count with its tokenizer (or estimate)
            usage = Usage(self.count_tokens(prompt_text), self.count_tokens("".join(parts)))
        total = time.perf_counter() - start
        yield Chunk(
            "",
            finish,
            usage,
            Timings(first if first is not None else total, total, usage.completion_tokens),
        )

    def info(self) -> dict[str, Any]:
        """What the server offers; ``reachable`` is False (and counts unknown) when it is down."""
        try:
            exact = self.exact_token_counts
        except BackendError:
            exact = None
        return {
            "backend": self.name,
            "model": self.model,
            "base_url": self.base_url,
            "reachable": exact is not None,
            "context_length": self.context_length,
            "exact_token_counts": exact,
            "device": "remote",
            "dtype": "remote",
            "threads": None,
        }

    def close(self) -> None:
        """Close the HTTP connections (the server keeps its model)."""
        if self._client is not None:
            self._client.close()
            self._client = None


def _schema_name(schema: dict) -> str:
    """The ``json_schema.name`` OpenAI requires: the schema's title in its allowed characters."""
    name = re.sub(r"[^A-Za-z0-9_-]", "_", str(schema.get("title") or "reply"))
    return name[:64]
