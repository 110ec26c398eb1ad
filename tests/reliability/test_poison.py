"""Poison messages beside good ones: each goes to the dead-letter list with its reason.

``tests/integration`` covers a message whose text is empty and one naming an unknown policy.
Here: bodies that are not JSON at all, task arguments of the wrong JSON shape, an LLM work
item that is not one, and a task name nobody serves, published straight to the queues the way
a buggy producer in another language would; and a message whose LLM answer keeps failing
validation, which is not a dead letter but a flagged BERT answer after exactly one repair
attempt. The good messages published around them are all answered, once.
"""

from __future__ import annotations

import json
import uuid

import kombu
import pytest

from cluster import SENTINEL_ID, positive_answer, unlimited_policy, wait_until
from tiergate.gateway.client import TiergateClient
from tiergate.workers.ledger import RedisDecisionLedger
from tiergate.workers.llm.testing import message_of
from tiergate.workers.schemas import LLMSkip, Message, Tier

pytestmark = pytest.mark.reliability


def publish_raw(
    broker_url: str, queue: str, task: str, body: str | bytes, content_type: str
) -> str:
    """Publish one Celery protocol-2 message with this body; returns its task id."""
    task_id = uuid.uuid4().hex
    headers = {"lang": "py", "task": task, "id": task_id, "root_id": task_id, "retries": 0}
    with kombu.Connection(broker_url) as connection:
        producer = connection.Producer()
        producer.publish(
            body,
            exchange=queue,
            routing_key=queue,
            headers=headers,
            content_type=content_type,
            content_encoding="utf-8",
            declare=[kombu.Queue(queue, kombu.Exchange(queue), routing_key=queue)],
        )
    return task_id


def task_body(**kwargs: object) -> str:
    """A protocol-2 body: positional arguments, keyword arguments, embed."""
    return json.dumps([[], kwargs, {"callbacks": None, "errbacks": None, "chain": None}])


def test_poison_messages_go_to_the_dead_letters_and_good_ones_are_answered(
    make_cluster, fake_llm, snippets, figures
):
    """Undecodable, misshapen, unknown and unanswerable messages: kept with reasons; none lost."""
    cluster = make_cluster("rabbitmq", policy=unlimited_policy())
    settings = cluster.settings
    broker = settings.broker_url or ""
    bad_answer_text = snippets[0]

    def answer(body):
        if " ".join(message_of(body).split()) == bad_answer_text:
            return {"label": "masterpiece"}  # not one of the policy's labels, every time
        return positive_answer(body)

    fake_llm.answerer = answer
    client = TiergateClient.from_settings(settings)
    cluster.start_worker("bert", concurrency=2)
    cluster.start_worker("llm", concurrency=4)
    good = [Message(id=f"g-{i}", text=text) for i, text in enumerate(snippets[1:41])]
    bad_answer = Message(id="bad-answer", text=bad_answer_text, task="explain")
    client.submit_many(good[:20])
    poison = {
        "body that is not JSON": (settings.bert_queue, "tiergate.classify", "{'message': ", None),
        "message that is a string": (
            settings.bert_queue,
            "tiergate.classify",
            task_body(message="classify this please"),
            None,
        ),
        "message that is a list": (
            settings.bert_queue,
            "tiergate.classify",
            task_body(message=["a", "list"]),
            None,
        ),
        "no message at all": (settings.bert_queue, "tiergate.classify", task_body(), None),
        "LLM work that is not one": (
            settings.llm_queue,
            "tiergate.answer_with_llm",
            task_body(work={"message": {"text": "half a work item"}}),
            None,
        ),
        "a task nobody serves": (
            settings.bert_queue,
            "tiergate.classify_v2",
            task_body(message={"text": "from a newer producer"}),
            None,
        ),
        "pickled body": (
            settings.bert_queue,
            "tiergate.classify",
            b"\x80\x04\x95not really a pickle",
            "application/x-python-serialize",
        ),
    }
    for queue, task, body, content_type in poison.values():
        publish_raw(broker, queue, task, body, content_type or "application/json")
    client.submit_many([*good[20:], bad_answer])
    ledger = RedisDecisionLedger.from_settings(settings)
    wanted = [m.id for m in [*good, bad_answer]]
    decisions = client.wait_many(wanted, timeout_s=300)
    assert all(decisions), cluster.log_text()
    took = wait_until(
        lambda: len(ledger.dead_letters()) >= len(poison),
        timeout_s=300,
        cluster=cluster,
        what=f"{len(poison)} dead letters",
    )
    # A late extra dead letter or decision would come before the sentinel's answer.
    cluster.send_sentinel(client)
    letters = ledger.dead_letters()
    reasons = sorted(letter["reason"] for letter in letters)
    by_id = dict(zip(wanted, decisions, strict=True))
    flagged = by_id["bad-answer"]
    asked = [
        r for r in fake_llm.requests if " ".join(message_of(r.body).split()) == bad_answer_text
    ]
    stream = [fields[b"id"].decode() for _, fields in ledger.client.xrange(ledger.stream)]
    figures.record(
        poison_published=len(poison),
        dead_letters=len(letters),
        dead_letter_reasons=reasons,
        dead_letters_after_s=took,
        good_answered=sum(1 for m in good if by_id[m.id] is not None),
        invalid_answer_llm_calls=len(asked),
    )
    assert len(letters) == len(poison), reasons
    assert sorted(stream) == sorted([*wanted, SENTINEL_ID]), "each good one answered once, no other"
    assert flagged is not None
    assert flagged.tier is Tier.BERT
    assert flagged.llm_skipped is LLMSkip.INVALID_ANSWER
    assert "invalid answer after one repair attempt" in (flagged.llm_error or "")
    assert len(asked) == 2, "one call and one repair, then the BERT answer; never retried"
    expected = [
        "not a message: payload: Input should be a valid dictionary",
        "not a message: payload: Input should be a valid dictionary",
        "wrong arguments: expected keyword argument 'message'",
        "not an LLM work item:",
        "undecodable",
        "invalid task message: Refusing to deserialize untrusted content",
        "unknown task 'tiergate.classify_v2'",
    ]
    for fragment in expected:
        assert any(fragment in reason for reason in reasons), (fragment, reasons)
