"""The HTTP gateway: tiergate's decisions over HTTP (FastAPI on uvicorn).

Routes:

- ``POST /v1/classify``: one message, or ``{"messages": [...]}``; waits up to
  ``settings.request_timeout_s`` for the decisions (504 naming the ids still pending, which
  are answered later and can be read with ``GET /v1/messages/{id}``).
- ``POST /v1/messages``: accepts messages and answers 202 with their ids; the decisions are
  delivered to the decision ledger (and, in distributed mode, the decisions stream).
- ``GET /v1/messages/{id}``: a delivered decision; 202 while it is pending (when the gateway
  can tell), else 404.
- ``GET /v1/policies``: the loaded policies the caller's key may use.
- ``POST /v1/moderations``: the OpenAI moderation endpoint's request and response shape over
  a multi-label policy, so an existing moderation client switches by its base URL.
- ``GET /healthz`` (the process runs), ``GET /readyz`` (model loaded, Redis and broker
  reachable), ``GET /metrics`` (Prometheus); these three need no API key.

Two modes, chosen by ``settings.broker_url``. Embedded (no broker): the gateway runs the
cascade in-process and micro-batches concurrent requests into one cascade call
(:class:`~tiergate.gateway.batching.MicroBatcher`). Distributed: it hands messages to a
:class:`Dispatcher` (Celery tasks sent by name, results waited on without polling) and never
runs the model. Blocking work always runs in worker threads, never on the event loop.

Every error response is JSON with ``detail`` and ``request_id`` (see :class:`ErrorResponse`);
no traceback ever leaves the process. Each response carries ``X-Request-ID`` (echoed when the
client sent a well-formed one, else generated), which is bound into the structlog context of
everything logged for the request. Texts and keys are never logged.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import re
import time
import traceback
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Annotated, Any, Literal, Protocol

import anyio.to_thread
import redis
import structlog
from anyio import CapacityLimiter
from fastapi import APIRouter, Body, Depends, FastAPI, Path, Request, Security
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, ConfigDict, Discriminator, Field, StrictStr, Tag, ValidationError
from starlette.datastructures import Headers, MutableHeaders
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Receive, Scope, Send
from starlette.types import Message as ASGIMessage

import tiergate
from tiergate.gateway.auth import Grant, KeyRing
from tiergate.gateway.batching import BatcherClosedError, MicroBatcher
from tiergate.gateway.metrics import BudgetReading, GatewayMetrics
from tiergate.policies.spec import Escalation, LabelSpec, PolicySpec
from tiergate.workers.budget import BudgetLedger
from tiergate.workers.cascade import Cascade, LLMWork, PolicyBook
from tiergate.workers.delivery import DecisionLedger
from tiergate.workers.errors import InputError, ModelError, TransientError, UnknownPolicyError
from tiergate.workers.logs import configure_logging
from tiergate.workers.schemas import Decision, Message
from tiergate.workers.settings import Settings

log = structlog.get_logger(__name__)

REQUEST_ID_HEADER = "X-Request-ID"
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
# Embedded mode: batches in flight at once. A batch holds its slot while its LLM calls run,
# so more than one keeps a slow LLM answer from stalling the BERT tier for everyone else.
# Distributed mode: threads that may block waiting for results at once (requests in flight).
_DISTRIBUTED_WAITERS = 256
_READINESS_TIMEOUT_S = 2.0
_WARM_UP_TEXTS = ["tiergate warm-up"]
_QUIET_ROUTES = frozenset({"/healthz", "/readyz", "/metrics"})
# Union members pydantic names in an error's location (our request unions' tags, and the
# scalar types of Message.metadata values); they are dropped from the field paths of 422s.
_UNION_TAGS = frozenset(
    {"one-message", "many-messages", "one-input", "many-inputs"}
    | {"str", "int", "float", "bool", "none"}
)


FieldPath = Callable[[int, str], str]

# ---------------------------------------------------------------------------------- wire models


class MessageBatch(BaseModel):
    """Several messages in one request (at most ``settings.max_batch_messages``)."""

    model_config = ConfigDict(extra="forbid")

    messages: Annotated[list[Message], Field(min_length=1)]


def _classify_shape(value: Any) -> str:
    if isinstance(value, dict) and "messages" in value:
        return "many-messages"
    if isinstance(value, MessageBatch):
        return "many-messages"
    return "one-message"


ClassifyRequest = Annotated[
    Annotated[Message, Tag("one-message")] | Annotated[MessageBatch, Tag("many-messages")],
    Discriminator(_classify_shape),
]


class ClassifyResponse(BaseModel):
    """The decisions of a request's messages, in input order."""

    decisions: list[Decision]


class AcceptedResponse(BaseModel):
    """The ids of accepted messages, in input order; read each later at /v1/messages/{id}."""

    ids: list[str]


class PendingResponse(BaseModel):
    """A message that was accepted and is not answered yet."""

    id: str
    status: Literal["pending"] = "pending"


class PolicyInfo(BaseModel):
    """One loaded policy as clients see it: labels, head type and escalation rules."""

    name: str
    version: str
    description: str
    labels: list[LabelSpec]
    multi_label: bool
    escalation: Escalation
    default: bool = Field(description="Whether messages naming policy 'default' get this one.")


class PoliciesResponse(BaseModel):
    """The policies the caller may use; ``default`` is the default policy's name, if usable."""

    policies: list[PolicyInfo]
    default: str | None


def _moderation_shape(value: Any) -> str:
    return "one-input" if isinstance(value, str) else "many-inputs"


class ModerationRequest(BaseModel):
    """OpenAI's moderation request: ``input`` text(s); ``model`` names a multi-label policy.

    Without ``model`` the first loaded multi-label policy answers.
    """

    input: Annotated[
        Annotated[str, Tag("one-input")]
        | Annotated[list[str], Tag("many-inputs"), Field(min_length=1)],
        Discriminator(_moderation_shape),
    ]
    # Constrained like Message.policy: the length bound also makes pydantic refuse a lone
    # surrogate, which an error echoing the name could not encode (a 500).
    model: Annotated[StrictStr, Field(min_length=1, max_length=128)] | None = None


class ModerationResult(BaseModel):
    """One input's verdict: flagged labels, every label's score, in OpenAI's shape."""

    flagged: bool
    categories: dict[str, bool]
    category_scores: dict[str, float]
    category_applied_input_types: dict[str, list[Literal["text"]]]


class ModerationResponse(BaseModel):
    """OpenAI's moderation response: ``model`` is the policy that answered."""

    id: str
    model: str
    results: list[ModerationResult]


class HealthResponse(BaseModel):
    """The process is up."""

    status: Literal["ok"] = "ok"


class ReadinessResponse(BaseModel):
    """Whether every dependency is ready; ``checks`` names each and its state."""

    ready: bool
    checks: dict[str, bool]


class FieldError(BaseModel):
    """One invalid field: its path (``messages[0].text``), what is wrong, the error type."""

    field: str
    message: str
    type: str


class ErrorResponse(BaseModel):
    """Every error response's body.

    ``detail`` says what went wrong; ``request_id`` matches the ``X-Request-ID`` header and the
    logs. Depending on the error: ``errors`` (422, each invalid field), ``field`` (the field
    at fault), ``index`` (the message at fault), ``policy`` (an unknown or forbidden policy),
    ``id`` (an unknown message id), ``pending`` (504: ids still being answered),
    ``not_ready`` (503: dependencies that are not ready).
    """

    detail: str
    request_id: str
    errors: list[FieldError] | None = None
    field: str | None = None
    index: int | None = None
    policy: str | None = None
    id: str | None = None
    pending: list[str] | None = None
    not_ready: list[str] | None = None


_NOT_JSON = "the body must be a JSON object sent with Content-Type: application/json"
_NO_BODY = "the request body is empty; send a JSON object"

_ERROR_TEXT = {
    400: "The request cannot be served as asked (for example no multi-label policy).",
    401: "No valid API key (Authorization: Bearer <key>, or X-API-Key).",
    403: "The API key may not use a policy the request names.",
    404: "No such message id.",
    413: "The body, a text, or the number of messages is over its limit.",
    422: "A field is invalid, the JSON is malformed, or a policy is unknown.",
    503: "A dependency (model, Redis, broker) is unavailable; retry later.",
    504: "The decisions were not ready in time; they are still being answered.",
}


def _error_responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    return {code: {"model": ErrorResponse, "description": _ERROR_TEXT[code]} for code in codes}


# ------------------------------------------------------------------------------------ dispatch


class Dispatcher(Protocol):
    """The gateway's side of distributed mode: hands messages to workers, reads decisions.

    Implementations send Celery tasks by name and read the decision ledger in Redis. Every
    method may block (the gateway calls them from worker threads) and may raise
    :class:`~tiergate.workers.errors.TransientError` when the broker or Redis is unreachable.
    """

    def submit_many(self, messages: Sequence[Message]) -> list[str]:
        """Publish ``messages`` for the workers; their ids, in input order."""
        ...

    def wait_many(self, ids: Sequence[str], timeout_s: float) -> list[Decision | None]:
        """Block (without polling) until each id is answered or ``timeout_s`` passes."""
        ...

    def get_many(self, ids: Sequence[str]) -> list[Decision | None]:
        """The delivered decision of each id, in order (``None`` where there is none yet)."""
        ...

    def policies(self) -> list[PolicySpec]:
        """The policies the workers serve; the first is the default one."""
        ...

    def ready(self) -> dict[str, bool]:
        """Whether each dependency is reachable, by name (``{"broker": True, "redis": False}``)."""
        ...

    def queue_depths(self) -> dict[str, int]:
        """Messages waiting in each work queue, by queue name."""
        ...


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


class _Backend(Protocol):
    """What the routes need from a mode: decide, accept, look up, report health."""

    async def start(self) -> None: ...
    async def stop(self) -> None: ...
    async def policy_book(self) -> PolicyBook: ...
    async def decide(self, messages: list[Message], timeout_s: float) -> list[Decision | None]: ...
    async def accept(self, messages: list[Message]) -> list[str]: ...
    async def lookup(self, message_id: str) -> Decision | PendingResponse | None: ...
    async def readiness(self) -> dict[str, bool]: ...
    def queue_depths(self) -> dict[str, int]: ...
    def budget_readings(self) -> list[BudgetReading]: ...


class _EmbeddedBackend:
    """The cascade in this process: micro-batched, decisions delivered to the ledger.

    Every decision (of /v1/classify and of /v1/messages alike) is delivered to the ledger, so
    a request that timed out can be read back by id. Ids accepted and not yet delivered are
    tracked, so a lookup can say "pending" rather than "unknown".
    """

    def __init__(
        self,
        settings: Settings,
        cascade: Cascade,
        ledger: DecisionLedger,
        metrics: GatewayMetrics,
    ) -> None:
        self.settings = settings
        self.cascade = cascade
        self.ledger = ledger
        self.metrics = metrics
        # The BERT step is CPU-bound: as many batches at once as the cores allow, each with
        # its share of the cores (see _build_embedded_cascade). The LLM step waits on the
        # network, so it runs beside them, outside the batcher.
        self.batcher: MicroBatcher[Decision | LLMWork] = MicroBatcher(
            self._first_pass,
            window_ms=settings.gateway_batch_window_ms,
            max_batch=settings.batch_size,
            concurrency=settings.gateway_batches_in_flight,
            on_batch=metrics.observe_batch,
            solo=self._has_long_text,
        )
        self.model_ready = False
        self._pending: dict[str, int] = {}
        self._submitted: dict[str, float] = {}  # message id -> when its request came in
        self._background: set[asyncio.Task[Any]] = set()
        self._redis: redis.Redis | None = None

    async def start(self) -> None:
        await self.batcher.start()
        self._spawn(self._warm_up())

    async def stop(self) -> None:
        await self.batcher.stop()
        if self._background:
            await asyncio.gather(*self._background, return_exceptions=True)
        if self._redis is not None:
            self._redis.close()

    async def policy_book(self) -> PolicyBook:
        return self.cascade.policies

    async def decide(self, messages: list[Message], timeout_s: float) -> list[Decision | None]:
        task = self._spawn(self._answer(messages))
        done, _ = await asyncio.wait({task}, timeout=timeout_s)
        if task in done:
            return list(task.result())
        task.add_done_callback(self._dead_letter_if_failed(messages))
        return [None] * len(messages)

    async def accept(self, messages: list[Message]) -> list[str]:
        task = self._spawn(self._answer(messages))
        task.add_done_callback(self._dead_letter_if_failed(messages))
        return [m.id for m in messages]

    async def lookup(self, message_id: str) -> Decision | PendingResponse | None:
        found = (await anyio.to_thread.run_sync(self.ledger.get_many, [message_id]))[0]
        if found is None and message_id in self._pending:
            return PendingResponse(id=message_id)
        return found

    async def readiness(self) -> dict[str, bool]:
        checks = {"model": self.model_ready}
        if self.settings.redis_url:
            checks["redis"] = await anyio.to_thread.run_sync(self._redis_answers)
        return checks

    def queue_depths(self) -> dict[str, int]:
        return {"gateway": self.batcher.queued_messages}

    def budget_readings(self) -> list[BudgetReading]:
        budget = self.cascade.budget
        if budget is None:
            return []
        readings = []
        for spec in self.cascade.policies:
            if spec.budget.calls_per_minute is None and spec.budget.usd_per_day is None:
                continue
            state = budget.state(spec.name, spec.budget)
            readings.append(BudgetReading(spec.name, state.calls_left, state.usd_left))
        return readings

    # -------------------------------------------------------------------------- internals

    def _has_long_text(self, messages: Sequence[Message]) -> bool:
        """Whether a request holds a text of several model windows (it then runs alone)."""
        return any(self.cascade.classifier.is_long(message.text) for message in messages)

    def _first_pass(self, messages: list[Message]) -> list[Decision | LLMWork]:
        """The BERT step for a micro-batch (in its worker thread), delivering what it decided.

        Decisions the LLM has no part in are finished here, in the batch's own thread, so a
        BERT-answered request costs no second thread hop. ``total`` in each decision's
        timings is the time since its request was submitted.
        """
        first = self.cascade.first_pass(messages)
        now = time.perf_counter()
        out: list[Decision | LLMWork] = []
        for message, item in zip(messages, first, strict=True):
            if isinstance(item, LLMWork):
                out.append(item)
            else:
                out.append(self._finished(item, self._submitted.get(message.id, now), now))
        self._deliver([item for item in out if not isinstance(item, LLMWork)])
        return out

    def _answer_llm(self, first: list[Decision | LLMWork], started: float) -> list[Decision]:
        """The LLM step for what the BERT step handed on (in a worker thread), then delivery."""
        work = [item for item in first if isinstance(item, LLMWork)]
        answered = self.cascade.answer_many(work)
        now = time.perf_counter()
        finished = [self._finished(d, started, now) for d in answered]
        self._deliver(finished)
        llm_answers = iter(finished)
        return [next(llm_answers) if isinstance(item, LLMWork) else item for item in first]

    @staticmethod
    def _finished(decision: Decision, started: float, now: float) -> Decision:
        total = round((now - started) * 1000.0, 3)
        return decision.model_copy(update={"timings_ms": {**decision.timings_ms, "total": total}})

    def _deliver(self, decisions: list[Decision]) -> None:
        self.ledger.deliver_many(decisions)
        self.metrics.observe_decisions(decisions)

    async def _answer(self, messages: list[Message]) -> list[Decision]:
        ids = [m.id for m in messages]
        started = time.perf_counter()
        for message_id in ids:
            self._pending[message_id] = self._pending.get(message_id, 0) + 1
            self._submitted.setdefault(message_id, started)
        try:
            first = await self.batcher.submit(messages)
            if not any(isinstance(item, LLMWork) for item in first):
                return [item for item in first if not isinstance(item, LLMWork)]
            return await anyio.to_thread.run_sync(self._answer_llm, first, started)
        finally:
            for message_id in ids:
                left = self._pending.pop(message_id, 1) - 1
                if left > 0:
                    self._pending[message_id] = left
                else:
                    self._submitted.pop(message_id, None)

    def _spawn(self, work: Any) -> asyncio.Task[Any]:
        # The loop keeps only weak references to tasks; this set keeps them alive.
        task = asyncio.create_task(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return task

    def _dead_letter_if_failed(self, messages: list[Message]) -> Any:
        """A done-callback: messages nobody waits for any more go to the dead letters."""

        def check(task: asyncio.Task[Any]) -> None:
            if task.cancelled() or task.exception() is None:
                return
            error = task.exception()
            log.warning("messages.unanswered", count=len(messages), error_type=type(error).__name__)
            self._spawn(self._dead_letter(messages, type(error).__name__))

        return check

    async def _dead_letter(self, messages: list[Message], reason: str) -> None:
        def keep() -> None:
            for message in messages:
                self.ledger.dead_letter(message.model_dump(mode="json"), reason)

        try:
            await anyio.to_thread.run_sync(keep)
        except Exception as exc:  # noqa: BLE001 -- nothing is left to hand the error to
            log.error(  # noqa: TRY400 -- no traceback: its frames' locals may hold texts
                "messages.dead_letter_failed", count=len(messages), error_type=type(exc).__name__
            )

    async def _warm_up(self) -> None:
        try:
            await anyio.to_thread.run_sync(self.cascade.classifier.predict, _WARM_UP_TEXTS)
        except Exception as exc:  # noqa: BLE001 -- reported by /readyz, not fatal
            log.error(  # noqa: TRY400 -- no traceback: its frames' locals may hold texts
                "model.warm_up_failed", error_type=type(exc).__name__, error=str(exc)
            )
        else:
            self.model_ready = True
            log.info("model.ready", model_version=self.cascade.classifier.model_version)

    def _redis_answers(self) -> bool:
        if self._redis is None:
            assert self.settings.redis_url is not None
            self._redis = redis.Redis.from_url(
                self.settings.redis_url,
                socket_connect_timeout=_READINESS_TIMEOUT_S,
                socket_timeout=_READINESS_TIMEOUT_S,
            )
        try:
            return bool(self._redis.ping())
        except redis.RedisError:
            return False


class _DistributedBackend:
    """Messages go to the workers through a :class:`Dispatcher`; this process runs no model."""

    def __init__(self, settings: Settings, client: Dispatcher, metrics: GatewayMetrics) -> None:
        self.settings = settings
        self.client = client
        self.metrics = metrics
        # Waiting for results blocks a thread per request; keep that off the shared pool.
        self._waiters = CapacityLimiter(_DISTRIBUTED_WAITERS)
        self._book: PolicyBook | None = None
        self._book_lock = asyncio.Lock()
        self._budget: BudgetLedger | None = None

    async def start(self) -> None:
        # Policies load on first use, so a gateway started before its broker still starts.
        return

    async def stop(self) -> None:
        return

    async def policy_book(self) -> PolicyBook:
        async with self._book_lock:
            if self._book is None:
                specs = await anyio.to_thread.run_sync(self.client.policies)
                self._book = PolicyBook(specs)
            return self._book

    async def decide(self, messages: list[Message], timeout_s: float) -> list[Decision | None]:
        ids = await anyio.to_thread.run_sync(self.client.submit_many, messages)
        found = await anyio.to_thread.run_sync(
            self.client.wait_many, ids, timeout_s, limiter=self._waiters
        )
        self.metrics.observe_decisions(d for d in found if d is not None)
        return found

    async def accept(self, messages: list[Message]) -> list[str]:
        return await anyio.to_thread.run_sync(self.client.submit_many, messages)

    async def lookup(self, message_id: str) -> Decision | PendingResponse | None:
        return (await anyio.to_thread.run_sync(self.client.get_many, [message_id]))[0]

    async def readiness(self) -> dict[str, bool]:
        try:
            return dict(await anyio.to_thread.run_sync(self.client.ready))
        except Exception as exc:  # noqa: BLE001 -- a failing probe means "not ready"
            log.warning("readiness.probe_failed", error_type=type(exc).__name__)
            return {"dispatcher": False}

    def queue_depths(self) -> dict[str, int]:
        return dict(self.client.queue_depths())

    def budget_readings(self) -> list[BudgetReading]:
        # Budgets live in Redis in distributed mode; without it there is nothing shared to read.
        if self._book is None or not self.settings.redis_url:
            return []
        if self._budget is None:
            from tiergate.workers.budget import open_budget_ledger  # noqa: PLC0415 -- only when scraped

            self._budget = open_budget_ledger(self.settings)
        ledger = self._budget
        readings = []
        for spec in self._book:
            if spec.budget.calls_per_minute is None and spec.budget.usd_per_day is None:
                continue
            state = ledger.state(spec.name, spec.budget)
            readings.append(BudgetReading(spec.name, state.calls_left, state.usd_left))
        return readings


@dataclass
class _Gateway:
    """Everything the routes share, kept on ``app.state.tiergate``."""

    settings: Settings
    keyring: KeyRing
    backend: _Backend
    metrics: GatewayMetrics


# ---------------------------------------------------------------------------------- app factory


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
    decisions to ``ledger`` (default: :func:`~tiergate.workers.delivery.open_ledger`). Distributed
    mode needs ``client``. Raises ``ValueError`` for a mode without what it needs or for malformed
    API keys, and the model's errors when the model cannot be loaded.
    """
    keyring = KeyRing(settings.api_keys)
    metrics = GatewayMetrics()
    backend: _Backend
    if settings.broker_url:
        if client is None:
            raise ValueError("distributed mode (TIERGATE_BROKER_URL is set) needs a Dispatcher")
        backend = _DistributedBackend(settings, client, metrics)
    else:
        if cascade is None:
            cascade = _build_embedded_cascade(settings)
        if ledger is None:
            from tiergate.workers.delivery import open_ledger  # noqa: PLC0415 -- embedded mode only

            ledger = open_ledger(settings)
        backend = _EmbeddedBackend(settings, cascade, ledger, metrics)
    metrics.watch(budget_remaining=backend.budget_readings, queue_depths=backend.queue_depths)

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
    app.state.tiergate = _Gateway(settings, keyring, backend, metrics)
    app.include_router(_router)
    app.add_middleware(
        _RequestContextMiddleware, max_body_bytes=settings.max_body_bytes, metrics=metrics
    )
    app.add_exception_handler(GatewayError, _gateway_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(UnknownPolicyError, _unknown_policy)
    app.add_exception_handler(InputError, _input_error)
    app.add_exception_handler(TransientError, _unavailable)
    app.add_exception_handler(ModelError, _unavailable)
    app.add_exception_handler(BatcherClosedError, _unavailable)
    return app


def freeze_startup_heap() -> None:
    """Keep what startup built out of every later garbage collection (process-wide).

    Imports and the app leave about 260,000 objects that live as long as the process. A full
    collection walks every one of them: measured in the gateway under load, a 120 ms pause in
    which every request in flight waited. Collected once and frozen (:func:`gc.freeze`), they
    are never traversed again; what requests create afterwards is collected as before.
    """
    gc.collect()
    gc.freeze()


def app_from_environment() -> FastAPI:
    """The app of the environment's settings: distributed when a broker is set, else embedded.

    The factory ``tiergate serve`` runs (``uvicorn --factory
    tiergate.gateway.api:app_from_environment`` gives one app per uvicorn worker process). The
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
    from tiergate.workers.bert.classifier import BertClassifier  # noqa: PLC0415 -- loads ONNX Runtime
    from tiergate.workers.bert.scheduling import StepScheduler  # noqa: PLC0415
    from tiergate.workers.cascade import open_cascade  # noqa: PLC0415

    # Concurrent micro-batches share one session, taking turns step by step. By default its
    # intra-op threads become as many single-threaded steps at once: a step's threads do not
    # wait for each other at every operator, and a second step runs beside a long one.
    threads = settings.intra_op_threads
    slots = min(threads, settings.gateway_parallel_steps or threads)
    classifier = BertClassifier.from_settings(
        settings.model_copy(update={"intra_op_threads": max(1, threads // slots)}),
        scheduler=StepScheduler(settings.gateway_step_tokens, slots=slots),
    )
    return open_cascade(settings, classifier)


# ---------------------------------------------------------------------------------- dependencies


# The dependencies are coroutines on purpose: FastAPI runs a plain function dependency in its
# thread pool, which would cost every request two thread hops for a few microseconds of work.
async def _gateway(request: Request) -> _Gateway:
    gateway: _Gateway = request.app.state.tiergate
    return gateway


_bearer = HTTPBearer(auto_error=False, description="An API key as a bearer token.")
_api_key = APIKeyHeader(name="X-API-Key", auto_error=False, description="An API key.")


async def _grant(
    gateway: Annotated[_Gateway, Depends(_gateway)],
    bearer: Annotated[HTTPAuthorizationCredentials | None, Security(_bearer)],
    api_key: Annotated[str | None, Security(_api_key)],
) -> Grant:
    key = bearer.credentials if bearer is not None else api_key
    grant = gateway.keyring.grant_for(key)
    if grant is None:
        raise GatewayError(
            401, "a valid API key is required", headers={"WWW-Authenticate": "Bearer"}
        )
    if grant.key_id:
        structlog.contextvars.bind_contextvars(key_id=grant.key_id)
    return grant


GatewayDep = Annotated[_Gateway, Depends(_gateway)]
GrantDep = Annotated[Grant, Depends(_grant)]


# ---------------------------------------------------------------------------------- routes

_router = APIRouter()


@_router.post(
    "/v1/classify",
    response_model=ClassifyResponse,
    responses=_error_responses(401, 403, 413, 422, 503, 504),
    summary="Classify messages and wait for the decisions",
)
async def classify(
    body: Annotated[ClassifyRequest, Body()], gateway: GatewayDep, grant: GrantDep
) -> ClassifyResponse:
    """Decide one message or a batch; the decisions come back in input order."""
    batched = isinstance(body, MessageBatch)
    messages = body.messages if isinstance(body, MessageBatch) else [body]
    await _admit(gateway, grant, messages, _classify_field(batched))
    decisions = await gateway.backend.decide(messages, gateway.settings.request_timeout_s)
    return ClassifyResponse(decisions=_all_answered(messages, decisions))


@_router.post(
    "/v1/messages",
    status_code=202,
    response_model=AcceptedResponse,
    responses=_error_responses(401, 403, 413, 422, 503),
    summary="Accept messages to be answered asynchronously",
)
async def accept_messages(
    body: Annotated[ClassifyRequest, Body()], gateway: GatewayDep, grant: GrantDep
) -> AcceptedResponse:
    """Accept one message or a batch; read each decision later at /v1/messages/{id}."""
    batched = isinstance(body, MessageBatch)
    messages = body.messages if isinstance(body, MessageBatch) else [body]
    await _admit(gateway, grant, messages, _classify_field(batched))
    return AcceptedResponse(ids=await gateway.backend.accept(messages))


@_router.get(
    "/v1/messages/{message_id}",
    response_model=Decision,
    responses={
        202: {"model": PendingResponse, "description": "Accepted and not answered yet."},
        **_error_responses(401, 404, 422, 503),
    },
    summary="Read the decision of a message",
)
async def get_message(
    message_id: Annotated[str, Path(min_length=1, max_length=256)],
    gateway: GatewayDep,
    grant: GrantDep,
) -> Any:
    """The message's decision; 202 while it is pending; 404 when unknown to this caller."""
    found = await gateway.backend.lookup(message_id)
    if isinstance(found, PendingResponse):
        return JSONResponse(found.model_dump(mode="json"), status_code=202)
    # A decision under a policy the key may not use is reported as unknown, not forbidden,
    # so a key cannot probe which ids exist elsewhere.
    if found is None or not grant.allows(found.policy):
        raise GatewayError(404, "no decision for this message id", id=message_id)
    return found


@_router.get(
    "/v1/policies",
    response_model=PoliciesResponse,
    responses=_error_responses(401, 503),
    summary="List the loaded policies",
)
async def list_policies(gateway: GatewayDep, grant: GrantDep) -> PoliciesResponse:
    """The loaded policies this caller's key may use."""
    book = await gateway.backend.policy_book()
    default = book.default.name
    return PoliciesResponse(
        policies=[
            PolicyInfo(
                name=spec.name,
                version=spec.version,
                description=spec.description,
                labels=list(spec.labels),
                multi_label=spec.multi_label,
                escalation=spec.escalation,
                default=spec.name == default,
            )
            for spec in book
            if grant.allows(spec.name)
        ],
        default=default if grant.allows(default) else None,
    )


@_router.post(
    "/v1/moderations",
    response_model=ModerationResponse,
    responses=_error_responses(400, 401, 403, 413, 422, 503, 504),
    summary="Moderate texts (OpenAI moderation API shape)",
)
async def moderate(
    body: ModerationRequest, gateway: GatewayDep, grant: GrantDep
) -> ModerationResponse:
    """Flag each input under a multi-label policy, answering as OpenAI's moderation API does."""
    spec = _moderation_policy(await gateway.backend.policy_book(), body.model)
    inputs = [body.input] if isinstance(body.input, str) else body.input
    messages = []
    for index, text in enumerate(inputs):
        try:
            messages.append(Message(text=text, policy=spec.name))
        except ValidationError as exc:
            field = _moderation_field(isinstance(body.input, str))(index, "text")
            message = exc.errors()[0]["msg"]
            raise GatewayError(
                422,
                f"invalid request: {field}: {message}",
                field=field,
                index=index,
                errors=[FieldError(field=field, message=message, type="value_error")],
            ) from None
    await _admit(gateway, grant, messages, _moderation_field(isinstance(body.input, str)))
    decisions = _all_answered(
        messages, await gateway.backend.decide(messages, gateway.settings.request_timeout_s)
    )
    return ModerationResponse(
        id=f"modr-{uuid.uuid4().hex}",
        model=spec.name,
        results=[_moderation_result(spec, d) for d in decisions],
    )


@_router.get("/healthz", response_model=HealthResponse, summary="Liveness")
async def healthz() -> HealthResponse:
    """200 whenever the process answers."""
    return HealthResponse()


@_router.get(
    "/readyz",
    response_model=ReadinessResponse,
    responses={503: {"model": ErrorResponse, "description": _ERROR_TEXT[503]}},
    summary="Readiness",
)
async def readyz(gateway: GatewayDep) -> Any:
    """200 when the model is loaded and Redis and the broker answer; else 503 naming them."""
    checks = await gateway.backend.readiness()
    not_ready = sorted(name for name, ok in checks.items() if not ok)
    if not_ready:
        raise GatewayError(503, f"not ready: {', '.join(not_ready)}", not_ready=not_ready)
    return ReadinessResponse(ready=True, checks=checks)


@_router.get(
    "/metrics",
    response_class=Response,
    responses={200: {"content": {"text/plain": {}}, "description": "Prometheus text format."}},
    summary="Prometheus metrics",
)
async def metrics(gateway: GatewayDep) -> Response:
    """The gateway's metrics in Prometheus text format."""
    # Scrape-time gauges may read Redis or the broker: keep that off the event loop.
    body = await anyio.to_thread.run_sync(gateway.metrics.render)
    return Response(body, media_type=gateway.metrics.content_type)


# ---------------------------------------------------------------------------------- checks


def _classify_field(batched: bool) -> FieldPath:
    """Where a message's field sits in a /v1/classify or /v1/messages body."""
    if batched:
        return lambda index, name: f"messages[{index}].{name}"
    return lambda _index, name: name


def _moderation_field(single: bool) -> FieldPath:
    """Where an input's text sits in a /v1/moderations body."""
    if single:
        return lambda _index, _name: "input"
    return lambda index, _name: f"input[{index}]"


async def _admit(
    gateway: _Gateway, grant: Grant, messages: Sequence[Message], field_of: FieldPath
) -> None:
    """Refuse a request over a limit, with a repeated id, or naming a policy it may not use.

    ``field_of(index, name)`` gives the path, in the request body, of a message's field.
    """
    settings = gateway.settings
    if len(messages) > settings.max_batch_messages:
        raise GatewayError(
            413,
            f"{len(messages)} messages in one request; the limit is {settings.max_batch_messages}",
            field="messages",
        )
    seen: set[str] = set()
    book = await gateway.backend.policy_book()
    for index, message in enumerate(messages):
        if len(message.text) > settings.max_text_chars:
            raise GatewayError(
                413,
                f"message {index}: text of {len(message.text)} characters is over the limit "
                f"of {settings.max_text_chars}",
                field=field_of(index, "text"),
                index=index,
            )
        if message.id in seen:
            raise GatewayError(
                422,
                f"message {index}: id repeats an earlier message's",
                field=field_of(index, "id"),
                index=index,
            )
        seen.add(message.id)
        try:
            spec = book.get(message.policy)
        except UnknownPolicyError as exc:
            raise GatewayError(
                422, str(exc), field=field_of(index, "policy"), index=index, policy=message.policy
            ) from None
        if not grant.allows(spec.name):
            raise GatewayError(
                403,
                f"message {index}: this API key may not use policy {spec.name!r}",
                index=index,
                policy=spec.name,
            )


def _all_answered(
    messages: Sequence[Message], decisions: Sequence[Decision | None]
) -> list[Decision]:
    """The decisions, or a 504 naming the messages still being answered."""
    answered = [d for d in decisions if d is not None]
    if len(answered) == len(messages):
        return answered
    pending = [m.id for m, d in zip(messages, decisions, strict=True) if d is None]
    raise GatewayError(
        504,
        f"{len(pending)} of {len(messages)} decisions were not ready in time; "
        "read them later at /v1/messages/{id}",
        pending=pending,
    )


def _moderation_policy(book: PolicyBook, model: str | None) -> PolicySpec:
    if model is None:
        for spec in book:
            if spec.multi_label:
                return spec
        raise GatewayError(400, "no multi-label policy is loaded to moderate with", field="model")
    try:
        spec = book.get(model)
    except UnknownPolicyError as exc:
        raise GatewayError(422, str(exc), field="model", policy=model) from None
    if not spec.multi_label:
        raise GatewayError(
            400, f"policy {spec.name!r} is not multi-label", field="model", policy=spec.name
        )
    return spec


def _moderation_result(spec: PolicySpec, decision: Decision) -> ModerationResult:
    flagged = set(decision.labels)
    return ModerationResult(
        flagged=bool(flagged),
        categories={label: label in flagged for label in spec.label_names},
        category_scores={label: decision.scores.get(label, 0.0) for label in spec.label_names},
        category_applied_input_types={label: ["text"] for label in spec.label_names},
    )


# ---------------------------------------------------------------------------------- errors


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


# ---------------------------------------------------------------------------------- middleware


class _BodyTooLargeError(StarletteHTTPException):
    """Raised from ``receive`` when the streamed body passes the limit (FastAPI re-raises it)."""

    def __init__(self, limit: int) -> None:
        super().__init__(413, f"request body is over the limit of {limit} bytes")


class _RequestContextMiddleware:
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
