"""Work that fails: republished with exponential backoff, or dead-lettered with its reason.

A transient failure (Redis or the broker unreachable) republishes the task with a countdown, as
attempt ``attempt + 1``; once ``task_max_retries`` are spent, or when a payload is not valid work
(not a message, the wrong task arguments, an id already answered for another text), it goes to
the dead-letter list. While that list cannot be written, the work is republished instead, so a
step never acknowledges away work it neither did nor kept.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import structlog
from celery import Celery
from pydantic import ValidationError

from tiergate.workers.errors import TransientError
from tiergate.workers.ledger import (
    DeadLetterKind,
    DecisionLedger,
    held_message_id,
    id_reused_reason,
)
from tiergate.workers.schemas import Message
from tiergate.workers.tasks.names import CLASSIFY_TASK, LLM_TASK
from tiergate.workers.tasks.runtime import WorkerRuntime

if TYPE_CHECKING:
    from tiergate.workers.cascade import LLMWork

log = structlog.get_logger(__name__)

_MAX_BACKOFF_S = 300
# Characters of a raw task body (or of unexpected task arguments) kept in a dead letter.
DEAD_BODY_CHARS = 10_000


@dataclass(frozen=True)
class WrongArguments:
    """Task arguments that do not hold the one payload argument the task takes.

    A task takes its payload as keyword ``expected`` or as its only positional argument, beside
    an optional ``attempt`` keyword; anything else is kept whole (bounded) in a dead letter.
    """

    expected: str
    args: tuple[Any, ...] = ()
    kwargs: Mapping[str, Any] = field(default_factory=dict)

    @property
    def reason(self) -> str:
        """The dead letter's reason: the keyword expected and the arguments given."""
        given = ", ".join(repr(name) for name in sorted(self.kwargs)) or "none"
        return (
            f"wrong arguments: expected keyword argument {self.expected!r} (or the "
            f"{self.expected} as the only positional argument); got keyword arguments {given} "
            f"and {len(self.args)} positional argument(s)"
        )

    def kept(self) -> dict[str, Any]:
        """What the dead letter keeps: the arguments, or their JSON cut to ``DEAD_BODY_CHARS``."""
        whole = json.dumps([list(self.args), dict(self.kwargs)], default=str)
        if len(whole) <= DEAD_BODY_CHARS:
            return {"args": list(self.args), "kwargs": dict(self.kwargs)}
        return {"body": whole[:DEAD_BODY_CHARS], "truncated": True}


def task_payload(args: Sequence[Any], kwargs: Mapping[str, Any], expected: str) -> Any:
    """The task's payload argument ``expected``, or :class:`WrongArguments` when it is not there.

    Accepted: ``expected`` as a keyword, or as the only positional argument; ``attempt`` may be
    given as a keyword beside it. Celery producers in other languages often send positional
    arguments, so the single positional form is part of the contract.
    """
    others = set(kwargs) - {expected, "attempt"}
    if expected in kwargs and not args and not others:
        return kwargs[expected]
    if len(args) == 1 and expected not in kwargs and not others:
        return args[0]
    return WrongArguments(expected, tuple(args), dict(kwargs))


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
            app,
            ledger,
            kwargs,
            given_up,
            name,
            None,
            attempt,
            queue=queue,
            kind=DeadLetterKind.GAVE_UP,
        ):
            message_id = held_message_id(kwargs)
            if message_id is not None:
                forget(ledger, message_id)
        return
    republish(app, name, kwargs, attempt, queue)


def dead_letter_reused_id(
    app: Celery,
    runtime: WorkerRuntime,
    ledger: DecisionLedger,
    message: Message,
    attempt: int,
    work: LLMWork | None = None,
) -> None:
    """Dead-letter a message whose id was answered before for another text.

    Its task arguments are kept: the BERT step's ``message``, or the LLM step's ``work``.
    """
    if work is None:
        name, kwargs = CLASSIFY_TASK, {"message": message.model_dump(mode="json")}
        queue = runtime.settings.bert_queue
    else:
        name, kwargs = LLM_TASK, {"work": work.model_dump(mode="json")}
        queue = runtime.settings.llm_queue
    reason = id_reused_reason(message.id)
    if dead_letter_or_republish(
        app, ledger, kwargs, reason, name, None, attempt, queue=queue, kind=DeadLetterKind.ID_REUSED
    ):
        forget(ledger, message.id)


def republish(
    app: Celery,
    name: str,
    kwargs: Mapping[str, Any],
    attempt: int,
    queue: str,
    args: Sequence[Any] = (),
) -> None:
    """Publish task ``name`` again as attempt ``attempt + 1``, after an exponential backoff."""
    app.send_task(
        name,
        args=list(args),
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
    kind: DeadLetterKind | str,
) -> bool:
    """Dead-letter ``payload`` under ``kind``; True when written.

    While the dead-letter list cannot be written (Redis down), the task is published again
    with backoff instead, its payload under keyword ``argument`` (``None``: ``payload`` is the
    task's keyword arguments; :class:`WrongArguments` are published as they came), so it is not
    acknowledged away: it comes back, and either succeeds or is dead-lettered once Redis answers.
    """
    kept = payload.kept() if isinstance(payload, WrongArguments) else payload
    try:
        ledger.dead_letter(kept, reason, kind=kind)
    except TransientError as exc:
        log.warning("dead_letter.unavailable", task=name, attempt=attempt, error=str(exc))
        if isinstance(payload, WrongArguments):
            republish(app, name, payload.kwargs, attempt, queue, args=payload.args)
        else:
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
