"""Building the gateway: :func:`create_app` from settings, :func:`app_from_environment` for uvicorn.

Embedded or distributed mode is chosen by ``settings.broker_url``: the app gets the backend of
its mode, the routes, the request-context middleware and the exception handlers.
"""

from __future__ import annotations

import gc
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

import tiergate
from tiergate.gateway.http.auth import KeyRing
from tiergate.gateway.http.backends import (
    Backend,
    Dispatcher,
    _DistributedBackend,
    _EmbeddedBackend,
)
from tiergate.gateway.http.errors import EXCEPTION_HANDLERS
from tiergate.gateway.http.metrics import GatewayMetrics
from tiergate.gateway.http.middleware import RequestContextMiddleware
from tiergate.gateway.http.routes import Gateway, router
from tiergate.workers.cascade import Cascade
from tiergate.workers.labels import Corrections
from tiergate.workers.ledger import DecisionLedger
from tiergate.workers.logs import configure_logging
from tiergate.workers.settings import Settings


def create_app(
    settings: Settings,
    *,
    cascade: Cascade | None = None,
    client: Dispatcher | None = None,
    ledger: DecisionLedger | None = None,
) -> FastAPI:
    """The gateway app for ``settings``; serve it with uvicorn (``tiergate serve``).

    Embedded mode (``settings.broker_url`` unset) runs ``cascade``, or builds one from the
    model at ``settings.resolved_model_dir`` and the configured policies, and delivers
    decisions to ``ledger`` (default: :func:`~tiergate.workers.ledger.open_ledger`). Distributed
    mode needs ``client``. Raises ``ValueError`` for a mode without what it needs or for malformed
    API keys, and the model's errors when the model cannot be loaded.
    """
    keyring = KeyRing(settings.api_keys)
    metrics = GatewayMetrics()
    backend: Backend
    corrections: Corrections
    if settings.broker_url:
        if client is None:
            raise ValueError("distributed mode (TIERGATE_BROKER_URL is set) needs a Dispatcher")
        backend = _DistributedBackend(settings, client, metrics)
        # The workers record decisions in the Redis label store; corrections go straight there.
        shared = settings.redis_url is not None
        corrections = Corrections.from_settings(settings) if shared else Corrections(None, None)
    else:
        if cascade is None:
            cascade = _build_embedded_cascade(settings)
        if ledger is None:
            from tiergate.workers.ledger import open_ledger  # noqa: PLC0415 -- embedded mode only

            ledger = open_ledger(settings)
        backend = _EmbeddedBackend(settings, cascade, ledger, metrics)
        corrections = Corrections(cascade.labels, cascade.cache)
    metrics.watch(
        budget_remaining=backend.budget_readings,
        queue_depths=backend.queue_depths,
        dead_letters=backend.dead_letter_counts,
    )

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await backend.start()
        try:
            yield
        finally:
            await backend.stop()

    app = FastAPI(
        title="tiergate",
        version=tiergate.__version__,
        summary="A tiered text-classification gateway: a BERT tier, an LLM for the hard cases.",
        lifespan=lifespan,
    )
    app.state.tiergate = Gateway(settings, keyring, backend, metrics, corrections)
    app.include_router(router)
    app.add_middleware(
        RequestContextMiddleware, max_body_bytes=settings.max_body_bytes, metrics=metrics
    )
    for error_type, handler in EXCEPTION_HANDLERS.items():
        app.add_exception_handler(error_type, handler)
    return app


def freeze_startup_heap() -> None:
    """Keep what startup built out of every later garbage collection (process-wide).

    Imports and the app leave about 260,000 objects that live as long as the process. A full
    collection walks every one of them while every request in flight waits (about 120 ms under
    load). Collected once and frozen (:func:`gc.freeze`), they are never traversed again; what
    requests create afterwards is collected as before.
    """
    gc.collect()
    gc.freeze()


def app_from_environment() -> FastAPI:
    """The app of the environment's settings: distributed when a broker is set, else embedded.

    The factory ``tiergate serve`` runs (``uvicorn --factory
    tiergate.gateway.http:app_from_environment`` gives one app per uvicorn worker process). The
    process is the gateway's own, so what its startup built is frozen out of later garbage
    collections (:func:`freeze_startup_heap`).
    """
    settings = Settings()
    configure_logging(settings.log_level)  # a uvicorn worker process starts with none
    client: Dispatcher | None = None
    if settings.broker_url:
        from tiergate.gateway.client import TiergateClient  # noqa: PLC0415 -- distributed mode only

        client = TiergateClient.from_settings(settings)
    app = create_app(settings, client=client)
    freeze_startup_heap()
    return app


def _build_embedded_cascade(settings: Settings) -> Cascade:
    from tiergate.workers.bert.scheduling import StepScheduler  # noqa: PLC0415
    from tiergate.workers.bert.serving import ServingClassifier  # noqa: PLC0415 -- loads ONNX Runtime
    from tiergate.workers.cascade import open_cascade  # noqa: PLC0415

    # Concurrent micro-batches share one session, taking turns step by step. By default its
    # intra-op threads become as many single-threaded steps at once: a step's threads do not
    # wait for each other at every operator, and a second step runs beside a long one.
    threads = settings.intra_op_threads
    slots = min(threads, settings.gateway_parallel_steps or threads)
    # The deployment's current model version, switched between micro-batches on promotion.
    classifier = ServingClassifier.from_settings(
        settings.model_copy(update={"intra_op_threads": max(1, threads // slots)}),
        scheduler=StepScheduler(settings.gateway_step_tokens, slots=slots),
    )
    return open_cascade(settings, classifier)
