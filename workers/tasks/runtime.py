"""What a worker process holds between tasks."""

from __future__ import annotations

import os
import threading

import structlog

from tiergate.workers.cascade import Cascade, open_cascade
from tiergate.workers.errors import CoordinationError
from tiergate.workers.ledger import DecisionLedger, open_ledger
from tiergate.workers.redis_connection import shared_redis
from tiergate.workers.served_policies import ServedPolicies
from tiergate.workers.settings import Settings

log = structlog.get_logger(__name__)


class WorkerRuntime:
    """What a worker process holds: the cascade and the delivery ledger, built on first use.

    Built lazily, so a prefork child builds its own (its ONNX Runtime session, its Redis
    connections) after the fork. With Redis configured, the policies the cascade serves are
    announced there (:class:`ServedPolicies`) for the processes that load no model; an
    announcement Redis refused is tried again with the next batch. Thread-safe.
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._lock = threading.Lock()
        self._cascade: Cascade | None = None
        self._ledger: DecisionLedger | None = None
        self._pid = 0
        self._announced = False

    def _build(self) -> tuple[Cascade, DecisionLedger]:
        return open_cascade(self.settings), open_ledger(self.settings)

    def parts(self) -> tuple[Cascade, DecisionLedger]:
        """The cascade and ledger of this process."""
        with self._lock:
            if self._cascade is None or self._ledger is None or self._pid != os.getpid():
                self._cascade, self._ledger = self._build()
                self._pid = os.getpid()
            if not self._announced:
                self._announced = self._announce(self._cascade)
            return self._cascade, self._ledger

    def _announce(self, cascade: Cascade) -> bool:
        """Say in Redis which policies this worker serves; whether that worked (or was moot)."""
        if not self.settings.redis_url:
            return True
        served = ServedPolicies(shared_redis(self.settings.redis_url), self.settings.cache_prefix)
        try:
            served.announce(cascade.policies, cascade.classifier.model_version)
        except CoordinationError as exc:
            log.warning("policies.announce_failed", error=str(exc))
            return False
        return True

    def warm_up(self) -> None:
        """Build the parts and run the model once, so the first batch is not slow."""
        cascade, _ = self.parts()
        cascade.classifier.predict(["warm-up"])
