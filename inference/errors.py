"""API errors in OpenAI's shape: every refusal names the field at fault (`param`) and says how to fix it."""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from voxscale import metrics_contract as mc
from voxscale.inference.server_metrics import ServerMetrics


class ApiError(Exception):
    """Raised anywhere in a request; answered as {"error": {...}} with its status and headers."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str = "invalid_request_error",
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.headers = status, message, param, code, headers or {}


def error_response(
    status: int, message: str, param: str | None, code: str, headers: dict[str, str] | None = None
) -> JSONResponse:
    body = {"error": {"message": message, "type": code, "param": param, "code": status}}
    return JSONResponse(body, status_code=status, headers=headers)


def not_ready() -> ApiError:
    """While loading or draining: the client should go to another replica, or come back."""
    return ApiError(
        503, "the server is not ready (loading or draining); retry", None, "unavailable", {"Retry-After": "2"}
    )


def install_handlers(app: FastAPI, metrics: ServerMetrics) -> None:
    """ApiError and body validation both answer in the error shape above, counted by kind."""

    async def api_error(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, ApiError)
        metrics.counter(mc.ERRORS).labels(exc.code).inc()
        return error_response(exc.status, exc.message, exc.param, exc.code, exc.headers)

    async def validation_error(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        first = exc.errors()[0]
        param = ".".join(str(p) for p in first["loc"][1:]) if len(first["loc"]) > 1 else ""
        metrics.counter(mc.ERRORS).labels("validation").inc()
        return error_response(422, f"{param or 'body'}: {first['msg']}", param or None, "invalid_request_error")

    async def http_error(request: Request, exc: Exception) -> JSONResponse:
        """No such route or method: the same error shape, so an OpenAI client can read it too."""
        assert isinstance(exc, HTTPException)
        message = f"{request.method} {request.url.path}: {exc.detail}"
        return error_response(exc.status_code, message, None, "invalid_request_error", dict(exc.headers or {}))

    app.add_exception_handler(ApiError, api_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(HTTPException, http_error)
