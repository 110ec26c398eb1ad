"""How the HTTP gateway answers failures: every error response is a JSON ``ErrorResponse``.

Each body has ``detail`` and ``request_id``; no traceback ever leaves the process. Which
exception gets which answer (:data:`EXCEPTION_HANDLERS`, installed by ``create_app``)::

    GatewayError                    its own status and body fields
    HTTPException                   its own status; 422 for a body FastAPI could not decode
    RequestValidationError          422 naming every invalid field by its path in the body
    UnknownPolicyError, InputError  422
    PoliciesNotAnnouncedError       503 with Retry-After: no worker has said what it serves yet
    TransientError, ModelError,
      BatcherClosedError            503 with Retry-After
    anything else                   500, from the request-context middleware
"""

from __future__ import annotations

from typing import Any

import structlog
from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import HTTPExceptionHandler

from tiergate.gateway.http.batching import BatcherClosedError
from tiergate.gateway.http.types import ErrorResponse, FieldError
from tiergate.workers.errors import (
    InputError,
    ModelError,
    PoliciesNotAnnouncedError,
    TransientError,
    UnknownPolicyError,
)

log = structlog.get_logger(__name__)

_NOT_JSON = "the body must be a JSON object sent with Content-Type: application/json"
_NO_BODY = "the request body is empty; send a JSON object"
# Union members pydantic names in an error's location (our request unions' tags, and the
# scalar types of Message.metadata values); they are dropped from the field paths of 422s.
_UNION_TAGS = frozenset(
    {"one-message", "many-messages", "one-input", "many-inputs"}
    | {"str", "int", "float", "bool", "none"}
)


class GatewayError(Exception):
    """An error the gateway answers with: an HTTP status and the fields of its JSON body."""

    def __init__(
        self,
        status_code: int,
        detail: str,
        *,
        headers: dict[str, str] | None = None,
        **fields: Any,
    ) -> None:
        super().__init__(status_code, detail)
        self.status_code = status_code
        self.detail = detail
        self.headers = headers or {}
        self.fields = fields


def _request_id() -> str:
    bound = structlog.contextvars.get_contextvars().get("request_id")
    return str(bound) if bound is not None else "-"


def error_response(
    status_code: int, detail: str, headers: dict[str, str] | None = None, **fields: Any
) -> JSONResponse:
    """The JSON error response every failure gets (see :class:`ErrorResponse`)."""
    body = ErrorResponse(detail=detail, request_id=_request_id(), **fields)
    return JSONResponse(
        body.model_dump(mode="json", exclude_none=True), status_code=status_code, headers=headers
    )


async def _gateway_error(_: Request, exc: Exception) -> Response:
    assert isinstance(exc, GatewayError)
    return error_response(exc.status_code, exc.detail, exc.headers, **exc.fields)


async def _http_error(_: Request, exc: Exception) -> Response:
    assert isinstance(exc, StarletteHTTPException)
    unreadable = _unreadable_body(exc)
    if unreadable is not None:
        error = FieldError(field="body", message=unreadable, type="json_invalid")
        return error_response(
            422, f"invalid request: body: {unreadable}", errors=[error], field="body"
        )
    headers = dict(exc.headers) if exc.headers else None
    return error_response(exc.status_code, str(exc.detail), headers)


def _unreadable_body(exc: StarletteHTTPException) -> str | None:
    """Why FastAPI could not decode a JSON body, or ``None`` for any other HTTP error.

    FastAPI answers a body that ``json.loads`` rejects with anything but a JSONDecodeError (bytes
    that are not UTF-8, nesting past the interpreter's recursion limit, an integer too long to
    convert) with an undocumented, unexplained 400; its cause says which it was.
    """
    cause = exc.__cause__
    if exc.status_code != 400:
        return None
    if isinstance(cause, UnicodeDecodeError):
        return f"the body is not valid UTF-8 (byte {cause.start + 1})"
    if isinstance(cause, RecursionError):
        return "malformed JSON: nested too deeply"
    if isinstance(cause, ValueError) and "digits" in str(cause):
        return "malformed JSON: a number has too many digits"
    return None


async def _validation_error(_: Request, exc: Exception) -> Response:
    assert isinstance(exc, RequestValidationError)
    # One error per field and message: a union reports each member's failure separately.
    errors = list({(e.field, e.message): e for e in map(_field_error, exc.errors())}.values())
    if isinstance(exc.body, bytes):
        # FastAPI reads a body as JSON only when its Content-Type says JSON; it left this raw.
        errors = [FieldError(field="body", message=_NOT_JSON, type="content_type")]
    elif exc.body is None and any(e.field == "body" and e.type == "missing" for e in errors):
        errors = [FieldError(field="body", message=_NO_BODY, type="missing")]
    first = errors[0] if errors else FieldError(field="body", message="invalid", type="invalid")
    return error_response(
        422,
        f"invalid request: {first.field}: {first.message}",
        errors=errors,
        field=first.field,
    )


def _field_error(error: Any) -> FieldError:
    """A pydantic/FastAPI error as a field path and message (never echoing the input)."""
    loc = tuple(error.get("loc", ()))
    kind = str(error.get("type", "invalid"))
    message = str(error.get("msg", "invalid"))
    if kind == "json_invalid":
        reason = error.get("ctx", {}).get("error", "")
        return FieldError(field="body", message=f"malformed JSON: {reason}".rstrip(": "), type=kind)
    parts = loc[1:] if loc and loc[0] in {"body", "path", "query", "header"} else loc
    path = ""
    for part in parts:
        if part in _UNION_TAGS:
            continue
        path += f"[{part}]" if isinstance(part, int) else f"{'.' if path else ''}{part}"
    return FieldError(field=path or "body", message=message, type=kind)


async def _unknown_policy(_: Request, exc: Exception) -> Response:
    assert isinstance(exc, UnknownPolicyError)
    return error_response(422, str(exc), policy=exc.name)


async def _input_error(_: Request, exc: Exception) -> Response:
    return error_response(422, str(exc))


async def _unavailable(_: Request, exc: Exception) -> Response:
    log.warning("request.unavailable", error_type=type(exc).__name__)
    return error_response(503, "a dependency is unavailable; retry later", {"Retry-After": "1"})


async def _policies_not_announced(_: Request, exc: Exception) -> Response:
    log.warning("request.policies_not_announced", error=str(exc))
    return error_response(
        503,
        "no BERT worker has announced the policies it serves yet; retry once one is running",
        {"Retry-After": "5"},
    )


# Which handler answers each exception type; create_app installs every one.
EXCEPTION_HANDLERS: dict[type[Exception], HTTPExceptionHandler] = {
    GatewayError: _gateway_error,
    StarletteHTTPException: _http_error,
    RequestValidationError: _validation_error,
    UnknownPolicyError: _unknown_policy,
    InputError: _input_error,
    PoliciesNotAnnouncedError: _policies_not_announced,
    TransientError: _unavailable,
    ModelError: _unavailable,
    BatcherClosedError: _unavailable,
}
