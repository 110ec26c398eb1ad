"""The LLM step: answer one message the policy escalated, once, whatever the redeliveries."""

from __future__ import annotations

from typing import Any

from celery import Celery
from pydantic import ValidationError

from tiergate.policies.spec import CallMode
from tiergate.workers.batches import BatchStore, hold_for_batch
from tiergate.workers.cascade import Cascade, LLMWork
from tiergate.workers.errors import TransientError
from tiergate.workers.ledger import DeadLetterKind, DecisionLedger, IdReused, RedisDecisionLedger
from tiergate.workers.schemas import Decision
from tiergate.workers.tasks.names import LLM_TASK
from tiergate.workers.tasks.outcomes import deliver_or_defer
from tiergate.workers.tasks.retries import (
    WrongArguments,
    dead_letter_or_republish,
    dead_letter_reused_id,
    first_error,
    retry_or_dead_letter,
)
from tiergate.workers.tasks.runtime import WorkerRuntime
from tiergate.workers.tasks.timings import StepClock, worker_timings


def run_llm_step(
    app: Celery, runtime: WorkerRuntime, work: Any, attempt: int, *, published: object = None
) -> None:
    """The LLM step for one :class:`~tiergate.workers.cascade.LLMWork` payload (idempotent).

    A payload that is not LLM work (or wrong task arguments) is dead-lettered, and so is work
    whose id was answered meanwhile for another text. ``published`` is when the work was
    published (its message header; ``None``: unknown): the decision's ``total`` and ``queued``
    add this step's to the BERT step's (see :mod:`~tiergate.workers.tasks.timings`).
    """
    clock = StepClock()
    cascade, ledger = runtime.parts()
    llm_queue = runtime.settings.llm_queue
    if isinstance(work, WrongArguments):
        dead_letter_or_republish(
            app,
            ledger,
            work,
            work.reason,
            LLM_TASK,
            "work",
            attempt,
            queue=llm_queue,
            kind=DeadLetterKind.WRONG_ARGUMENTS,
        )
        return
    try:
        item = LLMWork.model_validate(work)
    except ValidationError as exc:
        reason = f"not an LLM work item: {first_error(exc)}"
        dead_letter_or_republish(
            app,
            ledger,
            work,
            reason,
            LLM_TASK,
            "work",
            attempt,
            queue=llm_queue,
            kind=DeadLetterKind.NOT_LLM_WORK,
        )
        return
    try:
        found = ledger.answers_for([item.message])[0]
        if isinstance(found, IdReused):
            dead_letter_reused_id(app, runtime, ledger, item.message, attempt, work=item)
        if found is not None:
            return
        if cascade.policies.get(item.policy).llm.mode is CallMode.BATCH:
            cached = _hold_for_batch(runtime, cascade, ledger, item)
            if cached is not None:
                deliver_or_defer(app, runtime, ledger, cached, item.message, attempt, work=item)
            return
        answer = cascade.answer(item)
        timings = worker_timings(answer.timings_ms, clock, published, earlier=item.timings_ms)
        decision = answer.model_copy(update={"timings_ms": timings})
        deliver_or_defer(app, runtime, ledger, decision, item.message, attempt, work=item)
    except TransientError as exc:
        retry_or_dead_letter(
            app,
            runtime,
            ledger,
            LLM_TASK,
            {"work": item.model_dump(mode="json")},
            attempt,
            str(exc),
            queue=runtime.settings.llm_queue,
        )


def _hold_for_batch(
    runtime: WorkerRuntime, cascade: Cascade, ledger: DecisionLedger, work: LLMWork
) -> Decision | None:
    """Queue a batch-mode policy's work for its next batch (a cached answer instead, if any)."""
    if not isinstance(ledger, RedisDecisionLedger):
        raise TypeError("batch mode needs the Redis ledger (TIERGATE_REDIS_URL)")
    store = BatchStore.from_settings(runtime.settings, ledger.client)
    return hold_for_batch(cascade, ledger, store, work)
