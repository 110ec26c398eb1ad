"""The delivery ledger: one decision per id, one stream entry, waiters woken, nothing lost."""

from __future__ import annotations

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import redis
from structlog.testing import capture_logs

from cluster import bert_decision
from tiergate.workers.ledger import (
    DeadLetterKind,
    Delivery,
    IdReused,
    LocalDecisionLedger,
    RedisDecisionLedger,
    held_message_id,
    held_messages,
)
from tiergate.workers.schemas import Decision, Message


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
    assert outcomes.count(Delivery.DELIVERED) == 1
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
    """Dead letters are listed with their payload, reason and kind."""
    ledger.dead_letter({"text": ""}, "empty text", kind=DeadLetterKind.NOT_A_MESSAGE)
    ledger.dead_letter({"oops": 1}, "not a message", kind=DeadLetterKind.NOT_A_MESSAGE)
    letters = ledger.dead_letters()
    assert [letter["reason"] for letter in letters] == ["not a message", "empty text"]
    assert letters[1]["payload"] == {"text": ""}
    assert letters[1]["kind"] == "not_a_message"


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
    assert [bool(d) for d in ledger.deliver_many(batch)] == [True, False, True, False]
    found = ledger.get_many(["a", "b", "old"])
    assert [d.label if d else None for d in found] == ["positive", "positive", "negative"]
    assert not any(ledger.deliver_many([bert_decision("a"), bert_decision("b")]))


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
    assert ledger.deliver_many([bert_decision("a")]) == [Delivery.DELIVERED]
    client.script_flush()
    assert ledger.deliver_many([bert_decision("a"), bert_decision("b"), bert_decision("c")]) == [
        Delivery.ANSWERED_BEFORE,
        Delivery.DELIVERED,
        Delivery.DELIVERED,
    ]
    assert [d.id if d else None for d in ledger.get_many(["a", "b", "c"])] == ["a", "b", "c"]
    assert [fields[b"id"] for _, fields in client.xrange(ledger.stream)] == [b"a", b"b", b"c"]
    client.close()


def test_an_id_reused_for_another_text_is_refused_and_told_apart(ledger):
    """Same id and text: answered before; another text: refused as reused, nothing changes."""
    first = Message(id="http-1", text="A dull, joyless slog.")
    other = Message(id="http-1", text="A delight from start to finish.")
    assert ledger.deliver(bert_decision("http-1", "negative"), text=first.text) is (
        Delivery.DELIVERED
    )
    assert ledger.deliver(bert_decision("http-1"), text=other.text) is Delivery.ID_REUSED
    assert ledger.deliver(bert_decision("http-1"), text=first.text) is Delivery.ANSWERED_BEFORE
    fresh = Message(id="http-2", text=other.text)
    found = ledger.answers_for([first, other, fresh])
    assert isinstance(found[0], Decision)
    assert found[0].label == "negative"
    assert found[1:] == [IdReused("http-1"), None]
    assert ledger.wait_for(other, timeout_s=0.1) == IdReused("http-1")
    assert ledger.get_many(["http-1"])[0].label == "negative"


def test_a_record_without_a_text_hash_answers_any_text_as_before(ledger):
    """A decision recorded with no text (before text hashes were kept) stays idempotent."""
    assert ledger.deliver(bert_decision("old"))
    assert ledger.deliver(bert_decision("old"), text="anything") is Delivery.ANSWERED_BEFORE
    found = ledger.answers_for([Message(id="old", text="anything at all")])
    assert isinstance(found[0], Decision)


def test_two_texts_racing_for_one_id_deliver_only_the_first(redis_prefix):
    """Racing deliveries of one id with two texts: one delivered, the other text refused."""
    client = redis.Redis(host="127.0.0.1", port=6379)
    ledger = RedisDecisionLedger(client, prefix=redis_prefix, stream=f"{redis_prefix}:decisions")
    texts = ["first text", "second text"] * 10
    with ThreadPoolExecutor(max_workers=20) as pool:
        outcomes = list(
            pool.map(lambda text: ledger.deliver(bert_decision("race"), text=text), texts)
        )
    assert outcomes.count(Delivery.DELIVERED) == 1
    winner = texts[outcomes.index(Delivery.DELIVERED)]
    for text, outcome in zip(texts, outcomes, strict=True):
        if outcome is not Delivery.DELIVERED:
            same = text == winner
            assert outcome is (Delivery.ANSWERED_BEFORE if same else Delivery.ID_REUSED)
    assert len(client.xrange(ledger.stream)) == 1


def test_a_record_and_its_text_hash_expire_together(redis_prefix):
    """The text hash is kept as long as the record it belongs to."""
    client = redis.Redis(host="127.0.0.1", port=6379)
    ledger = RedisDecisionLedger(
        client, prefix=redis_prefix, stream=f"{redis_prefix}:decisions", record_ttl_s=1000
    )
    ledger.deliver(bert_decision("ttl"), text="some text")
    text_key = ledger.text_key("ttl")
    assert client.get(text_key) is not None
    assert 990 <= client.ttl(text_key) <= 1000
    assert 990 <= client.ttl(ledger.record_key("ttl")) <= 1000


def test_each_dead_letter_is_counted_by_kind_and_logged_with_its_id(ledger):
    """A warning per dead letter names the message id, kind and reason; counts are by kind."""
    with capture_logs() as logs:
        ledger.dead_letter(
            {"message": {"id": "m-7", "text": "  "}, "attempt": 0},
            "not a message: text: empty",
            kind=DeadLetterKind.NOT_A_MESSAGE,
        )
        ledger.dead_letter({"id": "m-8", "text": "x"}, "unknown policy", kind="unknown_policy")
        ledger.dead_letter({"oops": 1}, "not a message", kind=DeadLetterKind.NOT_A_MESSAGE)
    kept = [entry for entry in logs if entry["event"] == "dead_letter.kept"]
    assert [(e["log_level"], e["message_id"], e["kind"]) for e in kept] == [
        ("warning", "m-7", "not_a_message"),
        ("warning", "m-8", "unknown_policy"),
        ("warning", None, "not_a_message"),
    ]
    assert kept[0]["reason"] == "not a message: text: empty"
    assert ledger.dead_letter_counts() == {"not_a_message": 2, "unknown_policy": 1}


def test_an_unknown_dead_letter_kind_is_refused(ledger):
    """Kinds are a fixed set (metric labels stay bounded): a free-text kind is an error."""
    with pytest.raises(ValueError, match="no_such_kind"):
        ledger.dead_letter({}, "why", kind="no_such_kind")
    assert ledger.dead_letters() == []


def test_the_dead_letter_list_keeps_only_the_newest(redis_prefix, clock):
    """Past its maximum length the oldest dead letters go; the counts still count them all."""
    for ledger in (
        LocalDecisionLedger(clock=clock, dead_letters_maxlen=3),
        RedisDecisionLedger(
            redis.Redis(host="127.0.0.1", port=6379),
            prefix=redis_prefix,
            stream=f"{redis_prefix}:decisions",
            dead_letters_maxlen=3,
            clock=clock,
        ),
    ):
        for number in range(5):
            ledger.dead_letter({"id": f"d-{number}"}, "gave up", kind=DeadLetterKind.GAVE_UP)
        assert [held_message_id(e["payload"]) for e in ledger.dead_letters()] == [
            "d-4",
            "d-3",
            "d-2",
        ]
        assert ledger.dead_letter_counts() == {"gave_up": 5}


def test_held_message_id_finds_the_id_in_every_dead_letter_shape():
    """An id is found in a message that failed validation, in task arguments and in raw bodies."""
    body = json.dumps([[], {"msg": {"id": "raw-1", "text": "hi"}}, {}])
    assert held_message_id({"message": {"id": "m-1", "text": "  "}, "attempt": 0}) == "m-1"
    assert held_message_id({"work": {"message": {"id": "m-2"}}}) == "m-2"
    assert held_message_id({"id": "m-3", "text": ""}) == "m-3"
    assert held_message_id({"args": [{"id": "m-4", "text": "hi"}], "kwargs": {}}) == "m-4"
    assert held_message_id({"args": [], "kwargs": {"msg": {"id": "m-5", "text": "hi"}}}) == "m-5"
    assert held_message_id({"task": "tiergate.classify", "body": body}) == "raw-1"
    assert held_message_id({"task": "x", "body": "not json"}) is None
    assert held_message_id({"message": {"id": 7}}) is None
    assert held_message_id(None) is None
