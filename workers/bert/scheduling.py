"""Sharing one ONNX Runtime session between concurrent callers without a long text in front.

In the embedded gateway, several micro-batches may be classified at once, each in its own
thread. Run side by side they would oversubscribe the cores; run one after the other, a short
message would wait behind a batch holding a text of many windows. :class:`StepScheduler`
does what chunked prefill does for LLM servers: each caller cuts its windows into steps of at
most ``step_tokens`` padded tokens, and before every step it waits for its turn. At most
``slots`` steps run at once (the embedded gateway runs one single-threaded step per core), and a
free slot goes to the caller with the fewest tokens left, so a short message overtakes a long
text between two of its steps instead of after all of them. A caller whose first step was asked
for ``max_wait_s`` ago goes first whatever it has left, so long texts are never starved.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field


@dataclass(order=True, frozen=True)
class _Waiter:
    cost: int
    order: int
    since: float = field(compare=False)


class StepScheduler:
    """Grants up to ``slots`` ONNX steps at a time, to the waiting callers with the least work left.

    Safe to share between threads; :meth:`turn` is the only operation.
    """

    def __init__(self, step_tokens: int, max_wait_s: float = 0.1, slots: int = 1) -> None:
        if step_tokens < 1 or max_wait_s <= 0 or slots < 1:
            raise ValueError("step_tokens, max_wait_s and slots must be positive")
        self.step_tokens = step_tokens
        self.max_wait_s = max_wait_s
        self.slots = slots
        self._condition = threading.Condition()
        self._waiting: list[_Waiter] = []
        # Who holds a slot, or has been handed one and not woken yet.
        self._holders: set[_Waiter] = set()
        self._order = itertools.count()
        self.steps = 0

    @contextmanager
    def turn(self, tokens_left: int, since: float | None = None) -> Iterator[None]:
        """Hold a slot for one step; ``tokens_left`` is the caller's work not yet run.

        ``since`` (``time.monotonic()``) is when the caller asked for its first step: the
        starvation bound counts from there, so a long text is late once in all, not per step.
        """
        waiter = _Waiter(tokens_left, next(self._order), since or time.monotonic())
        with self._condition:
            if len(self._holders) < self.slots:
                self._holders.add(waiter)
            else:
                self._waiting.append(waiter)
                while waiter not in self._holders:
                    self._condition.wait()
            self.steps += 1
        try:
            yield
        finally:
            with self._condition:
                self._holders.discard(waiter)
                # The next holder is chosen here, once, so every waiter sees the same choice.
                if self._waiting:
                    chosen = self._next()
                    self._waiting.remove(chosen)
                    self._holders.add(chosen)
                    self._condition.notify_all()

    def _next(self) -> _Waiter:
        """The oldest waiter past ``max_wait_s``, else the one with the least work left."""
        overdue = time.monotonic() - self.max_wait_s
        starved = [w for w in self._waiting if w.since <= overdue]
        if starved:
            return min(starved, key=lambda w: (w.since, w.order))
        return min(self._waiting)


def plan_steps(lengths: list[int], step_tokens: int, max_rows: int) -> list[list[int]]:
    """Cut windows, given as lengths sorted ascending, into steps of positions.

    A step pads its windows to its longest, so it costs rows x longest tokens; each step keeps
    that within ``step_tokens`` (a window longer than that runs alone) and within ``max_rows``.
    """
    steps: list[list[int]] = []
    current: list[int] = []
    for position, length in enumerate(lengths):
        rows = len(current) + 1
        if current and (rows * length > step_tokens or rows > max_rows):
            steps.append(current)
            current = []
        current.append(position)
    if current:
        steps.append(current)
    return steps
