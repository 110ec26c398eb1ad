"""The gateway's two modes behind one :class:`Backend`, which is all the routes call.

Embedded (no broker): the cascade runs in this process. Concurrent requests share one BERT
pass (:class:`~tiergate.gateway.http.batching.MicroBatcher`); the LLM step runs beside the
batches, and every decision is delivered to the decision ledger. Distributed: messages go to
the workers through a :class:`Dispatcher` (Celery tasks sent by name, results waited on
without polling) and this process runs no model. Blocking work always runs in worker threads,
never on the event loop.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from typing import Any, Protocol

import anyio.to_thread
import redis
import structlog
from anyio import CapacityLimiter

from tiergate.gateway.http.batching import MicroBatcher
from tiergate.gateway.http.metrics import BudgetReading, GatewayMetrics
from tiergate.gateway.http.types import PendingResponse
from tiergate.policies.spec import PolicySpec
from tiergate.workers.budget import BudgetLedger
from tiergate.workers.cascade import Cascade, LLMWork, PolicyBook
from tiergate.workers.errors import TransientError
from tiergate.workers.ledger import (
    DeadLetterKind,
    DecisionLedger,
    Delivery,
    IdReused,
    LocalDecisionLedger,
    id_reused_reason,
)
from tiergate.workers.redis_connection import probe_redis
from tiergate.workers.schemas import Decision, Message
from tiergate.workers.settings import Settings

log = structlog.get_logger(__name__)

# Distributed mode: the most requests that may each block a thread, waiting for their decisions.
_DISTRIBUTED_WAITERS = 256
_READINESS_TIMEOUT_S = 2.0
# How long a distributed gateway trusts the policies it read before asking again: a worker that
# starts with new policies is heard from within this many seconds.
_POLICY_REFRESH_S = 30.0
_WARM_UP_TEXTS = ["tiergate warm-up"]


class Dispatcher(Protocol):
    """The gateway's side of distributed mode: hands messages to workers, reads decisions.

    Implementations send Celery tasks by name and read the decision ledger in Redis. Every
    method may block (the gateway calls them from worker threads) and may raise
    :class:`~tiergate.workers.errors.TransientError` when the broker or Redis is unreachable.
    """

    def submit_many(self, messages: Sequence[Message]) -> list[str]:
        """Publish ``messages`` for the workers; their ids, in input order."""
        ...

    def wait_for(
        self, messages: Sequence[Message], timeout_s: float
    ) -> list[Decision | IdReused | None]:
        """Block (without polling) until each message is answered or ``timeout_s`` passes.

        :class:`IdReused` for a message whose id was answered for another text.
        """
        ...

    def get_many(self, ids: Sequence[str]) -> list[Decision | None]:
        """The delivered decision of each id, in order (``None`` where there is none yet)."""
        ...

    def answers_for(self, messages: Sequence[Message]) -> list[Decision | IdReused | None]:
        """Each message's decision so far; :class:`IdReused` where made for another text."""
        ...

    def dead_letter_counts(self) -> dict[str, int]:
        """Dead letters written, by kind."""
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


class Backend(Protocol):
    """What the routes need from a mode: decide, accept, look up, report health."""

    async def start(self) -> None:
        """Start the mode's background work; called once, when the app starts."""
        ...

    async def stop(self) -> None:
        """Stop it and wait for the work in flight; called once, when the app stops."""
        ...

    async def policy_book(self) -> PolicyBook:
        """The policies this mode serves."""
        ...

    async def decide(
        self, messages: list[Message], timeout_s: float
    ) -> list[Decision | IdReused | None]:
        """The decisions of ``messages`` in input order; ``None`` for each not ready in time.

        A message not decided within ``timeout_s`` is still answered, and its decision
        delivered, later. :class:`IdReused` for one whose id was answered meanwhile for another
        text (its decision is not delivered).
        """
        ...

    async def reused_ids(self, messages: list[Message]) -> list[int]:
        """The positions of the messages whose id was answered before for another text."""
        ...

    async def accept(self, messages: list[Message]) -> list[str]:
        """Take ``messages`` to be decided and delivered later; their ids, in input order."""
        ...

    async def lookup(self, message_id: str) -> Decision | PendingResponse | None:
        """The decision of ``message_id`` once delivered, else ``None``.

        :class:`PendingResponse` while it is still being answered, when the mode can tell.
        """
        ...

    async def readiness(self) -> dict[str, bool]:
        """Whether each dependency is ready, by name (``{"model": True, "redis": False}``)."""
        ...

    def queue_depths(self) -> dict[str, int]:
        """Messages waiting, by queue name; read on every metrics scrape."""
        ...

    def budget_readings(self) -> list[BudgetReading]:
        """What is left of each budgeted policy's LLM budget; read on every metrics scrape."""
        ...

    def dead_letter_counts(self) -> dict[str, int]:
        """Dead letters written, by kind; read on every metrics scrape."""
        ...


class _EmbeddedBackend:
    """The cascade in this process: micro-batched, decisions delivered to the ledger.

    Every decision (of /v1/classify and of /v1/messages alike) is delivered to the ledger, so
    a request that timed out can be read back by id. Ids accepted and not yet delivered are
    tracked, so a lookup can say "pending" rather than "unknown". A decision whose id the
    ledger already holds for another text is not delivered: the request gets
    :class:`IdReused`, and a message accepted for later goes to the dead letters.
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
        # The BERT step is CPU-bound: its batches share the cores, taking turns step by step
        # (see _build_embedded_cascade in app.py). The LLM step waits on the network, so it
        # runs beside them, outside the batcher.
        self.batcher: MicroBatcher[Decision | LLMWork | IdReused] = MicroBatcher(
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

    async def decide(
        self, messages: list[Message], timeout_s: float
    ) -> list[Decision | IdReused | None]:
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

    async def reused_ids(self, messages: list[Message]) -> list[int]:
        if isinstance(self.ledger, LocalDecisionLedger):
            # A lookup in this process's memory: cheaper than the thread hop Redis needs.
            found = self.ledger.answers_for(messages)
        else:
            found = await anyio.to_thread.run_sync(self.ledger.answers_for, messages)
        return [i for i, answer in enumerate(found) if isinstance(answer, IdReused)]

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

    def dead_letter_counts(self) -> dict[str, int]:
        return self.ledger.dead_letter_counts()

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

    def _first_pass(self, messages: list[Message]) -> list[Decision | LLMWork | IdReused]:
        """The BERT step for a micro-batch (in its worker thread), delivering what it decided.

        Decisions the LLM has no part in are finished here, in the batch's own thread, so a
        BERT-answered request costs no second thread hop. ``total`` in each decision's
        timings is the time since its request was submitted.
        """
        first = self.cascade.first_pass(messages)
        now = time.perf_counter()
        out: list[Decision | LLMWork | IdReused] = list(first)
        finished = [
            (i, self._finished(item, self._submitted.get(messages[i].id, now), now))
            for i, item in enumerate(first)
            if not isinstance(item, LLMWork)
        ]
        delivered = self._deliver([messages[i] for i, _ in finished], [d for _, d in finished])
        for (i, _), item in zip(finished, delivered, strict=True):
            out[i] = item
        return out

    def _answer_llm(
        self, first: list[Decision | LLMWork | IdReused], started: float
    ) -> list[Decision | IdReused]:
        """The LLM step for what the BERT step handed on (in a worker thread), then delivery."""
        work = [item for item in first if isinstance(item, LLMWork)]
        answered = self.cascade.answer_many(work)
        now = time.perf_counter()
        finished = [self._finished(d, started, now) for d in answered]
        llm_answers = iter(self._deliver([w.message for w in work], finished))
        return [next(llm_answers) if isinstance(item, LLMWork) else item for item in first]

    @staticmethod
    def _finished(decision: Decision, started: float, now: float) -> Decision:
        total = round((now - started) * 1000.0, 3)
        return decision.model_copy(update={"timings_ms": {**decision.timings_ms, "total": total}})

    def _deliver(
        self, messages: Sequence[Message], decisions: list[Decision]
    ) -> list[Decision | IdReused]:
        """Deliver each message's decision; :class:`IdReused` where its id has another text's."""
        deliveries = self.ledger.deliver_many(decisions, [m.text for m in messages])
        self.metrics.observe_decisions(decisions)
        return [
            IdReused(decision.id) if delivery is Delivery.ID_REUSED else decision
            for decision, delivery in zip(decisions, deliveries, strict=True)
        ]

    async def _answer(self, messages: list[Message]) -> list[Decision | IdReused]:
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
        """A done-callback: messages nobody waits for any more go to the dead letters.

        Those of a failed answer, and those whose id was answered for another text meanwhile.
        """

        def check(task: asyncio.Task[Any]) -> None:
            if task.cancelled():
                return
            error = task.exception()
            if error is None:
                for message, found in zip(messages, task.result(), strict=True):
                    if isinstance(found, IdReused):
                        reason = id_reused_reason(message.id)
                        self._spawn(self._dead_letter([message], reason, DeadLetterKind.ID_REUSED))
                return
            log.warning("messages.unanswered", count=len(messages), error_type=type(error).__name__)
            reason = type(error).__name__
            self._spawn(self._dead_letter(messages, reason, DeadLetterKind.UNANSWERED))

        return check

    async def _dead_letter(
        self, messages: list[Message], reason: str, kind: DeadLetterKind
    ) -> None:
        def keep() -> None:
            for message in messages:
                self.ledger.dead_letter(message.model_dump(mode="json"), reason, kind=kind)

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
            self._redis = probe_redis(self.settings.redis_url, _READINESS_TIMEOUT_S)
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
        self._book_read_at = 0.0
        self._budget: BudgetLedger | None = None

    async def start(self) -> None:
        # Policies load on first use, so a gateway started before its broker still starts.
        return

    async def stop(self) -> None:
        return

    async def policy_book(self) -> PolicyBook:
        async with self._book_lock:
            now = time.monotonic()
            if self._book is None or now - self._book_read_at >= _POLICY_REFRESH_S:
                try:
                    specs = await anyio.to_thread.run_sync(self.client.policies)
                except TransientError:
                    if self._book is None:
                        raise
                    log.warning("policies.refresh_failed")  # keep serving the last known ones
                else:
                    self._book = PolicyBook(specs)
                self._book_read_at = now
            return self._book

    async def decide(
        self, messages: list[Message], timeout_s: float
    ) -> list[Decision | IdReused | None]:
        # Messages answered before are not published again, and their decisions (paid for
        # then) are not counted again in the metrics.
        found = await anyio.to_thread.run_sync(self.client.answers_for, messages)
        fresh = [i for i, answer in enumerate(found) if answer is None]
        if fresh:
            pending = [messages[i] for i in fresh]
            await anyio.to_thread.run_sync(self.client.submit_many, pending)
            answered = await anyio.to_thread.run_sync(
                self.client.wait_for, pending, timeout_s, limiter=self._waiters
            )
            self.metrics.observe_decisions(d for d in answered if isinstance(d, Decision))
            for i, answer in zip(fresh, answered, strict=True):
                found[i] = answer
        return found

    async def accept(self, messages: list[Message]) -> list[str]:
        return await anyio.to_thread.run_sync(self.client.submit_many, messages)

    async def reused_ids(self, messages: list[Message]) -> list[int]:
        found = await anyio.to_thread.run_sync(self.client.answers_for, messages)
        return [i for i, answer in enumerate(found) if isinstance(answer, IdReused)]

    def dead_letter_counts(self) -> dict[str, int]:
        return dict(self.client.dead_letter_counts())

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
