"""Errors in OpenAI's shape ``{"error": {"message", "type", "param", "code"}}``, for every route.

Raise :class:`APIError` anywhere in a route; :func:`install_handlers` also converts
FastAPI's validation errors (400), unknown routes (404) and wrong methods (405, with
``Allow``) to the same shape, so an OpenAI client shows the message as is::

    raise APIError(404, "Unknown model 'x'. Available: ...", param="model", code="model_not_found")

Routes declare the errors they answer with :func:`responses`, so ``/openapi.json`` lists
them with this shape (:func:`document_errors` adds the ones every route can give).
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

# The ``type`` OpenAI's API uses for each status code.
TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    409: "invalid_request_error",
    413: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    503: "server_error",
}

# What each error status means on this server (the descriptions in /openapi.json).
MEANINGS = {
    400: "Invalid request: the message names the parameter and what to send instead.",
    401: "Missing or wrong API key (the server was started with --api-key).",
    404: "Unknown model, collection, file, batch or route.",
    413: "The request body is over the server's size limit.",
    500: "The model failed, or could not be loaded.",
    503: "The model is still loading, or every slot is busy and the queue is full (Retry-After).",
}


class ErrorDetail(BaseModel):
    """The fields of an error, as OpenAI's API sends them."""

    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(BaseModel):
    """The body of every error response."""

    error: ErrorDetail


class APIError(StarletteHTTPException):
    """An error a route returns to the client: status, message, and OpenAI's ``param``/``code``.

    An HTTPException, so FastAPI passes it on as is even from where it reads the body.
    """

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(status, message, headers)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers or {}

    def __str__(self) -> str:
        return self.message


def responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """The ``responses=`` of a route that can answer these error statuses (OpenAI's shape)."""
    return {
        status: {"model": ErrorResponse, "description": MEANINGS[status]} for status in statuses
    }


def error_body(
    status: int, message: str, param: str | None = None, code: str | None = None
) -> dict:
    """The JSON body of an error response."""
    return {
        "error": {
            "message": message,
            "type": TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error"),
            "param": param,
            "code": code,
        }
    }


def error_response(
    status: int,
    message: str,
    param: str | None = None,
    code: str | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    """A JSONResponse with an OpenAI-shaped error body."""
    return JSONResponse(error_body(status, message, param, code), status, headers=headers)


# Where pydantic names the member of a union that failed ("str", "list[TextPart]"): not a field.
_UNION_MEMBERS = {"str", "int", "float", "bool", "none", "list", "dict"}


def field_path(loc: tuple | list) -> str | None:
    """``messages.0.content`` from a pydantic location, without the ``body``/union parts."""
    parts = [
        str(p)
        for p in loc
        if p not in ("body", "query", "path")
        and not (isinstance(p, str) and (p in _UNION_MEMBERS or "[" in p))
    ]
    return ".".join(parts) or None


def _describe_validation(exc: RequestValidationError) -> tuple[str, str | None]:
    errors = exc.errors()
    if not errors:
        return "The request is not valid.", None
    # A value that fits no member of a union fails once per member: the deepest is the telling one.
    first: dict[str, Any] = max(errors, key=lambda e: len(e.get("loc", ())))
    if first.get("type") == "json_invalid":
        return "The request body is not valid JSON.", None
    param = field_path(first.get("loc", ()))
    where = f" '{param}'" if param else ""
    more = f" (and {len(errors) - 1} more problem(s))" if len(errors) > 1 else ""
    return f"Invalid value for{where}: {first.get('msg', 'invalid')}{more}.", param


_METHODS = ("DELETE", "GET", "HEAD", "OPTIONS", "PATCH", "POST", "PUT")


def _allowed_methods(request: Request) -> list[str]:
    """Every method some route answers at this path (each route answers only its own)."""
    return [
        method
        for method in _METHODS
        if any(
            route.matches({**request.scope, "method": method})[0] == Match.FULL
            for route in request.app.router.routes
        )
    ]


def install_handlers(app: FastAPI) -> None:
    """Make every error the app returns use OpenAI's error shape."""

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return error_response(exc.status, exc.message, exc.param, exc.code, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = _describe_validation(exc)
        return error_response(400, message, param, "invalid_value")

    @app.exception_handler(Exception)
    async def _failed(request: Request, exc: Exception) -> JSONResponse:
        # A bug, not the client's doing: still OpenAI's shape (the traceback goes to the log).
        message = f"The server failed on this request ({type(exc).__name__}: {exc})."
        return error_response(500, message, code="server_error")

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 404:
            message = (
                f"Unknown route: {request.method} {request.url.path}. See /docs for the routes."
            )
            return error_response(404, message, code="unknown_route")
        if exc.status_code == 405:
            allowed = _allowed_methods(request)
            message = (
                f"{request.method} is not allowed on {request.url.path}; "
                f"it answers {', '.join(allowed)}."
            )
            return error_response(
                405, message, code="method_not_allowed", headers={"Allow": ", ".join(allowed)}
            )
        return error_response(exc.status_code, str(exc.detail), headers=exc.headers)


def document_errors(openapi: dict[str, Any], *, api_key: bool, open_paths: tuple[str, ...]) -> None:
    """Make ``openapi`` (FastAPI's schema, changed in place) list the errors as the app gives them.

    FastAPI declares 422 for invalid parameters; this app answers those 400 in OpenAI's
    shape. Every body may be too large (413), and with a key every closed route may say 401.
    """
    ref = {"$ref": "#/components/schemas/ErrorResponse"}
    for path, operations in openapi.get("paths", {}).items():
        for operation in operations.values():
            answers = operation.setdefault("responses", {})
            extra = []
            if answers.pop("422", None) is not None:
                extra.append(400)
            if "requestBody" in operation:
                extra.append(413)
            if api_key and path not in open_paths:
                extra.append(401)
            for status in extra:
                answers.setdefault(
                    str(status),
                    {
                        "description": MEANINGS[status],
                        "content": {"application/json": {"schema": ref}},
                    },
                )
    schemas = openapi.setdefault("components", {}).setdefault("schemas", {})
    for unused in ("HTTPValidationError", "ValidationError"):
        schemas.pop(unused, None)
    error_schema = ErrorResponse.model_json_schema(ref_template="#/components/schemas/{model}")
    schemas.update(error_schema.pop("$defs"), ErrorResponse=error_schema)
