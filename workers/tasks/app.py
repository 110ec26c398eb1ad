"""The Celery app: configuration, the three thin tasks, and the worker's signal handlers."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import structlog
from celery import Celery, signals
from celery.worker.consumer import Consumer
from celery_batches import SimpleRequest

from tiergate.policies.spec import CallMode
from tiergate.workers.batches import BatchRunner, BatchStore
from tiergate.workers.errors import TransientError
from tiergate.workers.ledger import DeadLetterKind, RedisDecisionLedger
from tiergate.workers.settings import Settings
from tiergate.workers.tasks.bert_step import PoolAwareBatches, check_batches_hooks, run_bert_step
from tiergate.workers.tasks.llm_step import run_llm_step
from tiergate.workers.tasks.names import CLASSIFY_TASK, LLM_TASK, SENT_AT_HEADER, WEBHOOK_TASK
from tiergate.workers.tasks.outcomes import announce
from tiergate.workers.tasks.retries import DEAD_BODY_CHARS, task_payload
from tiergate.workers.tasks.runtime import WorkerRuntime
from tiergate.workers.tasks.sweep import OverdueSweep
from tiergate.workers.tasks.webhooks import run_webhook

log = structlog.get_logger(__name__)


class TiergateCelery(Celery):  # type: ignore[misc]
    """Celery whose ``send_task`` ignores results unless told otherwise, and stamps the time.

    ``task_ignore_result`` covers tasks called through their objects, not ``send_task``, which
    tiergate publishes with everywhere. No tiergate task's result is ever read, and a publish
    that keeps its result subscribes to a result channel on the result backend: two Redis round
    trips per message, and a publish that depends on Redis as well as the broker.

    Every publish carries its time in header :data:`SENT_AT_HEADER` (unless the caller set it),
    from which workers measure how long a message was queued.
    """

    def send_task(self, name: str, *args: Any, **options: Any) -> Any:
        """Publish task ``name`` (see ``Celery.send_task``), ignoring its result by default."""
        options.setdefault("ignore_result", True)
        options["headers"] = {SENT_AT_HEADER: time.time(), **(options.get("headers") or {})}
        return super().send_task(name, *args, **options)


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
        reason = f"undecodable message body: {exc}"
        _dead_letter_message(self.app, message, reason, DeadLetterKind.UNDECODABLE)
        super().on_decode_error(message, exc)

    def on_unknown_message(self, body: Any, message: Any) -> None:
        """Dead-letter a message that is not a Celery task message, then drop it."""
        _dead_letter_message(self.app, message, "not a task message", DeadLetterKind.NOT_A_TASK)
        super().on_unknown_message(body, message)

    def on_unknown_task(self, body: Any, message: Any, exc: Exception) -> None:
        """Dead-letter a task no worker here serves (a misrouted or newer task), then drop it."""
        name = (message.headers or {}).get("task")
        _dead_letter_message(
            self.app, message, f"unknown task {name!r}", DeadLetterKind.UNKNOWN_TASK
        )
        super().on_unknown_task(body, message, exc)

    def on_invalid_task(self, body: Any, message: Any, exc: Exception) -> None:
        """Dead-letter an invalid task message (a refused content type), then drop it."""
        reason = f"invalid task message: {exc}"
        _dead_letter_message(self.app, message, reason, DeadLetterKind.INVALID_TASK)
        super().on_invalid_task(body, message, exc)


def _dead_letter_message(app: Celery, message: Any, reason: str, kind: DeadLetterKind) -> None:
    """Keep a message no task can take: the headers naming its task, and its body (bounded)."""
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
        "body": text[:DEAD_BODY_CHARS],
    }
    ledger = RedisDecisionLedger.from_settings(runtime.settings)
    try:
        ledger.dead_letter(payload, reason, kind=kind)
    except TransientError as exc:
        log.warning("dead_letter.unavailable", reason=reason, error=str(exc))
    finally:
        ledger.client.close()


def create_celery_app(settings: Settings) -> Celery:
    """The Celery app of ``settings``: broker, queues, reliability options and the tasks.

    Raises:
        ValueError: when ``settings`` names no broker.
        RuntimeError: when the installed celery-batches lacks a hook the BERT step relies on
            (see :func:`~tiergate.workers.tasks.bert_step.check_batches_hooks`).
    """
    if settings.broker_url is None:
        raise ValueError("distributed mode needs a broker: set TIERGATE_BROKER_URL")
    check_batches_hooks()
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
        """Thin: the payloads of a batch of requests go to :func:`run_bert_step`.

        The message is keyword ``message``, or the only positional argument; other arguments
        reach the step as :class:`~tiergate.workers.tasks.retries.WrongArguments`.
        """
        payloads = [_payload(request, "message") for request in requests]
        published = [(request.request_dict or {}).get(SENT_AT_HEADER) for request in requests]
        run_bert_step(app, runtime, payloads, published)

    @app.task(  # type: ignore[untyped-decorator]
        name=LLM_TASK, bind=True, acks_late=True, typing=False
    )
    def answer_with_llm(task: Any, *args: Any, **kwargs: Any) -> None:
        """Thin: one LLM step (keyword ``work``), see :func:`run_llm_step`."""
        work = task_payload(args, kwargs, "work")
        published = task.request.get(SENT_AT_HEADER)
        run_llm_step(app, runtime, work, _attempt(kwargs), published=published)

    @app.task(name=WEBHOOK_TASK, acks_late=True, typing=False)  # type: ignore[untyped-decorator]
    def post_webhook(url: str = "", decision: str = "", attempt: int = 0) -> None:
        """Thin: one webhook delivery, see :func:`run_webhook`."""
        run_webhook(app, runtime, url, decision, attempt)

    del classify, answer_with_llm, post_webhook  # registered on the app by name
    return app


def _payload(request: SimpleRequest, name: str) -> tuple[Any, int]:
    """A batched request's payload argument ``name`` (see ``task_payload``) and its attempt."""
    kwargs = request.kwargs or {}
    return task_payload(request.args or (), kwargs, name), _attempt(kwargs)


def _attempt(kwargs: dict[str, Any]) -> int:
    """The attempt a task's keyword arguments name (0 when absent or not a number)."""
    try:
        return int(kwargs.get("attempt", 0) or 0)
    except (TypeError, ValueError):
        return 0


@signals.worker_ready.connect  # type: ignore[untyped-decorator]
def _start_sweep(sender: Any = None, **_: Any) -> None:
    """Each worker's main process sweeps for overdue messages."""
    app = getattr(sender, "app", None) or _current_app()
    runtime = getattr(app, "tiergate_runtime", None)
    if isinstance(runtime, WorkerRuntime) and runtime.settings.redis_url:
        OverdueSweep(app, runtime).start()


@signals.worker_ready.connect  # type: ignore[untyped-decorator]
def _start_batches(sender: Any = None, **_: Any) -> None:
    """An LLM worker's main process sends and polls the batches of batch-mode policies."""
    app = getattr(sender, "app", None) or _current_app()
    runtime = getattr(app, "tiergate_runtime", None)
    if not isinstance(runtime, WorkerRuntime) or not runtime.settings.redis_url:
        return
    if runtime.settings.llm_queue not in set(app.amqp.queues.consume_from or {}):
        return
    cascade, ledger = runtime.parts()
    if not isinstance(ledger, RedisDecisionLedger):
        return
    if any(spec.llm.mode is CallMode.BATCH for spec in cascade.policies):
        store = BatchStore.from_settings(runtime.settings, ledger.client)
        BatchRunner(
            cascade,
            ledger,
            store,
            runtime.settings,
            on_delivered=lambda decision: announce(app, runtime, decision),
        ).start()


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
