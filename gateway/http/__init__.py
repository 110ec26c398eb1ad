"""The HTTP gateway: tiergate's decisions over HTTP (FastAPI on uvicorn).

Two modes, chosen by ``settings.broker_url``. Embedded (no broker): the gateway runs the cascade
in-process and micro-batches concurrent requests into one BERT pass. Distributed: it hands
messages to the workers through a :class:`Dispatcher` and never runs the model.

Every error response is JSON with ``detail`` and ``request_id``; no traceback ever leaves the
process, and texts and keys are never logged.

Where things live: ``app`` builds the app, ``routes`` serves the requests, ``types`` holds their
bodies, ``backends`` the two modes, ``errors`` the error responses, ``middleware`` the request
id and body limit, ``auth`` the API keys, ``batching`` the micro-batcher and ``metrics`` the
Prometheus metrics.
"""

from __future__ import annotations

from tiergate.gateway.http.app import app_from_environment, create_app, freeze_startup_heap
from tiergate.gateway.http.auth import hash_api_key
from tiergate.gateway.http.backends import Dispatcher
from tiergate.gateway.http.middleware import REQUEST_ID_HEADER
from tiergate.gateway.http.types import ErrorResponse

__all__ = [
    "REQUEST_ID_HEADER",
    "Dispatcher",
    "ErrorResponse",
    "app_from_environment",
    "create_app",
    "freeze_startup_heap",
    "hash_api_key",
]
