"""Every error leaves as `{"error": {"type": ..., "message": ...}}` with a fitting status.

Validation errors, unknown routes (404), wrong methods (405) and crashes (500) included, so
a client (the `openai` package among them) always finds a message that says what to change.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from prefix_store.errors import shorten

log = logging.getLogger(__name__)

_TYPES = {  # default error type per status
    400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
    404: "not_found_error", 405: "method_not_allowed", 409: "conflict_error",
    413: "payload_too_large", 415: "unsupported_media_type", 422: "invalid_request_error",
    429: "rate_limit_error", 500: "internal_error", 503: "service_unavailable", 504: "timeout_error",
}


class ApiError(Exception):
    """Raise anywhere in a route: becomes the JSON error response."""

    def __init__(self, status: int, message: str, kind: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.kind = kind or _TYPES.get(status, "error")
        self.headers = headers


class ClientGone(Exception):
    """The client disconnected while its request ran; the request was aborted."""


def error_body(status: int, message: str, kind: str | None = None) -> dict:
    return {"error": {"type": kind or _TYPES.get(status, "error"), "message": message}}


def error_response(status: int, message: str, kind: str | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(error_body(status, message, kind), status_code=status, headers=headers)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api_error(_: Request, e: ApiError) -> JSONResponse:
        return error_response(e.status, e.message, e.kind, e.headers)

    @app.exception_handler(ClientGone)
    async def _client_gone(_: Request, e: ClientGone) -> Response:
        # Nobody reads this; 499 (nginx's "client closed request") shows up in access logs.
        return Response(status_code=499)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
        if e.status_code == 404 and e.detail == "Not Found":
            listed = f"; the routes are listed at {request.app.docs_url}" if request.app.docs_url else ""
            message = f"no route {request.method} {shorten(request.url.path)}{listed}"
        elif e.status_code == 405:
            message = f"{request.method} is not allowed on {shorten(request.url.path)}"
        else:
            message = str(e.detail)
        return error_response(e.status_code, message, headers=getattr(e, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, e: RequestValidationError) -> JSONResponse:
        # 400 as OpenAI answers a malformed request (its clients raise BadRequestError).
        return error_response(400, describe_validation_errors(e.errors()))

    @app.exception_handler(Exception)
    async def _crash(request: Request, e: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return error_response(500, f"internal error ({type(e).__name__}); see the server log")


def describe_validation_errors(errors: list[dict]) -> str:
    """'body.max_tokens: Input should be greater than 0; body.prompt: Field required'."""
    parts = []
    for err in errors[:5]:
        loc = ".".join(str(p) for p in err.get("loc", ()) if p != "body")
        msg = str(err.get("msg", "invalid")).removeprefix("Value error, ")
        parts.append(f"{loc}: {msg}" if loc else msg)
    more = f" (and {len(errors) - 5} more)" if len(errors) > 5 else ""
    return "; ".join(parts) + more
