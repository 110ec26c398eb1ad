"""The overdue sweep: accepted messages left unanswered too long are published again."""

from __future__ import annotations

import json
import threading

import structlog
from celery import Celery

from tiergate.workers.ledger import open_ledger
from tiergate.workers.tasks.names import CLASSIFY_TASK
from tiergate.workers.tasks.runtime import WorkerRuntime

log = structlog.get_logger(__name__)


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
