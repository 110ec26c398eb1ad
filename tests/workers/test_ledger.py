"""The delivery ledger: one decision per id, one stream entry, waiters woken, nothing lost."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import redis

from cluster import bert_decision
from tiergate.workers.ledger import LocalDecisionLedger, RedisDecisionLedger, held_messages
from tiergate.workers.schemas import Decision


class FakeClock:
    """Epoch seconds that move only when a test moves them."""

    def __init__(self, now: float = 1_700_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        """Move the time ``seconds`` on."""
        self.now += seconds


@pytest.fixture
def clock() -> FakeClock:
    """The clock the ledger under test reads."""
    return FakeClock()


@pytest.fixture(params=["redis", "local"])
def ledger(request, redis_prefix, clock):
    """Each ledger on the fake clock, the Redis one under a fresh prefix and stream."""
    if request.param == "local":
        return LocalDecisionLedger(clock=clock)
    client = redis.Redis(host="127.0.0.1", port=6379)
    return RedisDecisionLedger(
        client, prefix=redis_prefix, stream=f"{redis_prefix}:decisions", clock=clock
    )


def test_an_id_is_delivered_once_and_the_first_decision_stays(ledger):
    """A second delivery for the same id is refused and changes nothing."""
    assert ledger.deliver(bert_decision("a", "positive"))
    assert not ledger.deliver(bert_decision("a", "negative"))
    assert [d.label if d else None for d in ledger.get_many(["a", "b"])] == ["positive", None]


def test_concurrent_deliveries_of_one_id_put_one_entry_on_the_stream(redis_prefix):
    """Twenty racing workers delivering the same id leave exactly one stream entry."""
    client = redis.Redis(host="127.0.0.1", port=6379)
    ledger = RedisDecisionLedger(client, prefix=redis_prefix, stream=f"{redis_prefix}:decisions")
    with ThreadPoolExecutor(max_workers=20) as pool:
        outcomes = list(pool.map(lambda _: ledger.deliver(bert_decision("same")), range(20)))
    assert outcomes.count(True) == 1
    entries = client.xrange(ledger.stream)
    assert [fields[b"id"] for _, fields in entries] == [b"same"]
    assert Decision.model_validate_json(entries[0][1][b"decision"]).id == "same"


def test_wait_wakes_when_the_decision_arrives_and_times_out_otherwise(ledger):
    """A waiter is woken by the delivery, long before its timeout; with none it returns None."""
    threading.Timer(0.2, lambda: ledger.deliver(bert_decision("later"))).start()
    started = time.monotonic()
    found = ledger.wait("later", timeout_s=60)
    assert found is not None
    assert found.id == "later"
    assert time.monotonic() - started < 30  # woken by the delivery, not by the timeout
    started = time.monotonic()
    assert ledger.wait("never", timeout_s=0.3) is None
    assert time.monotonic() - started > 0.25


def test_dead_letters_keep_payload_and_reason_newest_first(ledger):
    """Dead letters are listed with their payload and reason."""
    ledger.dead_letter({"text": ""}, "empty text")
    ledger.dead_letter({"oops": 1}, "not a message")
    letters = ledger.dead_letters()
    assert [letter["reason"] for letter in letters] == ["not a message", "empty text"]
    assert letters[1]["payload"] == {"text": ""}


def test_batch_sizes_are_counted(ledger):
    """Each counted batch adds to its size; empty batches are not counted."""
    for size in (64, 64, 3, 0):
        ledger.count_batch(size)
    assert ledger.batch_sizes() == {64: 2, 3: 1}


def test_accepted_messages_are_claimed_once_when_overdue_and_dropped_when_answered(ledger, clock):
    """Overdue unanswered messages are claimed (once per interval); answered ones never are."""
    ledger.accept({"slow": '{"message": {"id": "slow"}}', "done": '{"message": {"id": "done"}}'})
    ledger.deliver(bert_decision("done"))
    clock.advance(59)
    assert ledger.claim_overdue(older_than_s=60) == []
    clock.advance(1)
    claimed = ledger.claim_overdue(older_than_s=60)
    assert claimed == [("slow", '{"message": {"id": "slow"}}')]
    clock.advance(59)
    assert ledger.claim_overdue(older_than_s=60) == []  # its clock was reset by the claim
    clock.advance(1)
    ledger.forget("slow")
    clock.advance(3600)
    assert ledger.claim_overdue(older_than_s=60) == []


def test_held_messages_finds_the_message_in_each_dead_letter_shape():
    """Task arguments, LLM work and a bare message each yield their message first."""
    message = {"id": "m-1", "text": "hello"}
    assert held_messages({"message": message, "attempt": 5})[0] == message
    assert held_messages({"work": {"message": message, "prediction": {}}})[0] == message
    assert held_messages(message) == [message]
    assert held_messages({"webhook": "http://hook", "decision": "m-0"}) == [
        {"webhook": "http://hook", "decision": "m-0"}
    ]
    assert held_messages("not json") == []


def test_deliver_many_delivers_each_new_id_once_in_order(ledger):
    """A batch is delivered in order: new ids True, ids already answered (even in it) False."""
    assert ledger.deliver_many([]) == []
    ledger.deliver(bert_decision("old", "negative"))
    batch = [
        bert_decision("a"),
        bert_decision("old"),
        bert_decision("b"),
        bert_decision("a", "negative"),
    ]
    assert ledger.deliver_many(batch) == [True, False, True, False]
    found = ledger.get_many(["a", "b", "old"])
    assert [d.label if d else None for d in found] == ["positive", "positive", "negative"]
    assert ledger.deliver_many([bert_decision("a"), bert_decision("b")]) == [False, False]


def test_deliver_many_streams_one_entry_per_delivered_decision(redis_prefix):
    """Only the decisions delivered now reach the stream, in batch order; a repeat adds none."""
    client = redis.Redis(host="127.0.0.1", port=6379)
    ledger = RedisDecisionLedger(client, prefix=redis_prefix, stream=f"{redis_prefix}:decisions")
    ledger.deliver_many([bert_decision("c"), bert_decision("a"), bert_decision("b")])
    ledger.deliver_many([bert_decision("a"), bert_decision("d"), bert_decision("c")])
    entries = client.xrange(ledger.stream)
    assert [fields[b"id"] for _, fields in entries] == [b"c", b"a", b"b", b"d"]
    assert [Decision.model_validate_json(f[b"decision"]).id for _, f in entries] == list("cabd")


def test_deliver_many_loads_the_script_again_after_redis_lost_it(private_redis):
    """After SCRIPT FLUSH a batch is still delivered, each decision once."""
    client = private_redis.client()
    ledger = RedisDecisionLedger(client, prefix="flushed", stream="flushed:decisions")
    assert ledger.deliver_many([bert_decision("a")]) == [True]
    client.script_flush()
    assert ledger.deliver_many([bert_decision("a"), bert_decision("b"), bert_decision("c")]) == [
        False,
        True,
        True,
    ]
    assert [d.id if d else None for d in ledger.get_many(["a", "b", "c"])] == ["a", "b", "c"]
    assert [fields[b"id"] for _, fields in client.xrange(ledger.stream)] == [b"a", b"b", b"c"]
    client.close()
