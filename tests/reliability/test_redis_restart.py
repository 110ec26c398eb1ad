"""Redis restarted mid-stream (RabbitMQ broker): workers reconnect, nothing accepted is lost.

What "accepted" means: ``TiergateClient.submit_many`` (and the gateway's ``/v1/messages`` and
``/v1/classify``) first records the messages in Redis and then publishes them to the broker; a
submit that returned has both. While Redis is down a submit fails (the gateway answers 503), so
the producer keeps the message and tries again: nothing is accepted that cannot be tracked.

What survives a Redis restart without persistence, with RabbitMQ as the broker:

- Every task is in RabbitMQ (durable queues, acknowledged late) until its step is done. A
  worker whose Redis call fails (after redis-py's own reconnect attempts, a few seconds)
  republishes the task with exponential backoff (``TIERGATE_TASK_MAX_RETRIES``, 5: 1 + 2 + 4 +
  8 + 16 s) and only then acknowledges the original; a batch that failed half-way republishes
  only its messages not yet answered; a message out of retries whose dead letter cannot be
  written is published again rather than dropped. So every accepted message is answered,
  exactly once: before the outage, or after Redis is back.
- Lost with Redis's memory: the decision records (the idempotency window: a message id
  resubmitted after the restart is answered again), the decisions stream (entries no consumer
  had read yet are gone, and so are consumer groups with their offsets: ``XREADGROUP`` then
  fails with ``NOGROUP`` until the group is created again), the decision cache (an LLM-routed
  text is asked, and paid for, again), budget counters (a policy's minute starts afresh),
  breaker state, dead letters, and the accepted set the overdue sweep reads (a message the
  broker lost at the same moment would not be republished).

With the Redis broker (``TIERGATE_BROKER_URL=redis://...``) a restart without persistence
also loses the queues themselves: every task not yet taken by a worker, and the copies of
taken ones kept for redelivery (a task a worker holds still runs, but is not redelivered if
that worker dies too). The sweep cannot republish them when the accepted set lived in the same
Redis. Run Redis with persistence for anything that matters:

```
appendonly yes               # the append-only file logs every write
appendfsync everysec         # fsync once a second: at most about 1 s of writes lost
maxmemory-policy noeviction  # never evict records, queues or the stream to make room
```

``appendfsync always`` loses nothing and costs a disk sync per write; RDB snapshots alone
(``save``) lose every write since the last snapshot. With AOF, consumer groups keep their
place across a restart; an entry acknowledged (``XACK``) in the last second before a crash
may be delivered again, so stream consumers should be idempotent by message id.

This test uses a Redis server of its own, on a free port, so the shared one is untouched.
Just before the shutdown it pauses writes (``CLIENT PAUSE ... WRITE``) until the stream
consumer has read every entry: without persistence, a decision appended in the instant before
a crash and not yet read by any consumer is gone, and the test measures the workers' side.
"""

from __future__ import annotations

import json
import time
from typing import Any

import kombu
import pytest
from fastapi.testclient import TestClient
from redis.backoff import NoBackoff
from redis.retry import Retry

from cluster import (
    SENTINEL_ID,
    Producer,
    StreamTail,
    default_test_policy,
    unlimited_policy,
    wait_until,
)
from tiergate.gateway.client import TiergateClient
from tiergate.gateway.http import create_app
from tiergate.workers.schemas import Message
from tiergate.workers.tasks import create_celery_app, run_bert_step, run_llm_step

pytestmark = pytest.mark.reliability

OUTAGE_S = 8.0
# Past this many accepted messages not yet answered the producer slows to a chunk a second, so
# that a machine slower than the 100/s offered drains what it was given within the bounds.
MAX_BACKLOG = 1000


def test_redis_restart_mid_stream_loses_no_accepted_message(
    make_cluster, private_redis, fake_llm, snippets, figures
):
    """Redis shut down (no save) and restarted mid-stream: every accepted id answered once."""
    cluster = make_cluster(
        "rabbitmq",
        policy=unlimited_policy(),
        TIERGATE_REDIS_URL=private_redis.url,
        # /v1/classify after the restart waits behind the backlog built meanwhile.
        TIERGATE_REQUEST_TIMEOUT_S="600",
    )
    fake_llm.latency_s = 0.02
    settings = cluster.settings
    client = TiergateClient.from_settings(settings)
    cluster.start_worker("bert", concurrency=2)
    cluster.start_worker("llm", concurrency=8)
    cluster.warm_up(client, snippets[-3])
    admin = private_redis.client()
    with (
        StreamTail(private_redis.url, settings.decisions_stream) as tail,
        TestClient(create_app(settings, client=TiergateClient.from_settings(settings))) as http,
    ):
        wait_until(lambda: http.get("/readyz").status_code == 200, 60, cluster, "the gateway ready")
        producer = Producer(
            client, snippets[:-3], per_s=100, prefix="r", tail=tail, max_backlog=MAX_BACKLOG
        )
        with producer:
            wait_until(
                lambda: len(tail.ids()) >= 200, 300, cluster, "200 decisions before the outage"
            )
            # Let the consumer read every entry already written, then take Redis away. The
            # pause outlasts the wait (the shutdown ends it): no decision is written after it.
            admin.execute_command("CLIENT", "PAUSE", "120000", "WRITE")
            last = admin.xrevrange(settings.decisions_stream, count=1)[0][0].decode()
            wait_until(lambda: tail.last_id == last, 60, cluster, "the consumer read it all")
            read_before = len(tail.ids())
            accepted_before = len(producer.accepted())
            refused_before = producer.refused
            private_redis.shutdown()
            down_at = time.monotonic()
            not_ready = http.get("/readyz")
            refused = http.post("/v1/messages", json={"text": snippets[-1], "id": "during-outage"})
            wait_until(
                lambda: producer.refused > refused_before,
                60,
                cluster,
                "a submit refused while Redis is down",
            )
            time.sleep(max(0.0, OUTAGE_S - (time.monotonic() - down_at)))
            private_redis.start()
            up_at = time.monotonic()
            wait_until(
                lambda: len(tail.ids()) > read_before, 300, cluster, "a decision after the restart"
            )
            first_after_s = time.monotonic() - up_at
            ready = wait_until(
                lambda: http.get("/readyz").status_code == 200, 60, cluster, "ready again"
            )
            answer = http.post("/v1/classify", json={"text": snippets[-2], "id": "after-restart"})
            wait_until(
                lambda: len(producer.accepted()) >= accepted_before + 100,
                60,
                cluster,
                "100 messages accepted after the restart",
            )
        assert producer.error is None, producer.error
        assert producer.stopped, "the producer finished"
        accepted_ids = producer.accepted()
        missing = tail.wait_for(accepted_ids, timeout_s=600)
        drained_s = time.monotonic() - up_at
        # A second decision of an accepted id would be on the stream before the sentinel's.
        cluster.send_sentinel(client)
        wait_until(lambda: SENTINEL_ID in tail.ids(), 60, cluster, "the sentinel read")
        ids = tail.ids()
    accepted = set(accepted_ids)
    figures.record(
        accepted=len(accepted),
        accepted_before_outage=accepted_before,
        submits_refused_during_outage=producer.refused,
        decisions_read_before_outage=read_before,
        outage_s=up_at - down_at,
        first_decision_after_restart_s=first_after_s,
        gateway_ready_again_after_s=ready,
        drain_after_restart_s=drained_s,
        worker_retries_logged=cluster.log_events("bert_step.retry"),
        duplicates=len(ids) - len(set(ids)),
        lost=len(missing),
    )
    assert not missing, f"{len(missing)} accepted and never answered\n{cluster.log_text()}"
    assert len(accepted) == len(accepted_ids), "each accepted once"
    assert len(accepted) > accepted_before, "messages were accepted again after the restart"
    assert producer.refused > 0, "submits were refused while Redis was down"
    assert not_ready.status_code == 503, not_ready.text
    assert "redis" in not_ready.json()["not_ready"]
    assert refused.status_code == 503, refused.text
    assert answer.status_code == 200, answer.text
    assert answer.json()["decisions"][0]["id"] == "after-restart"
    stream_ids = [i for i in ids if i in accepted]
    assert len(stream_ids) == len(set(stream_ids)), "no accepted message was answered twice"
    assert "during-outage" not in ids, "a refused message was not worked on"
    dead = client.ledger.dead_letters()
    assert not dead, dead


# The worker's steps, run in this process, with Redis going away at an exact moment: half-way
# through a batch's deliveries, or before a step that has dead letters to write.


def _republished(settings, queue: str) -> list[tuple[Any, int]]:
    """Take every task waiting in ``queue`` off RabbitMQ: (its payload, its attempt)."""
    taken = []
    with kombu.Connection(settings.broker_url) as connection:
        channel = connection.default_channel
        while (message := channel.basic_get(queue=queue, no_ack=True)) is not None:
            _, kwargs, _ = json.loads(message.body)
            payload = kwargs.get("message", kwargs.get("work"))
            taken.append((payload, int(kwargs.get("attempt", 0))))
    return taken


@pytest.fixture
def step_runtime(make_cluster, private_redis):
    """A worker runtime in this process over the private Redis and RabbitMQ (no LLM routing)."""
    cluster = make_cluster(
        "rabbitmq",
        policy=default_test_policy(min_probability=0.0),
        TIERGATE_REDIS_URL=private_redis.url,
    )
    app = create_celery_app(cluster.settings)
    runtime = app.tiergate_runtime
    _, ledger = runtime.parts()
    # Fail fast while Redis is down instead of redis-py's ten reconnect attempts per call.
    ledger.client.set_retry(Retry(NoBackoff(), 0))
    with kombu.Connection(cluster.settings.broker_url) as connection:
        for name in (cluster.settings.bert_queue, cluster.settings.llm_queue):
            kombu.Queue(name, kombu.Exchange(name), routing_key=name, channel=connection).declare()
    return app, runtime, cluster.settings


def test_a_batch_that_fails_half_way_retries_only_its_unanswered_messages(
    step_runtime, private_redis, snippets, figures
):
    """Redis lost after 5 of 16 deliveries: only the 11 unanswered messages are published again."""
    app, runtime, settings = step_runtime
    _, ledger = runtime.parts()
    batch = [Message(id=f"h-{i}", text=text) for i, text in enumerate(snippets[:16])]
    delivered: list[str] = []
    deliver = ledger.deliver

    def deliver_then_lose_redis(decision, text=None):
        answered = deliver(decision, text)
        delivered.append(decision.id)
        if len(delivered) == 5:
            private_redis.shutdown()
        return answered

    ledger.deliver = deliver_then_lose_redis
    run_bert_step(app, runtime, [(m.model_dump(mode="json"), 0) for m in batch])
    again = _republished(settings, settings.bert_queue)
    figures.record(delivered_before_outage=5, republished=len(again))
    assert delivered[:5] == [m.id for m in batch[:5]]
    assert sorted(p["id"] for p, _ in again) == sorted(m.id for m in batch[5:])
    assert {attempt for _, attempt in again} == {1}


def test_a_step_that_cannot_write_its_dead_letters_publishes_its_work_again(
    step_runtime, private_redis, snippets, figures
):
    """Redis down: poison, fresh and out-of-retries work is published again, none dropped."""
    app, runtime, settings = step_runtime
    last = settings.task_max_retries
    poison = {"text": 42}
    fresh = Message(id="fresh", text=snippets[0])
    spent = Message(id="spent", text=snippets[1])
    private_redis.shutdown()
    run_bert_step(
        app,
        runtime,
        [(poison, 0), (fresh.model_dump(mode="json"), 0), (spent.model_dump(mode="json"), last)],
    )
    run_llm_step(app, runtime, {"not": "work"}, 0)
    bert_again = _republished(settings, settings.bert_queue)
    llm_again = _republished(settings, settings.llm_queue)
    assert sorted(str(p) for p, _ in bert_again) == sorted(
        str(p) for p in (poison, fresh.model_dump(mode="json"), spent.model_dump(mode="json"))
    )
    assert llm_again == [({"not": "work"}, 1)]
    # Redis is back: the same tasks now end as they should, answered or dead-lettered.
    private_redis.start()
    run_bert_step(app, runtime, bert_again)
    run_llm_step(app, runtime, *llm_again[0])
    _, ledger = runtime.parts()
    answered = ledger.get_many(["fresh", "spent"])
    reasons = sorted(letter["reason"] for letter in ledger.dead_letters())
    figures.record(republished=len(bert_again) + len(llm_again), dead_letters=len(reasons))
    assert all(d is not None for d in answered)
    assert len(reasons) == 2
    assert reasons[0].startswith("not a message: text:")
    assert reasons[1].startswith("not an LLM work item:")
