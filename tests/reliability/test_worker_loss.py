"""A BERT worker and an LLM worker killed with SIGKILL while 2,000 messages are in flight.

RabbitMQ hands a dead consumer's unacknowledged messages to the next one at once; the Redis
broker restores them after the visibility timeout (10 s here). Either way every message gets
exactly one decision on the stream: the delivery ledger makes a redelivered id a no-op, and the
decision cache's single-flight makes a redelivered LLM step reuse the first call's answer.

An LLM call that was in flight when its worker died has to be made again: the provider did
the work, but the answer died with the process. So the LLM check is exact about everything
else: each of the 2,000 distinct texts the LLM answered was asked once, apart from at most one
call per LLM thread that was in flight at the moment of the kill, each asked exactly twice.
"""

from __future__ import annotations

import time
from collections import Counter

import pytest

from cluster import SENTINEL_ID, SENTINEL_TEXT, StreamTail, unlimited_policy, wait_until
from tiergate.gateway.client import TiergateClient
from tiergate.workers.llm.testing import message_of
from tiergate.workers.schemas import Message, Tier

pytestmark = pytest.mark.reliability

MESSAGES = 2000
LLM_THREADS = 8
# A lease on an LLM call outlasts the call (one attempt, at most the 30 s LLM timeout), so only
# a killed worker's lease runs out and is taken over; a call asked again after the kill was in
# flight then, first asked at most this long before it. Each lease of the killed worker holds
# its message back this long, so the drain after the kill takes at least this long.
SINGLE_FLIGHT_TIMEOUT_S = 40


@pytest.mark.parametrize("broker", ["rabbitmq", "redis"])
def test_workers_killed_mid_stream_lose_nothing_and_answer_each_id_once(
    make_cluster, fake_llm, snippets, figures, broker
):
    """SIGKILL both workers with 2,000 in flight: each id decided once, no answered call repaid."""
    cluster = make_cluster(
        broker,
        policy=unlimited_policy(),
        TIERGATE_SINGLE_FLIGHT_TIMEOUT_S=str(SINGLE_FLIGHT_TIMEOUT_S),
        # The sweep is for messages a broker lost, not for a backlog that is merely slow.
        TIERGATE_REDELIVER_AFTER_S="60",
    )
    fake_llm.latency_s = 0.05
    client = TiergateClient.from_settings(cluster.settings)
    sent = [Message(id=f"k-{i}", text=text) for i, text in enumerate(snippets[:MESSAGES])]
    text_of = {m.id: m.text for m in sent}
    with StreamTail(cluster.settings.redis_url or "", cluster.settings.decisions_stream) as tail:
        bert = cluster.start_worker("bert", concurrency=2)
        llm = cluster.start_worker("llm", concurrency=LLM_THREADS)
        started = time.monotonic()
        client.submit_many(sent)
        wait_until(
            lambda: len(tail.ids()) >= 300 and fake_llm.calls >= 50,
            timeout_s=300,
            cluster=cluster,
            what="both tiers busy (300 decisions, 50 LLM calls)",
        )
        cluster.kill(bert)
        llm_killed_at = time.time()  # the fake server stamps requests with time.time()
        cluster.kill(llm)
        killed = time.monotonic()
        answered_before = len(set(tail.ids()))
        calls_before = fake_llm.calls
        cluster.start_worker("bert", concurrency=2)
        # Threads to spare: those waiting out the killed worker's leases hold up no other work.
        cluster.start_worker("llm", concurrency=2 * LLM_THREADS)
        replaced_at = time.time()  # no call of the new LLM worker arrives before this
        missing = tail.wait_for(text_of, timeout_s=600)
        drained = time.monotonic()
        assert not missing, f"{len(missing)} never answered\n{cluster.log_text()}"
        # A second decision, or a second call, would come before the sentinel's.
        cluster.send_sentinel(client)
        wait_until(lambda: SENTINEL_ID in tail.ids(), 60, cluster, "the sentinel read")
        entries = [entry for entry in tail.entries() if entry[0] != SENTINEL_ID]
    ids = [message_id for message_id, _, _ in entries]
    decisions = {message_id: decision for message_id, _, decision in entries}
    llm_texts = {text_of[i] for i, d in decisions.items() if d.tier is Tier.LLM}
    requests = [
        (" ".join(message_of(r.body).split()), r.at)
        for r in fake_llm.requests
        if message_of(r.body) != SENTINEL_TEXT
    ]
    asked = Counter(text for text, _ in requests)
    repaid = {text: n for text, n in asked.items() if n > 1}
    first_asked: dict[str, float] = {}
    for text, at in requests:
        first_asked.setdefault(text, at)
    batches = client.ledger.batch_sizes()
    figures.record(
        broker=broker,
        messages=MESSAGES,
        answered_before_kill=answered_before,
        llm_calls_before_kill=calls_before,
        drain_after_kill_s=drained - killed,
        total_s=drained - started,
        bert_messages_reprocessed=sum(size * n for size, n in batches.items()) - MESSAGES,
        sweep_republished=cluster.log_events("message.republished"),
        llm_routed=len(llm_texts),
        llm_calls=len(requests),
        llm_calls_repaid_in_flight_at_kill=sum(n - 1 for n in repaid.values()),
        duplicates=len(ids) - len(set(ids)),
        lost=len(missing),
    )
    assert answered_before < MESSAGES, "the kill happened mid-stream"
    assert len(ids) == len(set(ids)) == MESSAGES, "one decision per id"
    assert set(ids) == set(text_of)
    assert not [d for d in decisions.values() if d.llm_skipped is not None], "the LLM was up"
    assert len(llm_texts) > MESSAGES // 10, "the policy sends a good share to the LLM"
    # Every text the LLM answered was asked; nothing else was.
    assert set(asked) == llm_texts
    # Asked twice only when the first call was in flight when its worker was killed.
    assert all(n == 2 for n in repaid.values()), repaid
    assert len(repaid) <= LLM_THREADS, repaid
    # A request the killed worker had sent may be read by the server just after the kill.
    late = {t: first_asked[t] - llm_killed_at for t in repaid if first_asked[t] >= replaced_at}
    assert not late, f"first asked by the new worker, yet asked again: {late}"
    stale = {
        t: llm_killed_at - first_asked[t]
        for t in repaid
        if first_asked[t] < llm_killed_at - SINGLE_FLIGHT_TIMEOUT_S
    }
    assert not stale, f"a call answered long before the kill was paid again: {stale}"
    assert len(requests) == len(llm_texts) + len(repaid)
