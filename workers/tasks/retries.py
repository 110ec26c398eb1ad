"""Work that fails: republished with exponential backoff, or dead-lettered with its reason.

A transient failure (Redis or the broker unreachable) republishes the task with a countdown, as
attempt ``attempt + 1``; once ``task_max_retries`` are spent, or when a payload is not valid work,
it goes to the dead-letter list. While that list cannot be written, the work is republished
instead, so a step never acknowledges away work it neither did nor kept.
"""

from __future__ import annotations

from typing import Any

import structlog
from celery import Celery
from pydantic import ValidationError

from tiergate.workers.errors import TransientError
from tiergate.workers.ledger import DecisionLedger, held_messages
from tiergate.workers.tasks.runtime import WorkerRuntime

log = structlog.get_logger(__name__)

_MAX_BACKOFF_S = 300


def retry_or_dead_letter(
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
        if dead_letter_or_republish(
            app, ledger, kwargs, given_up, name, None, attempt, queue=queue
        ):
            ids = [m["id"] for m in held_messages(kwargs) if isinstance(m.get("id"), str)]
            if ids:
                forget(ledger, ids[0])
        return
    republish(app, name, kwargs, attempt, queue)


def republish(app: Celery, name: str, kwargs: dict[str, Any], attempt: int, queue: str) -> None:
    """Publish task ``name`` again as attempt ``attempt + 1``, after an exponential backoff."""
    app.send_task(
        name,
        kwargs={**kwargs, "attempt": attempt + 1},
        countdown=min(_MAX_BACKOFF_S, 2**attempt),
        queue=queue,
    )


def dead_letter_or_republish(
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
        republish(app, name, kwargs, attempt, queue)
        return False
    return True


def forget(ledger: DecisionLedger, message_id: str) -> None:
    """Stop tracking a dead-lettered message; if Redis is down the sweep may resend it later."""
    try:
        ledger.forget(message_id)
    except TransientError as exc:
        log.warning("forget.failed", message_id=message_id, error=str(exc))


def first_error(exc: ValidationError) -> str:
    """The first error of ``exc`` as ``location: message``, for a dead letter's reason."""
    first = exc.errors()[0]
    where = ".".join(str(part) for part in first["loc"]) or "payload"
    return f"{where}: {first['msg']}"
