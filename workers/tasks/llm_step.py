"""The LLM step: answer one message the policy escalated, once, whatever the redeliveries."""

from __future__ import annotations

from typing import Any

from celery import Celery
from pydantic import ValidationError

from tiergate.workers.cascade import LLMWork
from tiergate.workers.errors import TransientError
from tiergate.workers.tasks.names import LLM_TASK
from tiergate.workers.tasks.outcomes import deliver_or_defer
from tiergate.workers.tasks.retries import (
    dead_letter_or_republish,
    first_error,
    retry_or_dead_letter,
)
from tiergate.workers.tasks.runtime import WorkerRuntime


def run_llm_step(app: Celery, runtime: WorkerRuntime, work: Any, attempt: int) -> None:
    """The LLM step for one :class:`~tiergate.workers.cascade.LLMWork` payload (idempotent)."""
    cascade, ledger = runtime.parts()
    try:
        item = LLMWork.model_validate(work)
    except ValidationError as exc:
        reason = f"not an LLM work item: {first_error(exc)}"
        llm_queue = runtime.settings.llm_queue
        dead_letter_or_republish(
            app, ledger, work, reason, LLM_TASK, "work", attempt, queue=llm_queue
        )
        return
    try:
        if ledger.get_many([item.message.id])[0] is not None:
            return
        decision = cascade.answer(item)
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
