"""Step scheduling: concurrent callers share one session, the least work left goes first."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from tiergate.workers.bert.classifier import BertClassifier
from tiergate.workers.bert.scheduling import StepScheduler, plan_steps


@given(
    lengths=st.lists(st.integers(1, 200), max_size=60).map(sorted),
    step_tokens=st.integers(1, 800),
    max_rows=st.integers(1, 40),
)
def test_steps_cover_every_window_once_within_the_budget(lengths, step_tokens, max_rows):
    """Every position lands in one step; a step of several windows fits both limits."""
    steps = plan_steps(lengths, step_tokens, max_rows)
    assert [p for step in steps for p in step] == list(range(len(lengths)))
    for step in steps:
        assert len(step) <= max_rows
        if len(step) > 1:
            assert len(step) * max(lengths[p] for p in step) <= step_tokens


def _queue_behind_holder(
    scheduler: StepScheduler, costs: list[int], pause_s: float = 0.0
) -> list[int]:
    """Hold the turn, queue one caller per cost (in this order, ``pause_s`` apart), release.

    Returns the costs in the order the callers were served.
    """
    served: list[int] = []
    holding = threading.Event()
    release = threading.Event()

    def holder() -> None:
        with scheduler.turn(1):
            holding.set()
            release.wait(60)

    def caller(cost: int) -> None:
        with scheduler.turn(cost):
            served.append(cost)

    first = threading.Thread(target=holder)
    first.start()
    assert holding.wait(60)
    callers = []
    for cost in costs:
        thread = threading.Thread(target=caller, args=(cost,))
        thread.start()
        callers.append(thread)
        while len(scheduler._waiting) < len(callers):
            time.sleep(0.001)
        time.sleep(pause_s)
    release.set()
    for thread in [first, *callers]:
        thread.join(60)
    return served


def test_the_caller_with_the_least_work_left_goes_next():
    """Waiting callers are served shortest first, not in arrival order."""
    # Patience far past the test's length: however slowly the callers queue, none is late.
    scheduler = StepScheduler(step_tokens=256, max_wait_s=3600)
    assert _queue_behind_holder(scheduler, [900, 30, 400, 5]) == [5, 30, 400, 900]
    assert scheduler.steps == 5


def test_a_caller_waiting_too_long_goes_first_whatever_its_size():
    """Past max_wait_s, a long caller is no longer overtaken."""
    scheduler = StepScheduler(step_tokens=256, max_wait_s=0.05)
    # The long caller queues first and has waited 0.1 s when the short one arrives.
    assert _queue_behind_holder(scheduler, [5000, 10], pause_s=0.1) == [5000, 10]
    # Within max_wait_s the short caller would have gone first.
    patient = StepScheduler(step_tokens=256, max_wait_s=3600)
    assert _queue_behind_holder(patient, [5000, 10], pause_s=0.1) == [10, 5000]


def test_a_long_call_is_late_once_in_all_not_once_per_step():
    """The starvation bound counts from a call's first step (``since``), not from each step."""
    scheduler = StepScheduler(step_tokens=256, max_wait_s=0.05)
    first_step = time.monotonic() - 0.2  # a long call that began its steps 0.2 s ago
    served: list[str] = []
    holding, release = threading.Event(), threading.Event()

    def holder() -> None:
        with scheduler.turn(1):
            holding.set()
            release.wait(60)

    def caller(name: str, cost: int, since: float | None) -> None:
        with scheduler.turn(cost, since=since):
            served.append(name)

    threads = [threading.Thread(target=holder)]
    threads[0].start()
    assert holding.wait(60)
    for name, cost, since in (("long", 5000, first_step), ("short", 10, None)):
        threads.append(threading.Thread(target=caller, args=(name, cost, since)))
        threads[-1].start()
        while len(scheduler._waiting) < len(threads) - 1:
            time.sleep(0.001)
    release.set()
    for thread in threads:
        thread.join(60)
    # The long call's next step has waited only milliseconds, but the call is 0.2 s old.
    assert served == ["long", "short"]


def test_slots_let_that_many_steps_run_at_once_and_no_more():
    """With two slots, two callers hold a turn together; a third waits for one to end."""
    scheduler = StepScheduler(step_tokens=256, slots=2)
    inside, peak = 0, 0
    counting = threading.Lock()
    both_in = threading.Barrier(2, timeout=60)

    def caller(cost: int) -> None:
        nonlocal inside, peak
        with scheduler.turn(cost):
            with counting:
                inside += 1
                peak = max(peak, inside)
            if cost < 3:
                both_in.wait()  # the first two are inside together, or this times out
            time.sleep(0.02)
            with counting:
                inside -= 1

    threads = [threading.Thread(target=caller, args=(cost,)) for cost in (1, 2, 3, 4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert peak == 2
    assert scheduler.steps == 4


def test_invalid_scheduler_settings_are_refused():
    """A step of no tokens, or no patience, is a ValueError."""
    with pytest.raises(ValueError, match="positive"):
        StepScheduler(step_tokens=0)
    with pytest.raises(ValueError, match="positive"):
        StepScheduler(step_tokens=10, max_wait_s=0)
    with pytest.raises(ValueError, match="positive"):
        StepScheduler(step_tokens=10, slots=0)


def test_scheduled_steps_give_the_same_predictions_from_threads(tiny_model):
    """Cut into small steps and run from several threads at once, predictions do not change."""
    texts = [f"message {i} " + "words and more words " * (i % 7) for i in range(24)]
    expected = BertClassifier(tiny_model, chunk_overlap=4).predict(texts)
    scheduler = StepScheduler(step_tokens=40)
    shared = BertClassifier(tiny_model, chunk_overlap=4, scheduler=scheduler)
    results: dict[int, list] = {}

    def classify(part: int) -> None:
        results[part] = shared.predict(texts[part::4])

    threads = [threading.Thread(target=classify, args=(part,)) for part in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    for part in range(4):
        for got, want in zip(results[part], expected[part::4], strict=True):
            # int8 dynamic quantization scales each ONNX batch as a whole: last digits move.
            assert np.allclose(got.probabilities, want.probabilities, atol=0.02)
            assert got.chunks == want.chunks
    windows = sum(len(shared.encode([t]).ids) for t in texts)
    assert scheduler.steps > windows // 4, "steps of at most 40 tokens hold few windows each"
