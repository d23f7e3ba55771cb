"""Errors in OpenAI's shape ``{"error": {"message", "type", "param", "code"}}``, for every route.

Raise :class:`APIError` anywhere in a route; :func:`install_handlers` also converts
FastAPI's validation errors (400) and unknown routes (404) to the same shape, so an
OpenAI client shows the message as is::

    raise APIError(404, "Unknown model 'x'. Available: ...", param="model", code="model_not_found")
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

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


class APIError(Exception):
    """An error a route returns to the client: status, message, and OpenAI's ``param``/``code``."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers or {}


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


def _describe_validation(exc: RequestValidationError) -> tuple[str, str | None]:
    errors = exc.errors()
    if not errors:
        return "The request is not valid.", None
    first: dict[str, Any] = errors[0]
    loc = [str(p) for p in first.get("loc", ()) if p not in ("body", "query", "path")]
    param = ".".join(loc) or None
    if first.get("type") == "json_invalid":
        return "The request body is not valid JSON.", None
    where = f" '{param}'" if param else ""
    more = f" (and {len(errors) - 1} more problem(s))" if len(errors) > 1 else ""
    return f"Invalid value for{where}: {first.get('msg', 'invalid')}{more}.", param


def install_handlers(app: FastAPI) -> None:
    """Make every error the app returns use OpenAI's error shape."""

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return error_response(exc.status, exc.message, exc.param, exc.code, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = _describe_validation(exc)
        return error_response(400, message, param, "invalid_value")

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 404:
            message = (
                f"Unknown route: {request.method} {request.url.path}. See /docs for the routes."
            )
            return error_response(404, message, code="unknown_route")
        if exc.status_code == 405:
            message = f"{request.method} is not allowed on {request.url.path}."
            return error_response(405, message, code="method_not_allowed")
        return error_response(exc.status_code, str(exc.detail), headers=exc.headers)
