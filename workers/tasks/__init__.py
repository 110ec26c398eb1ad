"""The Celery side of tiergate: the app, its thin JSON tasks, and the steps behind them.

Producers, in any language that speaks the Celery protocol, publish ``tiergate.classify``
(:data:`CLASSIFY_TASK`) to the BERT queue (setting ``bert_queue``, default ``tiergate.bert``)
with keyword argument ``message``: a JSON object with ``text`` (required), ``id``, ``policy``,
``task`` and ``metadata`` (:class:`tiergate.workers.schemas.Message`; other fields holding JSON
scalars travel in ``metadata``). Header ``tiergate_sent_at`` (:data:`SENT_AT_HEADER`, the publish
time in Unix seconds) gives decisions their ``queued`` timing. Escalated messages go on
as ``tiergate.answer_with_llm`` (:data:`LLM_TASK`) and webhooks as ``tiergate.webhook``
(:data:`WEBHOOK_TASK`), both on the LLM queue (``llm_queue``, default ``tiergate.llm``). Each
decision appears once on the ``tiergate:decisions`` Redis Stream (field ``decision``, JSON) and
under its id for :class:`tiergate.gateway.client.TiergateClient`.

Exactly once per message id: tasks are acknowledged late and requeued when their worker dies;
the ledger's atomic record-and-stream makes a redelivered id a no-op, and the decision cache's
single-flight makes a redelivered LLM step reuse the first call's answer. What cannot be
answered goes to the dead letters with its reason.
"""

from tiergate.workers.tasks.app import DeadLetteringConsumer, TiergateCelery, create_celery_app
from tiergate.workers.tasks.bert_step import PoolAwareBatches, check_batches_hooks, run_bert_step
from tiergate.workers.tasks.llm_step import run_llm_step
from tiergate.workers.tasks.names import CLASSIFY_TASK, LLM_TASK, SENT_AT_HEADER, WEBHOOK_TASK
from tiergate.workers.tasks.runtime import WorkerRuntime
from tiergate.workers.tasks.sweep import OverdueSweep
from tiergate.workers.tasks.webhooks import run_webhook

__all__ = [
    "CLASSIFY_TASK",
    "LLM_TASK",
    "SENT_AT_HEADER",
    "WEBHOOK_TASK",
    "DeadLetteringConsumer",
    "OverdueSweep",
    "PoolAwareBatches",
    "TiergateCelery",
    "WorkerRuntime",
    "check_batches_hooks",
    "create_celery_app",
    "run_bert_step",
    "run_llm_step",
    "run_webhook",
]
