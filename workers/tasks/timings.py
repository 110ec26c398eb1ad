"""The timings a Celery step adds to a decision: ``total`` (working) and ``queued`` (waiting).

``total`` is the time from a step's start in the worker to delivery, summed over both steps for
a message the policy escalates (the BERT step's share travels in ``LLMWork.timings_ms``).
``queued`` is the time the message waited before a worker started on it: from its latest publish
(header :data:`~tiergate.workers.tasks.names.SENT_AT_HEADER`; a retry, a deferral or the overdue
sweep publishes it again, countdown included) to the BERT step's start, plus,
for an escalated message, the LLM work's wait in the LLM queue. A message published without
that header (a producer that does not set it) gets no ``queued``: nothing else in a Celery
message says when it was published. Both are in milliseconds; ``queued`` compares the
producer's clock with the worker's, so skew between machines shows in it (never below 0).
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from dataclasses import dataclass, field

_WORKER_KEYS = ("total", "queued")


@dataclass(frozen=True)
class StepClock:
    """When one step started: a monotonic time for its length, the wall time for queue waits."""

    started: float = field(default_factory=time.perf_counter)
    started_at: float = field(default_factory=time.time)

    def elapsed_ms(self) -> float:
        """Milliseconds since the step started."""
        return (time.perf_counter() - self.started) * 1000.0

    def queued_ms(self, sent_at: object) -> float | None:
        """Milliseconds from publish time ``sent_at`` (epoch seconds) to the step's start.

        ``None`` when ``sent_at`` is missing or not a finite number.
        """
        if isinstance(sent_at, bool) or not isinstance(sent_at, int | float):
            return None
        if not math.isfinite(sent_at):
            return None
        return max(0.0, (self.started_at - sent_at) * 1000.0)


def worker_timings(
    timings: Mapping[str, float],
    clock: StepClock,
    sent_at: object,
    earlier: Mapping[str, float] | None = None,
) -> dict[str, float]:
    """``timings`` with ``total`` and ``queued`` up to now, for a decision or an LLM hand-off.

    ``earlier`` is the BERT step's timings as an LLM step received them (``None`` in the BERT
    step): its ``total`` is added to this step's, and its ``queued`` to this step's wait. A
    ``queued`` that is unknown for either step is left out, not given in part.
    """
    out = {key: value for key, value in timings.items() if key not in _WORKER_KEYS}
    before = earlier or {}
    out["total"] = round(before.get("total", 0.0) + clock.elapsed_ms(), 3)
    waited = clock.queued_ms(sent_at)
    if waited is not None and (earlier is None or "queued" in earlier):
        out["queued"] = round(before.get("queued", 0.0) + waited, 3)
    return out
