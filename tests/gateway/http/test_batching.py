"""The micro-batcher: concurrent requests share cascade calls and each gets its own answers."""

from __future__ import annotations

import asyncio
import threading

import pytest

from tiergate.gateway.http.batching import BatcherClosedError, MicroBatcher
from tiergate.policies.spec import LabelSpec, PolicySpec
from tiergate.workers.cascade import Cascade, PolicyBook
from tiergate.workers.errors import InputError
from tiergate.workers.schemas import Decision, Message
from tiergate.workers.testing import FixedScoreClassifier

LABELS = ("negative", "positive")


def cascade() -> tuple[Cascade, FixedScoreClassifier]:
    """A cascade over a classifier that counts its calls: texts with 'good' score positive."""
    scorer = FixedScoreClassifier(LABELS, lambda text: (0.1, 0.9) if "good" in text else (0.9, 0.1))
    spec = PolicySpec(name="films", version="1", labels=[LabelSpec(name=n) for n in LABELS])
    return Cascade(scorer, PolicyBook([spec])), scorer


def run(coroutine):
    """Run a coroutine on a fresh event loop, bounded in time."""

    async def bounded():
        async with asyncio.timeout(60):
            return await coroutine

    return asyncio.run(bounded())


def test_concurrent_requests_share_decide_calls_and_keep_their_own_order():
    """Twenty concurrent requests cause fewer decide calls; each gets its decisions in order."""
    decider, scorer = cascade()
    sizes: list[int] = []

    async def scenario():
        batcher = MicroBatcher(decider.decide, window_ms=50, max_batch=256, on_batch=sizes.append)
        await batcher.start()
        try:
            requests = [
                [
                    Message(id=f"r{r}-m{m}", text="good film" if (r + m) % 2 else "dull film")
                    for m in range(r % 3 + 1)
                ]
                for r in range(20)
            ]
            answers = await asyncio.gather(*(batcher.submit(msgs) for msgs in requests))
        finally:
            await batcher.stop()
        return requests, answers

    requests, answers = run(scenario())
    for messages, decisions in zip(requests, answers, strict=True):
        assert [d.id for d in decisions] == [m.id for m in messages]
        assert [d.label for d in decisions] == [
            "positive" if "good" in m.text else "negative" for m in messages
        ]
    assert scorer.calls < 20
    assert sum(sizes) == sum(len(m) for m in requests)
    assert scorer.calls == len(sizes)


def test_batches_never_exceed_max_batch_unless_one_request_is_larger():
    """Requests are grouped up to max_batch messages; a larger single request runs whole."""
    decider, _ = cascade()
    sizes: list[int] = []

    async def scenario():
        batcher = MicroBatcher(decider.decide, window_ms=30, max_batch=4, on_batch=sizes.append)
        await batcher.start()
        try:
            small = [batcher.submit([Message(text=f"text {i}")]) for i in range(9)]
            large = batcher.submit([Message(text=f"big {i}") for i in range(6)])
            return await asyncio.gather(*small, large)
        finally:
            await batcher.stop()

    answers = run(scenario())
    assert [len(a) for a in answers] == [1] * 9 + [6]
    assert max(size for size in sizes if size != 6) <= 4
    assert 6 in sizes


def test_a_failing_request_does_not_fail_the_others_in_its_batch():
    """When decide raises for a batch, each request is retried alone and keeps its own outcome."""
    calls: list[int] = []
    lock = threading.Lock()
    decider, _ = cascade()

    def decide(messages: list[Message]) -> list[Decision]:
        with lock:
            calls.append(len(messages))
        if any(m.text == "poison" for m in messages):
            raise InputError("a text the model cannot take")
        return decider.decide(messages)

    async def scenario():
        batcher = MicroBatcher(decide, window_ms=50, max_batch=64)
        await batcher.start()
        try:
            return await asyncio.gather(
                batcher.submit([Message(id="ok-1", text="good")]),
                batcher.submit([Message(id="bad", text="poison")]),
                batcher.submit([Message(id="ok-2", text="dull")]),
                return_exceptions=True,
            )
        finally:
            await batcher.stop()

    first, second, third = run(scenario())
    assert [d.id for d in first] == ["ok-1"]
    assert isinstance(second, InputError)
    assert [d.id for d in third] == ["ok-2"]
    assert calls[0] == 3  # one batch first, then each request alone
    assert sorted(calls[1:]) == [1, 1, 1]


def test_submit_before_start_and_after_stop_is_refused():
    """A batcher that is not running refuses work with BatcherClosedError."""
    decider, _ = cascade()

    async def scenario():
        batcher = MicroBatcher(decider.decide, window_ms=1, max_batch=8)
        with pytest.raises(BatcherClosedError):
            await batcher.submit([Message(text="early")])
        await batcher.start()
        assert batcher.running
        decided = await batcher.submit([Message(text="in time")])
        await batcher.stop()
        with pytest.raises(BatcherClosedError):
            await batcher.submit([Message(text="late")])
        return decided

    assert len(run(scenario())) == 1


def test_empty_submission_needs_no_batch():
    """Submitting no messages returns no decisions without calling decide."""
    decider, scorer = cascade()

    async def scenario():
        batcher = MicroBatcher(decider.decide, window_ms=1, max_batch=8)
        await batcher.start()
        try:
            return await batcher.submit([])
        finally:
            await batcher.stop()

    assert run(scenario()) == []
    assert scorer.calls == 0


def test_invalid_configuration_is_refused():
    """A non-positive batch size or concurrency is a ValueError."""
    with pytest.raises(ValueError, match="positive"):
        MicroBatcher(lambda _messages: [], window_ms=1, max_batch=0)


def test_an_idle_batcher_starts_at_once_and_a_busy_one_gathers_the_next_batch():
    """No window while idle; requests arriving during a running batch form the next one."""
    decider, _ = cascade()
    release = threading.Event()
    sizes: list[int] = []

    def decide(messages: list[Message]) -> list[Decision]:
        if messages[0].text == "first":
            release.wait(60)
        return decider.decide(messages)

    async def scenario():
        # A window far longer than the test's bound: an idle start must not wait for it.
        batcher = MicroBatcher(decide, window_ms=60_000, max_batch=64, on_batch=sizes.append)
        await batcher.start()
        try:
            first = asyncio.ensure_future(batcher.submit([Message(text="first")]))
            while not sizes:
                await asyncio.sleep(0.001)
            later = [
                asyncio.ensure_future(batcher.submit([Message(text=f"later {i}")]))
                for i in range(3)
            ]
            await asyncio.sleep(0.05)
            assert sizes == [1], "the first request ran alone, the others wait"
            release.set()
            return await asyncio.gather(first, *later)
        finally:
            await batcher.stop()

    answers = run(scenario())
    assert [len(a) for a in answers] == [1, 1, 1, 1]
    assert sizes == [1, 3]


def test_a_solo_request_runs_alone_and_the_others_pass_it_by():
    """A long text never shares a batch: short requests queued behind it form their own."""
    decider, _ = cascade()
    release = threading.Event()
    batches: list[list[str]] = []

    def decide(messages: list[Message]) -> list[Decision]:
        batches.append([m.text for m in messages])
        if messages[0].text == "blocker":
            release.wait(60)
        return decider.decide(messages)

    async def scenario():
        batcher = MicroBatcher(
            decide,
            window_ms=60_000,
            max_batch=64,
            concurrency=1,
            solo=lambda messages: any(m.text.startswith("long") for m in messages),
        )
        await batcher.start()
        try:
            blocker = asyncio.ensure_future(batcher.submit([Message(text="blocker")]))
            while not batches:
                await asyncio.sleep(0.001)
            # Queued while the only slot is busy: a long text between short messages.
            texts = ["short 1", "long text", "short 2", "long other", "short 3"]
            queued = [asyncio.ensure_future(batcher.submit([Message(id=t, text=t)])) for t in texts]
            await asyncio.sleep(0.05)
            release.set()
            return await asyncio.gather(blocker, *queued)
        finally:
            await batcher.stop()

    answers = run(scenario())
    assert [a[0].id for a in answers[1:]] == [
        "short 1",
        "long text",
        "short 2",
        "long other",
        "short 3",
    ]
    assert batches == [
        ["blocker"],
        ["short 1", "short 2", "short 3"],
        ["long text"],
        ["long other"],
    ]
