"""The timings Celery steps add to decisions: ``total`` summed over steps, ``queued`` or none."""

from __future__ import annotations

import math
import time

import pytest

from tiergate.workers.tasks.timings import StepClock, worker_timings


@pytest.mark.parametrize("stamp", [None, "1700000000", True, math.nan, math.inf, [1.0]])
def test_a_missing_or_unreadable_publish_time_gives_no_queued(stamp):
    """A header that is absent or not a finite number leaves ``queued`` out."""
    timings = worker_timings({"bert": 2.0}, StepClock(), stamp)
    assert set(timings) == {"bert", "total"}


def test_a_publish_time_ahead_of_the_worker_clock_counts_as_no_wait():
    """A producer clock ahead of the worker's (skew) gives ``queued`` 0, never below."""
    assert StepClock().queued_ms(time.time() + 60) == 0.0


def test_the_llm_step_adds_its_time_and_wait_to_the_bert_step_s():
    """``total`` and ``queued`` of an LLM step include the BERT step's, carried in its work."""
    clock = StepClock(started_at=1000.0)
    earlier = {"bert": 3.0, "total": 10.0, "queued": 40.0}
    timings = worker_timings({**earlier, "llm": 5.0}, clock, 999.5, earlier=earlier)
    assert timings["total"] >= 10.0
    assert timings["queued"] == pytest.approx(540.0)
    assert (timings["bert"], timings["llm"]) == (3.0, 5.0)


def test_a_queued_unknown_for_the_bert_step_is_left_out_not_given_in_part():
    """Without the BERT step's wait (a producer that set no header), the LLM step adds none."""
    earlier = {"bert": 3.0, "total": 10.0}
    timings = worker_timings(earlier, StepClock(), time.time(), earlier=earlier)
    assert "queued" not in timings
