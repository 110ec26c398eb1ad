"""The BERT step: micro-batched classification of messages, one ``first_pass`` per batch.

BERT workers (prefork, one ONNX Runtime session per process, created after the fork) run
``tiergate.classify`` through celery-batches: a worker buffers messages and runs one
:meth:`~tiergate.workers.cascade.Cascade.first_pass` for up to ``bert_flush_every`` of them, or
for what arrived within ``bert_flush_interval_s``. Decisions are delivered at once; messages the
policy escalates are handed to the LLM step.
"""

from __future__ import annotations

import importlib.metadata
import inspect
import time
from collections.abc import Callable, Collection, Iterator, Sequence
from typing import Any

import structlog
from celery import Celery
from celery_batches import Batches, SimpleRequest
from celery_batches.trace import apply_batches_task
from pydantic import ValidationError

from tiergate.workers.cascade import LLMWork
from tiergate.workers.errors import TransientError, UnknownPolicyError
from tiergate.workers.ledger import DeadLetterKind, IdReused
from tiergate.workers.schemas import Message
from tiergate.workers.tasks.names import CLASSIFY_TASK, LLM_TASK
from tiergate.workers.tasks.outcomes import deliver_or_defer
from tiergate.workers.tasks.retries import (
    WrongArguments,
    dead_letter_or_republish,
    dead_letter_reused_id,
    first_error,
    forget,
    retry_or_dead_letter,
)
from tiergate.workers.tasks.runtime import WorkerRuntime
from tiergate.workers.tasks.timings import StepClock, worker_timings

log = structlog.get_logger(__name__)


class PoolAwareBatches(Batches):  # type: ignore[misc]
    """celery-batches that keeps filling a batch while every pool process is busy.

    Plain ``Batches`` hands whatever is buffered to the pool on every timer tick, free process
    or not, so under a backlog its batches stay small. Here a partial batch is held while
    ``pool.limit`` batches are already running, for at most ``max_hold_s``, so a freed process
    takes a full batch; at idle a lone message still goes at the next tick.

    This overrides celery-batches' private ``_do_flush`` and reads its private ``_buffer`` and
    ``_pool``: :func:`check_batches_hooks` verifies that the installed version still has them.
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


def check_batches_hooks() -> None:
    """Fail at startup when the installed celery-batches lacks a hook PoolAwareBatches relies on.

    Verifies that ``Batches.Strategy`` still calls ``_do_flush`` (no arguments) and that
    ``_do_flush`` still hands ready requests to ``flush(requests)``; that a new ``Batches`` has
    ``_buffer`` (a queue with ``qsize``), ``_pool`` and an integer ``flush_every``; and that
    ``SimpleRequest.from_request`` and ``apply_batches_task(task, args, loglevel, logfile)``
    are there for :meth:`PoolAwareBatches.flush`.

    Raises:
        RuntimeError: naming the installed celery-batches version and each missing hook.
    """
    missing = [*_missing_flush_hooks(), *_missing_batch_parts()]
    if missing:
        try:
            version = importlib.metadata.version("celery-batches")
        except importlib.metadata.PackageNotFoundError:
            version = "(version unknown)"
        raise RuntimeError(
            f"celery-batches {version} lacks what tiergate's PoolAwareBatches relies on: "
            + "; ".join(missing)
            + ". Install a celery-batches in the range tiergate's pyproject.toml pins."
        )


def _missing_flush_hooks() -> Iterator[str]:
    """What is missing of the flush path: Strategy -> _do_flush() -> flush(requests)."""
    do_flush = getattr(Batches, "_do_flush", None)
    if not callable(do_flush):
        yield "Batches._do_flush is missing"
    else:
        if _parameters(do_flush) != ["self"]:
            yield f"Batches._do_flush takes {_parameters(do_flush)}, expected ['self']"
        if "flush" not in _names_used(do_flush):
            yield "Batches._do_flush no longer calls self.flush"
    if "_do_flush" not in _names_used(getattr(Batches, "Strategy", None)):
        yield "Batches.Strategy no longer calls self._do_flush"
    flush = getattr(Batches, "flush", None)
    if not callable(flush) or _parameters(flush) != ["self", "requests"]:
        yield "Batches.flush(self, requests) is missing or has changed"
    if not isinstance(getattr(Batches, "flush_every", None), int):
        yield "Batches.flush_every is not an integer class attribute"


def _missing_batch_parts() -> Iterator[str]:
    """What is missing of the state and helpers PoolAwareBatches reads or calls."""
    try:
        batches = Batches()
    except TypeError as exc:
        yield f"Batches() cannot be built without arguments ({exc})"
    else:
        if not callable(getattr(getattr(batches, "_buffer", None), "qsize", None)):
            yield "a new Batches has no _buffer queue with qsize()"
        if not hasattr(batches, "_pool"):
            yield "a new Batches has no _pool attribute"
    if not callable(getattr(SimpleRequest, "from_request", None)):
        yield "SimpleRequest.from_request is missing"
    expected = ["task", "args", "loglevel", "logfile"]
    if not callable(apply_batches_task) or _parameters(apply_batches_task) != expected:
        yield f"celery_batches.trace.apply_batches_task no longer takes {expected}"


def _parameters(function: Callable[..., Any]) -> list[str]:
    try:
        return list(inspect.signature(function).parameters)
    except (TypeError, ValueError):
        return []


def _names_used(function: Any) -> tuple[str, ...]:
    """The attribute and global names ``function``'s own code refers to."""
    code = getattr(function, "__code__", None)
    return tuple(code.co_names) if code is not None else ()


def _message_or_dead_letter(
    app: Celery, runtime: WorkerRuntime, payload: Any, attempt: int
) -> Message | None:
    """The message of a task's payload, or ``None`` once the payload is dead-lettered.

    Wrong task arguments, a payload that is not a message and a policy not served here are
    dead-lettered (or republished while Redis cannot keep them).
    """
    cascade, ledger = runtime.parts()

    def keep(kept: Any, reason: str, kind: DeadLetterKind) -> bool:
        queue = runtime.settings.bert_queue
        return dead_letter_or_republish(
            app, ledger, kept, reason, CLASSIFY_TASK, "message", attempt, queue=queue, kind=kind
        )

    if isinstance(payload, WrongArguments):
        keep(payload, payload.reason, DeadLetterKind.WRONG_ARGUMENTS)
        return None
    try:
        message = Message.model_validate(payload)
        cascade.policies.get(message.policy)
    except ValidationError as exc:
        keep(payload, f"not a message: {first_error(exc)}", DeadLetterKind.NOT_A_MESSAGE)
        return None
    except UnknownPolicyError as exc:
        if keep(payload, str(exc), DeadLetterKind.UNKNOWN_POLICY):
            forget(ledger, message.id)
        return None
    return message


def run_bert_step(
    app: Celery,
    runtime: WorkerRuntime,
    payloads: Sequence[tuple[Any, int]],
    published: Sequence[object] = (),
) -> None:
    """The BERT step for a batch of ``(message payload, attempt)`` pairs.

    Invalid payloads (wrong task arguments included) and unknown policies go to the dead
    letters; ids already answered for the same text are skipped, and for another text
    dead-lettered; the rest run through one ``first_pass``. A transient failure republishes the
    batch's messages with backoff (or dead-letters those out of retries).

    ``published`` holds each payload's publish time as its message header gave it (absent:
    unknown); decisions and LLM hand-offs get ``total`` and ``queued`` timings from it and
    the step's start (see :mod:`~tiergate.workers.tasks.timings`).
    """
    clock = StepClock()
    cascade, ledger = runtime.parts()
    messages: list[tuple[Message, int]] = []
    sent_at: dict[str, object] = {}
    for index, (payload, attempt) in enumerate(payloads):
        message = _message_or_dead_letter(app, runtime, payload, attempt)
        if message is not None:
            messages.append((message, attempt))
            sent_at[message.id] = published[index] if index < len(published) else None
    if not messages:
        return
    # Ids answered (now or before) or handed to the LLM step are never republished by a later
    # failure in the batch: a republished id whose record Redis lost would be answered twice.
    settled: set[str] = set()
    try:
        answered = ledger.answers_for([m for m, _ in messages])
        for (message, attempt), done in zip(messages, answered, strict=True):
            if isinstance(done, IdReused):
                dead_letter_reused_id(app, runtime, ledger, message, attempt)
        settled.update(m.id for (m, _), done in zip(messages, answered, strict=True) if done)
        fresh = [pair for pair, done in zip(messages, answered, strict=True) if done is None]
        ledger.count_batch(len(fresh))
        results = cascade.first_pass([m for m, _ in fresh])
        for (message, attempt), first in zip(fresh, results, strict=True):
            timings = worker_timings(first.timings_ms, clock, sent_at.get(message.id))
            result = first.model_copy(update={"timings_ms": timings})
            if isinstance(result, LLMWork):
                app.send_task(
                    LLM_TASK,
                    kwargs={"work": result.model_dump(mode="json"), "attempt": 0},
                    queue=runtime.settings.llm_queue,
                )
            else:
                deliver_or_defer(app, runtime, ledger, result, message, attempt)
            settled.add(message.id)
    except TransientError as exc:
        unsettled = [(m, attempt) for m, attempt in messages if m.id not in settled]
        log.warning("bert_step.retry", messages=len(unsettled), error=str(exc))
        for message, attempt in unsettled:
            retry_or_dead_letter(
                app,
                runtime,
                ledger,
                CLASSIFY_TASK,
                {"message": message.model_dump(mode="json")},
                attempt,
                str(exc),
                queue=runtime.settings.bert_queue,
            )
