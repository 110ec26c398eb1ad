"""What a step does with a decision: deliver it and queue its webhook, or defer it."""

from __future__ import annotations

import structlog
from celery import Celery

from tiergate.workers.cascade import LLMWork
from tiergate.workers.ledger import DecisionLedger, Delivery
from tiergate.workers.schemas import Decision, Message, Status
from tiergate.workers.tasks.names import CLASSIFY_TASK, LLM_TASK, WEBHOOK_TASK
from tiergate.workers.tasks.retries import dead_letter_reused_id
from tiergate.workers.tasks.runtime import WorkerRuntime

log = structlog.get_logger(__name__)

# Seconds before a deferred message (its policy's budget spent) is tried again.
DEFER_COUNTDOWN_S = 60


def deliver_or_defer(
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
        delivery = ledger.deliver(decision, text=message.text)
        if delivery is Delivery.ID_REUSED:
            dead_letter_reused_id(app, runtime, ledger, message, attempt, work)
        elif delivery:
            announce(app, runtime, decision)
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


def announce(app: Celery, runtime: WorkerRuntime, decision: Decision) -> None:
    """Queue the policy's webhook for a decision delivered just now (once per message id)."""
    cascade, _ = runtime.parts()
    spec = cascade.policies.get(decision.policy)
    if spec.webhook is not None:
        app.send_task(
            WEBHOOK_TASK,
            kwargs={"url": spec.webhook.url, "decision": decision.model_dump_json(), "attempt": 0},
            queue=runtime.settings.llm_queue,
        )
