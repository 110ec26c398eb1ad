"""The ASGI middleware around the gateway: request id, body limit, metrics, last-resort 500.

Each response carries ``X-Request-ID`` (echoed when the client sent a well-formed one, else
generated), which is bound into the structlog context of everything logged for the request.
Texts and keys are never logged.
"""

from __future__ import annotations

import contextlib
import re
import time
import traceback
import uuid

import structlog
from starlette.datastructures import Headers, MutableHeaders
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Receive, Scope, Send
from starlette.types import Message as ASGIMessage

from tiergate.gateway.http.errors import error_response
from tiergate.gateway.http.metrics import GatewayMetrics

log = structlog.get_logger(__name__)

REQUEST_ID_HEADER = "X-Request-ID"
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
_QUIET_ROUTES = frozenset({"/healthz", "/readyz", "/metrics"})


class _BodyTooLargeError(StarletteHTTPException):
    """Raised from ``receive`` when the streamed body passes the limit (FastAPI re-raises it)."""

    def __init__(self, limit: int) -> None:
        super().__init__(413, f"request body is over the limit of {limit} bytes")


class RequestContextMiddleware:
    """Request id, body-size limit, request metrics and the last-resort 500, around the app.

    A ``Content-Length`` over the limit is refused before the app runs; a body that streams
    past it (chunked, or a lying header) is refused when the app reads that far. An exception
    nothing else handled becomes a 500 JSON body with the request id; it is logged with its
    type and where it was raised, never its message (it may quote a text) or a traceback.
    """

    def __init__(self, app: ASGIApp, *, max_body_bytes: int, metrics: GatewayMetrics) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Serve one ASGI call, wrapping an HTTP request as the class docstring says."""
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        offered = headers.get(REQUEST_ID_HEADER, "")
        request_id = offered if _REQUEST_ID.match(offered) else uuid.uuid4().hex
        started = time.perf_counter()
        status = 500
        response_started = False

        async def send_with_id(message: ASGIMessage) -> None:
            nonlocal status, response_started
            if message["type"] == "http.response.start":
                response_started = True
                status = int(message["status"])
                MutableHeaders(scope=message)[REQUEST_ID_HEADER] = request_id
            await send(message)

        received = 0

        async def receive_limited() -> ASGIMessage:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body_bytes:
                    raise _BodyTooLargeError(self.max_body_bytes)
            return message

        with structlog.contextvars.bound_contextvars(request_id=request_id):
            try:
                if _declared_length(headers) > self.max_body_bytes:
                    detail = f"request body is over the limit of {self.max_body_bytes} bytes"
                    await error_response(413, detail)(scope, receive, send_with_id)
                    return
                await self.app(scope, receive_limited, send_with_id)
            except Exception as exc:  # noqa: BLE001 -- the last resort: a JSON 500, logged
                frame = traceback.extract_tb(exc.__traceback__)[-1:]
                where = f"{frame[0].filename}:{frame[0].lineno}" if frame else "unknown"
                log.error(  # noqa: TRY400 -- no traceback: its frames' locals may hold texts
                    "request.failed", error_type=type(exc).__name__, raised_at=where
                )
                if not response_started:
                    await error_response(500, "internal error")(scope, receive, send_with_id)
            finally:
                route = scope.get("route")
                template = getattr(route, "path", None) or "unmatched"
                elapsed = time.perf_counter() - started
                self.metrics.observe_request(template, scope["method"], status, elapsed)
                # Probes and scrapes arrive every few seconds: keep them out of the info log.
                emit = log.debug if template in _QUIET_ROUTES else log.info
                emit(
                    "http.request",
                    route=template,
                    method=scope["method"],
                    status=status,
                    duration_ms=round(elapsed * 1000.0, 3),
                )


def _declared_length(headers: Headers) -> int:
    with contextlib.suppress(ValueError):
        return int(headers.get("content-length", "0"))
    return 0
