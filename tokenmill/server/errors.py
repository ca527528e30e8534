"""One error map: every failure becomes an OpenAI-shaped JSON error here.

`{"error": {"message", "type", "param", "code"}}` with a 4xx status for bad
input, 404 for an unknown model, 503 + Retry-After when overloaded or not
ready. Routes raise; they never build error responses themselves.
"""
from __future__ import annotations

import json
import logging
import sys

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

logger = logging.getLogger(__name__)


def _engine_errors() -> tuple[type, type, type] | None:
    """(EngineOverloadedError, EngineDeadError, RequestFailedError) once the engine is loaded.

    Looked up rather than imported, so that processes without an engine (the
    gateway) do not load torch for their error map: before the engine module is
    imported, none of its exceptions can exist."""
    module = sys.modules.get("tokenmill.engine.async_engine")
    if module is None:
        return None
    return module.EngineOverloadedError, module.EngineDeadError, module.RequestFailedError


class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None, headers: dict | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type_
        self.param = param
        self.code = code
        self.headers = headers or {}


def error_body(message: str, type_: str, param: str | None = None, code: str | int | None = None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def error_response(error: APIError) -> JSONResponse:
    return JSONResponse(error_body(error.message, error.type, error.param, error.code),
                        status_code=error.status, headers=error.headers)


def to_api_error(error: BaseException, retry_after: int = 1) -> APIError:
    """The API error for an exception raised while serving a request."""
    if isinstance(error, APIError):
        return error
    engine_errors = _engine_errors()
    if engine_errors is not None:
        overloaded, dead, failed = engine_errors
        if isinstance(error, overloaded):
            return APIError(503, f"the server is overloaded: {error}; retry later", "server_overloaded",
                            code="overloaded", headers={"Retry-After": str(retry_after)})
        if isinstance(error, dead):
            return APIError(503, f"the engine is not available: {error}", "service_unavailable",
                            code="engine_unavailable", headers={"Retry-After": str(retry_after)})
        if isinstance(error, failed):
            return APIError(503, str(error), "service_unavailable", code="engine_error",
                            headers={"Retry-After": str(retry_after)})
    if isinstance(error, ValueError):
        return APIError(400, str(error), "invalid_request_error")
    logger.exception("unexpected error while serving a request", exc_info=error)
    return APIError(500, "internal server error", "internal_error")


def _location(loc) -> str | None:
    parts = [str(part) for part in loc if part != "body"]
    return ".".join(parts) or None


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(_: Request, error: APIError):
        return error_response(error)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, error: RequestValidationError):
        problems = error.errors()
        first = problems[0] if problems else {}
        if first.get("type") == "json_invalid":
            return error_response(APIError(400, "the request body is not valid JSON", param=None,
                                           code="invalid_json"))
        details = "; ".join(f"{_location(p.get('loc', ())) or 'body'}: {p.get('msg')}" for p in problems[:5])
        return error_response(APIError(400, f"invalid request: {details}", param=_location(first.get("loc", ())),
                                       code="invalid_value"))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, error: StarletteHTTPException):
        message = error.detail if isinstance(error.detail, str) else json.dumps(error.detail)
        type_ = "not_found_error" if error.status_code == 404 else "invalid_request_error"
        return JSONResponse(error_body(message, type_, code=error.status_code), status_code=error.status_code,
                            headers=getattr(error, "headers", None))

    # Failures with a known status (bad input the engine refuses, overload, engine
    # gone) are answered by their own handlers. The catch-all below sits in
    # Starlette's outermost middleware, which re-raises after answering: the
    # connection is dropped and a traceback logged, right only for real 500s.
    async def _known(_: Request, error: Exception):
        return error_response(to_api_error(error))

    for known in (ValueError, *(_engine_errors() or ())):
        app.add_exception_handler(known, _known)

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, error: Exception):
        return error_response(to_api_error(error))
