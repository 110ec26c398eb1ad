"""The Celery app: two queues, thin JSON tasks, and the worker-side runtime behind them.

Producers publish by task name, in any language that speaks the Celery protocol:

``tiergate.classify`` on queue ``tiergate.bert``, keyword argument ``message``: a JSON object
with ``text`` (required), ``id``, ``policy``, ``task`` and ``metadata`` (the schema of
:class:`tiergate.workers.schemas.Message`). The decision appears once per message id on the
``tiergate:decisions`` Redis Stream (field ``decision``, JSON) and under the id for
``tiergate.gateway.client``.

BERT workers (prefork, one ONNX Runtime session per process created after the fork) run
``tiergate.classify`` micro-batched with celery-batches: the worker buffers messages and runs
one :meth:`~tiergate.workers.cascade.Cascade.first_pass` for up to ``bert_flush_every`` of them, or
for what arrived within ``bert_flush_interval_s``. Decisions are delivered at once; messages the
policy sends to the LLM are handed to ``tiergate.answer_with_llm`` on queue ``tiergate.llm``, which
LLM workers (a thread pool) answer with :meth:`~tiergate.workers.cascade.Cascade.answer`.

Delivery is exactly once per message id: tasks are acknowledged late and rejected when their
worker is lost, so a crash redelivers them; the delivery ledger's atomic record-and-stream step
makes a redelivered or resubmitted id a no-op, and the decision cache's single-flight makes a
redelivered LLM step reuse the first call's answer instead of paying again. Transient failures
(Redis or the broker unreachable) are retried with exponential backoff, by republishing with a
countdown; a message that keeps failing, or a payload that is not a message, goes to the
dead-letter list with its reason (so do the messages Celery itself would drop: an undecodable
body, a refused content type, an unknown task name; see :class:`DeadLetteringConsumer`).

A task is acknowledged once its step returns, so a step never ends with work neither done nor
republished: a batch that fails half-way republishes only its messages not yet answered or
handed to the LLM step, and work whose dead letter cannot be written (Redis down) is published
again instead of being dropped.

Tasks are published with ``ignore_result=True`` (:class:`TiergateCelery` makes it the default
of ``send_task``, which does not follow ``task_ignore_result``): results are never stored or
read, and otherwise Celery subscribes to a result channel on the result backend (Redis) for
every task it sends, which costs two Redis round trips per message and, while Redis is down,
blocks a publish to a healthy broker for 20 s before failing it.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Collection, Sequence
from typing import Any

import structlog
from celery import Celery, signals
from celery.worker.consumer import Consumer
from celery_batches import Batches, SimpleRequest
from celery_batches.trace import apply_batches_task
from pydantic import ValidationError

from tiergate.workers.cascade import Cascade, LLMWork, open_cascade
from tiergate.workers.delivery import (
    DecisionLedger,
    RedisDecisionLedger,
    held_messages,
    open_ledger,
)
from tiergate.workers.errors import TransientError, UnknownPolicyError
from tiergate.workers.schemas import Decision, Message, Status
from tiergate.workers.settings import Settings

log = structlog.get_logger(__name__)

CLASSIFY_TASK = "tiergate.classify"
LLM_TASK = "tiergate.answer_with_llm"
WEBHOOK_TASK = "tiergate.webhook"
# Seconds before a deferred message (its policy's budget spent) is tried again.
DEFER_COUNTDOWN_S = 60
_MAX_BACKOFF_S = 300
# Characters of an undecodable message body kept in its dead letter.
_DEAD_BODY_CHARS = 10_000


class TiergateCelery(Celery):  # type: ignore[misc]
    """Celery whose ``send_task`` ignores results unless told otherwise.

    ``task_ignore_result`` covers tasks called through their objects, not ``send_task``, which
    tiergate publishes with everywhere; no tiergate task's result is ever read.
    """

    def send_task(self, name: str, *args: Any, **options: Any) -> Any:
        """Publish task ``name`` (see ``Celery.send_task``), ignoring its result by default."""
        options.setdefault("ignore_result", True)
        return super().send_task(name, *args, **options)


class WorkerRuntime:
    """What a worker process holds: the cascade and the delivery ledger, built on first use.

    Built lazily, so a prefork child builds its own (its ONNX Runtime session, its Redis
    connections) after the fork. Thread-safe.
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._lock = threading.Lock()
        self._cascade: Cascade | None = None
        self._ledger: DecisionLedger | None = None
        self._pid = 0

    def _build(self) -> tuple[Cascade, DecisionLedger]:
        return open_cascade(self.settings), open_ledger(self.settings)

    def parts(self) -> tuple[Cascade, DecisionLedger]:
        """The cascade and ledger of this process."""
        with self._lock:
            if self._cascade is None or self._ledger is None or self._pid != os.getpid():
                self._cascade, self._ledger = self._build()
                self._pid = os.getpid()
            return self._cascade, self._ledger

    def warm_up(self) -> None:
        """Build the parts and run the model once, so the first batch is not slow."""
        cascade, _ = self.parts()
        cascade.classifier.predict(["warm-up"])


class DeadLetteringConsumer(Consumer):  # type: ignore[misc]
    """Celery's worker consumer, keeping the messages no task can take in the dead letters.

    Celery logs and drops (acknowledges, or rejects without requeue) a message whose body
    cannot be decoded, whose content type is not accepted (only JSON is), that is not a task
    message, or that names a task this worker does not serve. tiergate keeps every payload it
    cannot answer, with the reason, so each of these is dead-lettered first: the headers that
    name the task, the content type and the body as text. Best effort: while Redis is down it
    is only logged, as Celery does.
    """

    def on_decode_error(self, message: Any, exc: Exception) -> None:
        """Dead-letter a message whose body is not valid in its content type, then drop it."""
        _dead_letter_message(self.app, message, f"undecodable message body: {exc}")
        super().on_decode_error(message, exc)

    def on_unknown_message(self, body: Any, message: Any) -> None:
        """Dead-letter a message that is not a Celery task message, then drop it."""
        _dead_letter_message(self.app, message, "not a task message")
        super().on_unknown_message(body, message)

    def on_unknown_task(self, body: Any, message: Any, exc: Exception) -> None:
        """Dead-letter a task no worker here serves (a misrouted or newer task), then drop it."""
        name = (message.headers or {}).get("task")
        _dead_letter_message(self.app, message, f"unknown task {name!r}")
        super().on_unknown_task(body, message, exc)

    def on_invalid_task(self, body: Any, message: Any, exc: Exception) -> None:
        """Dead-letter an invalid task message (a refused content type), then drop it."""
        _dead_letter_message(self.app, message, f"invalid task message: {exc}")
        super().on_invalid_task(body, message, exc)


def _dead_letter_message(app: Celery, message: Any, reason: str) -> None:
    runtime = getattr(app, "tiergate_runtime", None)
    if not isinstance(runtime, WorkerRuntime) or not runtime.settings.redis_url:
        return
    headers = message.headers or {}
    body = message.body
    text = body.decode("utf-8", errors="replace") if isinstance(body, bytes) else str(body)
    payload = {
        "task": headers.get("task"),
        "task_id": headers.get("id"),
        "content_type": message.content_type,
        "body": text[:_DEAD_BODY_CHARS],
    }
    ledger = RedisDecisionLedger.from_settings(runtime.settings)
    try:
        ledger.dead_letter(payload, reason)
    except TransientError as exc:
        log.warning("dead_letter.unavailable", reason=reason, error=str(exc))
    finally:
        ledger.client.close()


class PoolAwareBatches(Batches):  # type: ignore[misc]
    """celery-batches that keeps filling a batch while every pool process is busy.

    Plain ``Batches`` flushes whatever is buffered on every tick of its timer and hands it to
    the pool even when no process is free, so under a backlog batches stay small (a refill
    arrives only as batches finish, and the timer cuts it off). Here a partial batch is held
    while ``pool.limit`` batches are already running, for at most ``max_hold_s``, so a freed
    process takes a full batch; at idle a lone message still goes at the next tick.
    """

    abstract = True
    max_hold_s = 0.5

    def __init__(self) -> None:
        super().__init__()
        self._in_flight = 0
        self._held_since: float | None = None

    def _do_flush(self) -> None:
        buffered = self._buffer.qsize()
        busy = self._pool is not None and self._in_flight >= max(1, int(self._pool.limit or 1))
        if 0 < buffered < self.flush_every and busy:
            now = time.monotonic()
            if self._held_since is None:
                self._held_since = now
            if now - self._held_since < self.max_hold_s:
                return
        self._held_since = None
        super()._do_flush()

    def flush(self, requests: Collection[Any]) -> Any:
        """Send one batch to the pool, counting it as in flight until it returns or fails."""
        early = [r for r in requests if not r.task.acks_late]
        late = [r for r in requests if r.task.acks_late]
        serializable = ([SimpleRequest.from_request(r) for r in requests],)
        self._in_flight += 1

        def on_accepted(_pid: int, _time_accepted: float) -> None:
            for request in early:
                request.acknowledge()

        def on_return(_result: Any) -> None:
            self._in_flight -= 1
            for request in late:
                request.acknowledge()

        def on_error(_error: Any) -> None:
            self._in_flight -= 1

        return self._pool.apply_async(
            apply_batches_task,
            (self, serializable, 0, None),
            accept_callback=on_accepted,
            callback=on_return,
            error_callback=on_error,
        )


def create_celery_app(settings: Settings) -> Celery:
    """The Celery app of ``settings``: broker, queues, reliability options and both tasks."""
    if settings.broker_url is None:
        raise ValueError("distributed mode needs a broker: set TIERGATE_BROKER_URL")
    app = TiergateCelery(
        "tiergate",
        broker=settings.broker_url,
        backend=settings.result_backend or settings.redis_url,
    )
    app.conf.update(
        task_serializer="json",
        accept_content=["json"],
        result_serializer="json",
        task_ignore_result=True,
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        # A batch is acknowledged when it returns; buffer enough for a batch per process and
        # the next one, so a process that frees up finds a full batch waiting.
        worker_prefetch_multiplier=2 * settings.bert_flush_every,
        broker_transport_options={
            "visibility_timeout": settings.visibility_timeout_s,
            # Redis broker: sweep for messages of dead workers every tenth of the timeout.
            "unacked_restore_interval": max(1, min(10, settings.visibility_timeout_s // 10)),
            "unacked_restore_throttle": 1,
        },
        broker_connection_retry_on_startup=True,
        task_routes={
            CLASSIFY_TASK: {"queue": settings.bert_queue},
            LLM_TASK: {"queue": settings.llm_queue},
            WEBHOOK_TASK: {"queue": settings.llm_queue},  # I/O-bound, like LLM calls
        },
        task_default_queue=settings.bert_queue,
        worker_hijack_root_logger=False,
        worker_consumer=f"{__name__}:{DeadLetteringConsumer.__name__}",
    )
    runtime = WorkerRuntime(settings)
    app.tiergate_runtime = runtime

    @app.task(  # type: ignore[untyped-decorator]
        name=CLASSIFY_TASK,
        base=PoolAwareBatches,
        flush_every=settings.bert_flush_every,
        flush_interval=settings.bert_flush_interval_s,
        acks_late=True,
        typing=False,
    )
    def classify(requests: Sequence[SimpleRequest]) -> None:
        """Thin: the payloads of a batch of requests go to :func:`run_bert_step`."""
        payloads = [_payload(request, "message") for request in requests]
        run_bert_step(app, runtime, payloads)

    @app.task(name=LLM_TASK, acks_late=True, typing=False)  # type: ignore[untyped-decorator]
    def answer_with_llm(work: Any = None, attempt: int = 0) -> None:
        """Thin: one LLM step, see :func:`run_llm_step`."""
        run_llm_step(app, runtime, work, attempt)

    @app.task(name=WEBHOOK_TASK, acks_late=True, typing=False)  # type: ignore[untyped-decorator]
    def post_webhook(url: str = "", decision: str = "", attempt: int = 0) -> None:
        """Thin: one webhook delivery, see :func:`run_webhook`."""
        run_webhook(app, runtime, url, decision, attempt)

    del classify, answer_with_llm, post_webhook  # registered on the app by name
    return app


def _payload(request: SimpleRequest, name: str) -> tuple[Any, int]:
    kwargs = request.kwargs or {}
    value = kwargs.get(name, request.args[0] if request.args else None)
    return value, int(kwargs.get("attempt", 0) or 0)


def run_bert_step(app: Celery, runtime: WorkerRuntime, payloads: Sequence[tuple[Any, int]]) -> None:
    """The BERT step for a batch of ``(message payload, attempt)`` pairs.

    Invalid payloads and unknown policies go to the dead letters; ids already answered are
    skipped; the rest run through one ``first_pass``. A transient failure republishes the
    batch's messages with backoff (or dead-letters those out of retries).
    """
    cascade, ledger = runtime.parts()
    bert_queue = runtime.settings.bert_queue
    messages: list[tuple[Message, int]] = []
    for payload, attempt in payloads:
        try:
            message = Message.model_validate(payload)
            cascade.policies.get(message.policy)
        except ValidationError as exc:
            reason = f"not a message: {_first_error(exc)}"
            _dead_letter_or_republish(
                app, ledger, payload, reason, CLASSIFY_TASK, "message", attempt, queue=bert_queue
            )
            continue
        except UnknownPolicyError as exc:
            if _dead_letter_or_republish(
                app, ledger, payload, str(exc), CLASSIFY_TASK, "message", attempt, queue=bert_queue
            ):
                _forget(ledger, message.id)
            continue
        messages.append((message, attempt))
    if not messages:
        return
    # Ids answered (now or before) or handed to the LLM step: a failure later in the batch
    # must not republish them (after a Redis restart without persistence, a republished id
    # whose record was lost would be answered a second time).
    settled: set[str] = set()
    try:
        answered = ledger.get_many([m.id for m, _ in messages])
        settled.update(m.id for (m, _), done in zip(messages, answered, strict=True) if done)
        fresh = [pair for pair, done in zip(messages, answered, strict=True) if done is None]
        ledger.count_batch(len(fresh))
        results = cascade.first_pass([m for m, _ in fresh])
        for (message, attempt), result in zip(fresh, results, strict=True):
            if isinstance(result, LLMWork):
                app.send_task(
                    LLM_TASK,
                    kwargs={"work": result.model_dump(mode="json"), "attempt": 0},
                    queue=runtime.settings.llm_queue,
                )
            else:
                _deliver_or_defer(app, runtime, ledger, result, message, attempt)
            settled.add(message.id)
    except TransientError as exc:
        unsettled = [(m, attempt) for m, attempt in messages if m.id not in settled]
        log.warning("bert_step.retry", messages=len(unsettled), error=str(exc))
        for message, attempt in unsettled:
            _retry_or_dead_letter(
                app,
                runtime,
                ledger,
                CLASSIFY_TASK,
                {"message": message.model_dump(mode="json")},
                attempt,
                str(exc),
                queue=runtime.settings.bert_queue,
            )


def run_llm_step(app: Celery, runtime: WorkerRuntime, work: Any, attempt: int) -> None:
    """The LLM step for one :class:`~tiergate.workers.cascade.LLMWork` payload (idempotent)."""
    cascade, ledger = runtime.parts()
    try:
        item = LLMWork.model_validate(work)
    except ValidationError as exc:
        reason = f"not an LLM work item: {_first_error(exc)}"
        llm_queue = runtime.settings.llm_queue
        _dead_letter_or_republish(
            app, ledger, work, reason, LLM_TASK, "work", attempt, queue=llm_queue
        )
        return
    try:
        if ledger.get_many([item.message.id])[0] is not None:
            return
        decision = cascade.answer(item)
        _deliver_or_defer(app, runtime, ledger, decision, item.message, attempt, work=item)
    except TransientError as exc:
        _retry_or_dead_letter(
            app,
            runtime,
            ledger,
            LLM_TASK,
            {"work": item.model_dump(mode="json")},
            attempt,
            str(exc),
            queue=runtime.settings.llm_queue,
        )


def _deliver_or_defer(
    app: Celery,
    runtime: WorkerRuntime,
    ledger: DecisionLedger,
    decision: Decision,
    message: Message,
    attempt: int,
    work: LLMWork | None = None,
) -> None:
    """Deliver a final decision; a deferred one is tried again later, not delivered."""
    if decision.status is not Status.DEFERRED:
        if ledger.deliver(decision):
            _announce(app, runtime, decision)
        return
    log.info("decision.deferred", message_id=message.id, policy=decision.policy)
    if work is not None:
        name, kwargs, queue = LLM_TASK, {"work": work.model_dump(mode="json")}, "llm"
    else:
        name, kwargs, queue = CLASSIFY_TASK, {"message": message.model_dump(mode="json")}, "bert"
    app.send_task(
        name,
        kwargs={**kwargs, "attempt": attempt},
        countdown=DEFER_COUNTDOWN_S,
        queue=runtime.settings.llm_queue if queue == "llm" else runtime.settings.bert_queue,
    )


def _announce(app: Celery, runtime: WorkerRuntime, decision: Decision) -> None:
    """Queue the policy's webhook for a decision delivered just now (once per message id)."""
    cascade, _ = runtime.parts()
    spec = cascade.policies.get(decision.policy)
    if spec.webhook is not None:
        app.send_task(
            WEBHOOK_TASK,
            kwargs={"url": spec.webhook.url, "decision": decision.model_dump_json(), "attempt": 0},
            queue=runtime.settings.llm_queue,
        )


def run_webhook(app: Celery, runtime: WorkerRuntime, url: str, decision: str, attempt: int) -> None:
    """POST one decision to its policy's webhook; retry with backoff, then dead-letter."""
    cascade, ledger = runtime.parts()
    parsed = Decision.model_validate_json(decision)
    webhook = cascade.policies.get(parsed.policy).webhook
    timeout_s = webhook.timeout_s if webhook is not None else 10.0
    attempts = webhook.max_attempts if webhook is not None else 5
    body = decision.encode()
    headers = {"Content-Type": "application/json", "User-Agent": "tiergate"}
    secret = runtime.settings.webhook_secret
    if secret is not None:
        digest = hmac.new(secret.get_secret_value().encode(), body, hashlib.sha256).hexdigest()
        headers["X-Tiergate-Signature"] = f"sha256={digest}"
    # The URL is the operator's, from a policy file whose schema admits only http(s).
    request = urllib.request.Request(url, data=body, headers=headers, method="POST")  # noqa: S310
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:  # noqa: S310
            status = response.status
    except urllib.error.HTTPError as exc:
        status, problem = exc.code, f"HTTP {exc.code}"
    except (urllib.error.URLError, TimeoutError, OSError) as exc:
        status, problem = 0, f"unreachable ({exc})"
    else:
        problem = f"HTTP {status}"
    if 200 <= status < 300:
        return
    log.warning("webhook.failed", message_id=parsed.id, attempt=attempt, problem=problem)
    if attempt + 1 >= attempts:
        ledger.dead_letter(
            {"webhook": url, "decision": parsed.id},
            f"webhook gave up after {attempt + 1} attempts: {problem}",
        )
        return
    _republish(
        app, WEBHOOK_TASK, {"url": url, "decision": decision}, attempt, runtime.settings.llm_queue
    )


def _retry_or_dead_letter(
    app: Celery,
    runtime: WorkerRuntime,
    ledger: DecisionLedger,
    name: str,
    kwargs: dict[str, Any],
    attempt: int,
    reason: str,
    *,
    queue: str,
) -> None:
    """Republish with exponential backoff, or dead-letter once the retries are spent."""
    if attempt >= runtime.settings.task_max_retries:
        given_up = f"gave up after {attempt + 1} attempts: {reason}"
        if _dead_letter_or_republish(
            app, ledger, kwargs, given_up, name, None, attempt, queue=queue
        ):
            ids = [m["id"] for m in held_messages(kwargs) if isinstance(m.get("id"), str)]
            if ids:
                _forget(ledger, ids[0])
        return
    _republish(app, name, kwargs, attempt, queue)


def _republish(app: Celery, name: str, kwargs: dict[str, Any], attempt: int, queue: str) -> None:
    """Publish task ``name`` again as attempt ``attempt + 1``, after an exponential backoff."""
    app.send_task(
        name,
        kwargs={**kwargs, "attempt": attempt + 1},
        countdown=min(_MAX_BACKOFF_S, 2**attempt),
        queue=queue,
    )


def _dead_letter_or_republish(
    app: Celery,
    ledger: DecisionLedger,
    payload: Any,
    reason: str,
    name: str,
    argument: str | None,
    attempt: int,
    *,
    queue: str,
) -> bool:
    """Dead-letter ``payload``; True when written.

    While the dead-letter list cannot be written (Redis down), the task is published again
    with backoff instead, its payload under keyword ``argument`` (``None``: ``payload`` is the
    task's keyword arguments), so it is not acknowledged away: it comes back, and either
    succeeds or is dead-lettered once Redis answers.
    """
    try:
        ledger.dead_letter(payload, reason)
    except TransientError as exc:
        log.warning("dead_letter.unavailable", task=name, attempt=attempt, error=str(exc))
        kwargs = {argument: payload} if argument is not None else dict(payload)
        _republish(app, name, kwargs, attempt, queue)
        return False
    return True


def _forget(ledger: DecisionLedger, message_id: str) -> None:
    """Stop tracking a dead-lettered message; if Redis is down the sweep may resend it later."""
    try:
        ledger.forget(message_id)
    except TransientError as exc:
        log.warning("forget.failed", message_id=message_id, error=str(exc))


def _first_error(exc: ValidationError) -> str:
    first = exc.errors()[0]
    where = ".".join(str(part) for part in first["loc"]) or "payload"
    return f"{where}: {first['msg']}"


class OverdueSweep:
    """Publishes accepted messages again when they stay unanswered too long.

    Runs as a daemon thread in each worker's main process; claims are atomic in Redis, so
    several workers sweeping at once publish a message once. The ledger makes a message that
    was only slow, not lost, harmless to publish twice.
    """

    def __init__(self, app: Celery, runtime: WorkerRuntime) -> None:
        self.app = app
        self.runtime = runtime
        self.interval_s = max(1.0, min(30.0, runtime.settings.redeliver_after_s / 4))
        self._stop = threading.Event()

    def start(self) -> None:
        """Start sweeping in the background."""
        threading.Thread(target=self._run, name="tiergate-overdue-sweep", daemon=True).start()

    def stop(self) -> None:
        """Stop after the current sweep."""
        self._stop.set()

    def sweep(self) -> int:
        """One sweep; returns how many messages were published again."""
        ledger = open_ledger(self.runtime.settings)
        overdue = ledger.claim_overdue(self.runtime.settings.redeliver_after_s)
        for message_id, payload in overdue:
            log.warning("message.republished", message_id=message_id)
            self.app.send_task(
                CLASSIFY_TASK,
                kwargs=json.loads(payload),
                queue=self.runtime.settings.bert_queue,
            )
        return len(overdue)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.sweep()
            except Exception as exc:  # noqa: BLE001 -- a failed sweep is retried next interval
                log.warning("sweep.failed", error=str(exc))


@signals.worker_ready.connect  # type: ignore[untyped-decorator]
def _start_sweep(sender: Any = None, **_: Any) -> None:
    """Each worker's main process sweeps for overdue messages."""
    app = getattr(sender, "app", None) or _current_app()
    runtime = getattr(app, "tiergate_runtime", None)
    if isinstance(runtime, WorkerRuntime) and runtime.settings.redis_url:
        OverdueSweep(app, runtime).start()


@signals.worker_process_init.connect  # type: ignore[untyped-decorator]
def _warm_up_after_fork(sender: Any = None, **_: Any) -> None:
    """Each prefork child builds its own cascade and ONNX session, then warms it up."""
    app = getattr(sender, "app", None) or _current_app()
    runtime = getattr(app, "tiergate_runtime", None)
    if isinstance(runtime, WorkerRuntime):
        runtime.warm_up()


def _current_app() -> Celery:
    from celery import current_app  # noqa: PLC0415

    return current_app
