"""PoolAwareBatches over the installed celery-batches, and the check of the hooks it relies on."""

from __future__ import annotations

import importlib.metadata
from queue import Queue
from types import SimpleNamespace
from typing import Any

import pytest
from celery_batches import Batches

from tiergate.workers.settings import Settings
from tiergate.workers.tasks import bert_step, create_celery_app
from tiergate.workers.tasks.bert_step import PoolAwareBatches, check_batches_hooks

INSTALLED = importlib.metadata.version("celery-batches")


def _batches_without(name: str) -> type:
    """Batches as installed, less its own attribute ``name``."""
    namespace = {
        key: value
        for key, value in vars(Batches).items()
        if key != name and (key == "__init__" or not key.startswith("__"))
    }
    return type("Batches", Batches.__bases__, namespace)


class _DoFlushWithAnArgument(Batches):
    def _do_flush(self, _now: float) -> None:
        super()._do_flush()


class _StrategyWithoutDoFlush(Batches):
    def Strategy(self, *_: Any) -> Any:  # noqa: N802 -- Celery's name
        return self.flush


class _NoBuffer(Batches):
    def __init__(self) -> None:
        self._queue: Queue[Any] = Queue()
        self._pool = None


def test_the_installed_celery_batches_has_every_hook_pool_aware_batches_uses():
    """The version installed (and pinned) passes the check."""
    check_batches_hooks()


@pytest.mark.parametrize(
    ("stand_in", "missing"),
    [
        (_batches_without("_do_flush"), "Batches._do_flush is missing"),
        (_batches_without("flush"), "Batches.flush(self, requests) is missing"),
        (_DoFlushWithAnArgument, "Batches._do_flush takes ['self', '_now']"),
        (_StrategyWithoutDoFlush, "Batches.Strategy no longer calls self._do_flush"),
        (_NoBuffer, "a new Batches has no _buffer queue with qsize()"),
    ],
    ids=["no _do_flush", "no flush", "_do_flush with an argument", "strategy", "no _buffer"],
)
def test_a_celery_batches_without_a_hook_fails_naming_its_version_and_the_hook(
    monkeypatch, stand_in, missing
):
    """A celery-batches lacking a hook is refused with its version and what it lacks."""
    monkeypatch.setattr(bert_step, "Batches", stand_in)
    with pytest.raises(RuntimeError) as raised:
        check_batches_hooks()
    assert f"celery-batches {INSTALLED} lacks what tiergate's PoolAwareBatches" in str(raised.value)
    assert missing in str(raised.value)


def test_the_worker_app_is_not_created_over_a_celery_batches_without_the_hooks(monkeypatch):
    """create_celery_app runs the check before it builds anything."""
    monkeypatch.setattr(bert_step, "Batches", _batches_without("_do_flush"))
    settings = Settings(broker_url="memory://", redis_url="redis://127.0.0.1:6379/0")
    with pytest.raises(RuntimeError, match=r"Batches\._do_flush is missing"):
        create_celery_app(settings)


def _buffered(count: int, pool_limit: int, in_flight: int) -> tuple[PoolAwareBatches, list[int]]:
    """A PoolAwareBatches with ``count`` requests buffered, recording the sizes it flushes."""
    batches = PoolAwareBatches()
    batches.flush_every = 4
    batches._pool = SimpleNamespace(limit=pool_limit)
    batches._in_flight = in_flight
    for _ in range(count):
        batches._buffer.put(SimpleNamespace(eta=None))
    flushed: list[int] = []
    batches.flush = lambda requests: flushed.append(len(requests))
    return batches, flushed


def test_a_partial_batch_is_held_while_every_pool_process_is_busy():
    """Through the installed _do_flush: held while busy, sent once max_hold_s has passed."""
    batches, flushed = _buffered(2, pool_limit=1, in_flight=1)
    batches._do_flush()
    assert flushed == []
    batches.max_hold_s = 0.0
    batches._do_flush()
    assert flushed == [2]


def test_a_partial_batch_goes_at_once_when_a_pool_process_is_free():
    """At idle a lone message is not held."""
    batches, flushed = _buffered(1, pool_limit=2, in_flight=1)
    batches._do_flush()
    assert flushed == [1]
