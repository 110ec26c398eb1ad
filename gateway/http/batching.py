"""Micro-batching: concurrent requests share one call of the BERT step, so one ONNX batch.

Each HTTP request in embedded mode carries a handful of messages; ONNX Runtime is far faster
per message on a batch than on one text at a time. :class:`MicroBatcher` runs one ``decide``
call, in a worker thread, for everything that waits when the cores free up (up to
``max_batch`` messages), and hands every request its own decisions, in its own order.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

import anyio.to_thread
import structlog

from tiergate.workers.schemas import Message

log = structlog.get_logger(__name__)

T = TypeVar("T")
Decide = Callable[[list[Message]], list[T]]


class BatcherClosedError(RuntimeError):
    """The batcher is not running (not started yet, or stopped before the request ran)."""


@dataclass
class _Request(Generic[T]):
    messages: list[Message]
    future: asyncio.Future[list[T]]
    solo: bool = False


class MicroBatcher(Generic[T]):
    """Runs ``decide`` once for the messages of many concurrent :meth:`submit` calls.

    When no batch is running, a request starts at once, with whatever else is already waiting:
    an idle gateway adds no delay. While a batch runs, a new batch holds the requests that
    arrive within ``window_ms`` of its first one (or until the batcher is idle again), up to
    ``max_batch`` messages in all (a single larger request runs alone, whole). At most
    ``concurrency`` batches run at once, each in a worker thread; while they all run, new
    requests wait and form the next, larger batch, so batches grow with the load by themselves.
    A request ``solo`` picks (a long text, say) runs in a batch of its own, and the others pass
    it by: every request of a batch gets its answers when the whole batch is done, so a short
    message must not share a batch with a text that takes ten times as long. When ``decide``
    raises for a batch of several requests, each of them is decided again on its own, so a
    request fails only with its own error. ``on_batch`` is told the size of every batch run (for
    metrics).

    Use it from one event loop: :meth:`start` it, :meth:`submit` from any number of tasks,
    :meth:`stop` it.
    """

    def __init__(
        self,
        decide: Decide[T],
        *,
        window_ms: float,
        max_batch: int,
        concurrency: int = 4,
        on_batch: Callable[[int], None] | None = None,
        solo: Callable[[Sequence[Message]], bool] | None = None,
    ) -> None:
        if max_batch < 1 or concurrency < 1 or window_ms < 0:
            raise ValueError("max_batch and concurrency must be positive, window_ms not negative")
        self._decide = decide
        self.window_s = window_ms / 1000.0
        self.max_batch = max_batch
        self.concurrency = concurrency
        self._on_batch = on_batch
        self._solo = solo
        self._waiting: deque[_Request[T]] = deque()
        self._arrived: asyncio.Event | None = None
        self._slots: asyncio.Semaphore | None = None
        self._gatherer: asyncio.Task[None] | None = None
        self._running: set[asyncio.Task[None]] = set()
        self.batches = 0

    @property
    def running(self) -> bool:
        """Whether :meth:`start` was called and :meth:`stop` was not."""
        return self._gatherer is not None

    @property
    def queued_messages(self) -> int:
        """Messages submitted and not yet in a running batch (the queue depth)."""
        return sum(len(request.messages) for request in tuple(self._waiting))

    async def start(self) -> None:
        """Start gathering batches on the running event loop."""
        if self._gatherer is not None:
            return
        self._arrived = asyncio.Event()
        self._slots = asyncio.Semaphore(self.concurrency)
        self._gatherer = asyncio.create_task(self._gather(), name="tiergate-micro-batcher")

    async def stop(self) -> None:
        """Stop: waiting requests fail with :class:`BatcherClosedError`; running ones finish."""
        gatherer, self._gatherer = self._gatherer, None
        if gatherer is None:
            return
        gatherer.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await gatherer
        while self._waiting:
            request = self._waiting.popleft()
            if not request.future.done():
                request.future.set_exception(BatcherClosedError("the gateway is shutting down"))
        if self._running:
            await asyncio.gather(*self._running, return_exceptions=True)

    async def submit(self, messages: Sequence[Message]) -> list[T]:
        """The decisions of ``messages``, in order, from the batch they end up in.

        Raises whatever ``decide`` raised for these messages, or :class:`BatcherClosedError`.
        """
        if not messages:
            return []
        if self._gatherer is None or self._arrived is None:
            raise BatcherClosedError("the micro-batcher is not running")
        future: asyncio.Future[list[T]] = asyncio.get_running_loop().create_future()
        solo = self._solo is not None and self._solo(messages)
        self._waiting.append(_Request(list(messages), future, solo))
        self._arrived.set()
        return await future

    # ------------------------------------------------------------------------------ the loop

    async def _gather(self) -> None:
        assert self._arrived is not None
        assert self._slots is not None
        arrived, slots = self._arrived, self._slots
        while True:
            while not self._waiting:
                arrived.clear()
                await arrived.wait()
            if self._running and not self._waiting[0].solo:
                # Another batch holds the cores: gathering for a moment costs nothing more.
                await self._fill_window(arrived)
            await slots.acquire()
            batch = self._take_batch()
            task = asyncio.create_task(self._run(batch))
            self._running.add(task)
            task.add_done_callback(self._finished)

    def _finished(self, task: asyncio.Task[None]) -> None:
        self._running.discard(task)
        if self._arrived is not None:
            self._arrived.set()  # a gathering window ends early when the batcher goes idle

    async def _fill_window(self, arrived: asyncio.Event) -> None:
        """Wait until the window closes, a full batch waits, or no batch runs any more."""
        deadline = asyncio.get_running_loop().time() + self.window_s
        while self._running and self.queued_messages < self.max_batch:
            left = deadline - asyncio.get_running_loop().time()
            if left <= 0:
                return
            arrived.clear()
            # Waiting on the event (not on a queue) loses nothing when the timeout fires.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(left):
                    await arrived.wait()

    def _take_batch(self) -> list[_Request[T]]:
        """The oldest waiting request: alone if it is solo, else with what fits after it.

        What fits: the oldest other requests that are not solo, up to ``max_batch`` messages
        in all; solo requests passed by keep their place in line.
        """
        first = self._waiting.popleft()
        if first.solo:
            return [first]
        batch, passed = [first], []
        size = len(first.messages)
        while self._waiting and size < self.max_batch:
            request = self._waiting.popleft()
            if request.solo:
                passed.append(request)
            elif size + len(request.messages) <= self.max_batch:
                batch.append(request)
                size += len(request.messages)
            else:
                self._waiting.appendleft(request)
                break
        self._waiting.extendleft(reversed(passed))
        return batch

    async def _run(self, batch: list[_Request[T]]) -> None:
        assert self._slots is not None
        try:
            live = [request for request in batch if not request.future.done()]
            if not live:
                return
            messages = [message for request in live for message in request.messages]
            self.batches += 1
            if self._on_batch is not None:
                self._on_batch(len(messages))
            try:
                decisions = await anyio.to_thread.run_sync(self._decide, messages)
            except Exception as exc:  # noqa: BLE001 -- handed to the requests that caused it
                await self._isolate(live, exc)
                return
            if len(decisions) != len(messages):
                error = RuntimeError(f"decide returned {len(decisions)} for {len(messages)}")
                for request in live:
                    _fail(request, error)
                return
            start = 0
            for request in live:
                end = start + len(request.messages)
                if not request.future.done():
                    request.future.set_result(decisions[start:end])
                start = end
        finally:
            self._slots.release()

    async def _isolate(self, batch: list[_Request[T]], error: Exception) -> None:
        """After a failed batch, decide each request alone so each gets its own outcome."""
        if len(batch) == 1:
            _fail(batch[0], error)
            return
        log.info("batch.failed_isolating", requests=len(batch), error_type=type(error).__name__)
        for request in batch:
            try:
                decisions = await anyio.to_thread.run_sync(self._decide, request.messages)
            except Exception as exc:  # noqa: BLE001 -- this request's own error
                _fail(request, exc)
            else:
                if not request.future.done():
                    request.future.set_result(decisions)


def _fail(request: _Request[T], error: BaseException) -> None:
    if not request.future.done():
        request.future.set_exception(error)
