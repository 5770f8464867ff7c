"""Every error leaves as `{"error": {"type": ..., "message": ...}}` with a fitting status.

Validation errors, unknown routes (404), wrong methods (405) and crashes (500) included, so
a client (the `openai` package among them) always finds a message that says what to change.
The exceptions of the store, the engine and the prefix domain are mapped to HTTP here,
once (`api_error_for`): routes let them propagate, and a stream that already sent its
headers turns them into an error event with the same mapping.
"""

from __future__ import annotations

import logging
import math

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from prefix_store import (NotReplicatedError, StoreIntegrityError, StoreUnavailableError, TenantDeletedError,
                          TenantExistsError)
from prefix_store.errors import OverLimitError, QuotaExceededError, RateLimitedError
from prefix_store.job import TooManyJobsError
from server.api.prefix_resolver import PrefixNotFound, PrefixUnavailable, UntrainedCompositionError
from server.engine.async_engine import EngineDeadError, QueueFullError
from server.engine.llm_engine import KVPoolBusy
from server.engine.request import RequestError
from server.engine.tokenization import TemplateError
from server.prefix import InvalidIdError, ModelMismatchError, PrefixError, shorten

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


_RETRY_SOON = {"Retry-After": "1"}


def api_error_for(e: Exception, retry_after_s: int = 1) -> ApiError | None:
    """The HTTP error of an exception the domain raises; None for anything else (a bug: 500)."""
    if isinstance(e, ApiError):
        return e
    if isinstance(e, NotReplicatedError):
        return ApiError(503, str(e), "service_unavailable", _RETRY_SOON)
    if isinstance(e, StoreUnavailableError):
        return ApiError(503, "the prefix store (Redis) is unreachable; retry shortly", "service_unavailable",
                        _RETRY_SOON)
    if isinstance(e, PrefixUnavailable):
        return ApiError(503, str(e), "service_unavailable", _RETRY_SOON)
    if isinstance(e, EngineDeadError):
        return ApiError(503, str(e), "service_unavailable")
    if isinstance(e, KVPoolBusy):
        return ApiError(503, str(e), "service_unavailable", _RETRY_SOON)
    if isinstance(e, RequestError):
        return ApiError(400, str(e))
    if isinstance(e, QueueFullError):
        return ApiError(429, f"the server is busy ({e}); retry later", "rate_limit_error",
                        {"Retry-After": str(retry_after_s)})
    if isinstance(e, RateLimitedError):
        return ApiError(429, str(e), "rate_limit_error", {"Retry-After": str(max(1, math.ceil(e.retry_after_s)))})
    if isinstance(e, OverLimitError):
        return ApiError(400, str(e))
    if isinstance(e, QuotaExceededError):
        return ApiError(403, str(e), "quota_exceeded")
    if isinstance(e, TooManyJobsError):
        return ApiError(429, str(e), "rate_limit_error", {"Retry-After": "10"})
    if isinstance(e, (PrefixNotFound, TenantDeletedError)):
        return ApiError(404, str(e), "not_found_error")
    if isinstance(e, (InvalidIdError, TemplateError)):
        return ApiError(400, str(e))
    if isinstance(e, UntrainedCompositionError):
        return ApiError(400, str(e), "untrained_composition")
    if isinstance(e, TenantExistsError):
        return ApiError(409, str(e), "conflict_error")
    if isinstance(e, ModelMismatchError):
        return ApiError(422, str(e), "model_mismatch")
    if isinstance(e, PrefixError):
        return ApiError(422, str(e), "invalid_prefix")
    if isinstance(e, StoreIntegrityError):
        return ApiError(500, str(e), "internal_error")
    return None


_MAPPED = (ApiError, StoreUnavailableError, PrefixUnavailable, EngineDeadError, KVPoolBusy, RequestError,
           QueueFullError, TooManyJobsError, RateLimitedError, OverLimitError, QuotaExceededError,
           PrefixNotFound, TenantDeletedError, InvalidIdError, TemplateError, TenantExistsError, PrefixError,
           StoreIntegrityError, UntrainedCompositionError)


def install_error_handlers(app: FastAPI) -> None:
    async def _mapped(request: Request, e: Exception) -> JSONResponse:
        err = api_error_for(e, request.app.state.ctx.settings.retry_after_s)
        return error_response(err.status, err.message, err.kind, err.headers)

    for cls in _MAPPED:
        app.add_exception_handler(cls, _mapped)

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
