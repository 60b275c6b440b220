"""How an exception becomes the client's answer: the application's one set of handlers.

Every error the gateway raises (:class:`gateway.errors.GatewayError`, the ledger's
:class:`meters.errors.MeterError`) and the framework's own (validation, routing) is answered
in the shape of the API the client called, so its SDK raises as usual; a request whose payment
was settled before it failed still carries the settlement and the issued key. Running out of
file descriptors anywhere is 503 ``overloaded``, never a 500.
"""

from __future__ import annotations

import errno
import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException

from gateway.dialects import ErrorInfo, get_dialect
from gateway.errors import GatewayError, Overloaded
from meters.errors import MeterError

log = logging.getLogger("tollstream")


def _dialect_for(path: str) -> str:
    if path.startswith("/v1/messages"):
        return "anthropic_messages"
    if path.startswith("/v1/responses"):
        return "openai_responses"
    return "openai_chat"


def render_error(request: Request, info: ErrorInfo,
                 headers: dict[str, str] | None = None) -> JSONResponse:
    """An error in the shape of the API the client called (so its SDK raises as usual).

    A request whose payment was settled before it failed still carries the settlement and the
    issued key (``request.state.payment_headers``): the payer keeps what it paid for.
    """
    name = _dialect_for(request.url.path)
    try:
        dialect = get_dialect(name)
    except KeyError:
        dialect = get_dialect("openai_chat")
    return JSONResponse(dialect.error_body(info), status_code=info.status,
                        headers=_with_payment(request, headers))


def _with_payment(request: Request, headers: dict[str, str] | None) -> dict[str, str]:
    paid: dict[str, str] = getattr(request.state, "payment_headers", None) or {}
    return {**(headers or {}), **paid}


async def _handle_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, GatewayError | MeterError)
    if exc.status >= 500 and not isinstance(exc, Overloaded) and _out_of_fds(exc):
        # A Redis or upstream connection that failed because this process is out of file
        # descriptors: the process' own limit, not the ledger's or the model's failure.
        overloaded = Overloaded("the gateway is out of file descriptors; retry shortly",
                                headers={"retry-after": "1"})
        overloaded.__cause__ = exc
        exc = overloaded
    if exc.status >= 500:
        log.warning("%s %s -> %s %s", request.method, request.url.path, exc.status, exc.code)
    headers = exc.headers if isinstance(exc, GatewayError) else None
    extra = exc.extra if isinstance(exc, GatewayError) else {}
    if isinstance(exc, GatewayError) and exc.body is not None:
        response = JSONResponse(exc.body, status_code=exc.status,
                                headers=_with_payment(request, headers),
                                media_type=exc.media_type)
    else:
        response = render_error(request, ErrorInfo(exc.status, exc.code, exc.message,
                                                   exc.param, extra), headers)
    if isinstance(exc, GatewayError):
        for name, value in exc.header_list:  # repeated fields (WWW-Authenticate)
            response.headers.append(name, value)
    return response


def _out_of_fds(exc: BaseException) -> bool:
    """Whether ``exc`` or an exception it was raised from is ``EMFILE`` / ``ENFILE``."""
    seen: BaseException | None = exc
    for _ in range(10):
        if seen is None:
            return False
        if isinstance(seen, OSError) and seen.errno in (errno.EMFILE, errno.ENFILE):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


async def _handle_os_error(request: Request, exc: Exception) -> Response:
    """Out of file descriptors (a socket, a file) anywhere in a request: 503 overloaded, the
    process' own limit reached, not a bug. Any other ``OSError`` is one (500)."""
    assert isinstance(exc, OSError)
    if not _out_of_fds(exc):
        raise exc
    err = Overloaded("the gateway is out of file descriptors; retry shortly",
                     headers={"retry-after": "1"})
    err.__cause__ = exc
    return await _handle_error(request, err)


async def _handle_validation(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, RequestValidationError)
    first: dict[str, Any] = exc.errors()[0] if exc.errors() else {}
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    param = ".".join(loc) or "body"
    message = f"{param}: {first.get('msg', 'invalid request')}"
    return render_error(request, ErrorInfo(400, "invalid_request", message, param))


async def _handle_http(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
    message = ("no such route" if exc.status_code == 404 else str(exc.detail))
    return render_error(request, ErrorInfo(exc.status_code, code, message),
                        dict(exc.headers or {}))


def install(app: FastAPI) -> None:
    """Register the handlers on ``app``."""
    app.add_exception_handler(GatewayError, _handle_error)
    app.add_exception_handler(MeterError, _handle_error)
    app.add_exception_handler(RequestValidationError, _handle_validation)
    app.add_exception_handler(HTTPException, _handle_http)
    app.add_exception_handler(OSError, _handle_os_error)
