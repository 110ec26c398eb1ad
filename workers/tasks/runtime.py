"""What a worker process holds between tasks."""

from __future__ import annotations

import os
import threading

from tiergate.workers.cascade import Cascade, open_cascade
from tiergate.workers.delivery import DecisionLedger, open_ledger
from tiergate.workers.settings import Settings


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
