"""Typed errors to HTTP answers: a 4xx with a JSON body naming the problem."""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from parrot.semantic_vars import (
    AuthenticationError,
    CallFailedError,
    ContextLengthError,
    DataflowCycleError,
    EngineError,
    InvalidArgumentError,
    ParrotError,
    PromptTooLongError,
    QuotaExceededError,
    SessionClosedError,
    TemplateError,
    UnknownVariableError,
    VariableAlreadySetError,
)

from parrot.dataflow.store import StoreUnavailableError

from .disconnect import ClientDisconnected

# Most specific first: the first class that matches decides the status.
STATUS: list[tuple[type[BaseException], int]] = [
    (AuthenticationError, 401),
    (UnknownVariableError, 404),  # includes unknown sessions, and other tenants' objects
    (VariableAlreadySetError, 409),
    (SessionClosedError, 409),
    (CallFailedError, 409),
    (PromptTooLongError, 413),
    (QuotaExceededError, 429),
    (ContextLengthError, 400),  # as OpenAI answers a prompt longer than the model's context
    (TemplateError, 422),
    (InvalidArgumentError, 422),  # includes SamplingConfigError
    (DataflowCycleError, 422),
    (StoreUnavailableError, 503),  # the state store is down: try again, nothing was changed
    (EngineError, 400),
    (ParrotError, 400),
]


def error_body(kind: str, message: str, *, field: str | None = None, position: int | None = None) -> dict:
    return {"error": {"type": kind, "message": message, "field": field, "position": position}}


def parrot_error_response(exc: ParrotError) -> JSONResponse:
    status = next(code for cls, code in STATUS if isinstance(exc, cls))
    headers = {}
    if isinstance(exc, QuotaExceededError):
        headers["Retry-After"] = str(max(1, round(exc.retry_after)))
    if isinstance(exc, StoreUnavailableError):
        headers["Retry-After"] = "1"
    if isinstance(exc, AuthenticationError):
        headers["WWW-Authenticate"] = "Bearer"
    body = error_body(
        type(exc).__name__, str(exc), field=getattr(exc, "field", None), position=getattr(exc, "position", None)
    )
    return JSONResponse(body, status_code=status, headers=headers)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ParrotError)
    async def on_parrot_error(request: Request, exc: ParrotError) -> JSONResponse:
        return parrot_error_response(exc)

    @app.exception_handler(ClientDisconnected)
    async def on_client_gone(request: Request, exc: ClientDisconnected) -> Response:
        return Response(status_code=499)  # nginx's "client closed request": no one reads it

    @app.exception_handler(RequestValidationError)
    async def on_validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request", "type": ""}
        loc = [str(p) for p in first.get("loc", ()) if p not in ("body", "query", "path")]
        if first.get("type") == "json_invalid":
            return JSONResponse(error_body("MalformedJSON", f"the body is not valid JSON: {first['msg']}"), 400)
        field = ".".join(loc) or None
        return JSONResponse(error_body("ValidationError", f"{field or 'request'}: {first['msg']}", field=field), 422)

    @app.exception_handler(StarletteHTTPException)
    async def on_http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return JSONResponse(error_body("HTTPError", str(exc.detail)), exc.status_code, headers=getattr(exc, "headers", None))
