"""Twice the measured throughput for 60 s: the queues grow, then drain; memory stays bounded.

The cluster's throughput is first measured with a closed run (a backlog drained by one BERT
worker with two processes and one LLM worker, the same message mix as after), then messages
are offered at twice the rate the cluster answers for 60 s: twice the closed run's rate at
first, then twice what was answered over the last two seconds, so the offer stays twice the
throughput even when the machine's load changes meanwhile. The broker absorbs the excess
(RabbitMQ queues grow), the workers keep their pace (prefetch is bounded, so nothing piles up
in worker memory), and once the offer stops the backlog drains: every message answered exactly
once, no errors, no dead letters. Worker memory is each worker's resident set, its prefork
children included.
"""

from __future__ import annotations

import time
from collections import deque

import pytest

from cluster import (
    SENTINEL_ID,
    BackgroundLoop,
    Cluster,
    StreamTail,
    process_tree_rss_kib,
    unlimited_policy,
    wait_until,
)
from tiergate.gateway.client import TiergateClient
from tiergate.workers.schemas import Message

pytestmark = pytest.mark.reliability

MEASURE = 1200
OFFER_S = 60.0
TICK_S = 0.1
# The offer follows twice the answer rate over this trailing window.
WINDOW_S = 2.0


class Sampler(BackgroundLoop):
    """Samples queue depths and worker memory every half second, in a background thread."""

    def __init__(self, cluster: Cluster, workers: dict[str, int]) -> None:
        super().__init__("sampler")
        self.client = TiergateClient.from_settings(cluster.settings)
        self.queues = (cluster.settings.bert_queue, cluster.settings.llm_queue)
        self.workers = workers
        self.samples: list[tuple[float, int, int, dict[str, int]]] = []

    def _run(self) -> None:
        while not self._stop.wait(0.5):
            depths = self.client.queue_depths()
            rss = {name: process_tree_rss_kib(pid) for name, pid in self.workers.items()}
            bert, llm = (depths.get(queue, 0) for queue in self.queues)
            self.samples.append((time.monotonic(), bert, llm, rss))

    def rss_mib(self, name: str, start: float, end: float) -> list[float]:
        """The worker's resident memory (MiB) in the samples taken between two times."""
        return [rss[name] / 1024 for at, _, _, rss in self.samples if start <= at <= end]


def test_twice_the_measured_throughput_for_60_s_queues_grow_then_drain(
    make_cluster, fake_llm, snippets, figures
):
    """2x the measured rate for 60 s: queues grow then drain to 0, RSS bounded, each id once."""
    cluster = make_cluster("rabbitmq", policy=unlimited_policy(), TIERGATE_REDELIVER_AFTER_S="900")
    fake_llm.latency_s = 0.05
    client = TiergateClient.from_settings(cluster.settings)
    bert = cluster.start_worker("bert", concurrency=2)
    llm = cluster.start_worker("llm", concurrency=16)
    numbered = (
        snippets[n] if n < len(snippets) else f"{snippets[n % len(snippets)]} (#{n})"
        for n in range(10**6)
    )
    stream = cluster.settings.decisions_stream
    with StreamTail(cluster.settings.redis_url or "", stream) as tail:
        cluster.warm_up(client, next(numbered))
        # 1. Throughput of a closed run: a backlog submitted at once, drained.
        backlog = [Message(id=f"m-{i}", text=next(numbered)) for i in range(MEASURE)]
        started = time.monotonic()
        client.submit_many(backlog)
        missing = tail.wait_for([m.id for m in backlog], timeout_s=600)
        assert not missing, cluster.log_text()
        throughput = MEASURE / (time.monotonic() - started)
        # 2. Twice the answer rate, paced in ticks, for OFFER_S seconds.
        offered: list[str] = []
        with Sampler(cluster, {"bert": bert.pid, "llm": llm.pid}) as sampler:
            wait_until(lambda: sampler.samples, 60, cluster, "a baseline sample")
            answered_before = len(tail.ids())
            offer_started = time.monotonic()
            # (time, decisions read) over the last WINDOW_S seconds, the oldest just older.
            answers = deque([(offer_started, answered_before)])
            rate, due, last = 2 * throughput, 0.0, offer_started
            while (now := time.monotonic()) < offer_started + OFFER_S:
                answered = len(tail.ids())
                answers.append((now, answered))
                while now - answers[1][0] >= WINDOW_S:
                    answers.popleft()
                then, answered_then = answers[0]
                if now - then >= WINDOW_S:
                    rate = 2 * (answered - answered_then) / (now - then)
                due += rate * (now - last)
                last = now
                batch = [
                    Message(id=f"o-{len(offered) + i}", text=next(numbered))
                    for i in range(int(due) - len(offered))
                ]
                client.submit_many(batch)
                offered += [m.id for m in batch]
                time.sleep(max(0.0, now + TICK_S - time.monotonic()))
            offer_ended = time.monotonic()
            answered_during_offer = len(tail.ids()) - answered_before
            missing = tail.wait_for(offered, timeout_s=600)
            drained = time.monotonic()
            assert not missing, f"{len(missing)} never answered\n{cluster.log_text()}"
            wait_until(
                lambda: sampler.samples[-1][1:3] == (0, 0) and sampler.samples[-1][0] > drained,
                timeout_s=60,
                cluster=cluster,
                what="both queues empty",
            )
        # A second decision of any id would be on the stream before the sentinel's.
        cluster.send_sentinel(client)
        wait_until(lambda: SENTINEL_ID in tail.ids(), 60, cluster, "the sentinel read")
    ids = tail.ids()
    decisions = [d for _, _, d in tail.entries()]
    depth = [(at, b + lm) for at, b, lm, _ in sampler.samples]
    peak_at, peak = max(depth, key=lambda sample: sample[1])
    offer_s = offer_ended - offer_started
    backlog_at_offer_end = len(offered) - answered_during_offer
    rss = {
        name: (
            sampler.rss_mib(name, 0, offer_started)[-1],
            max(sampler.rss_mib(name, offer_started, drained)),
            sampler.rss_mib(name, drained, float("inf"))[-1],
        )
        for name in ("bert", "llm")
    }
    dead = client.ledger.dead_letters()
    figures.record(
        measured_throughput_per_s=throughput,
        offered_rate_per_s=len(offered) / offer_s,
        offered=len(offered),
        achieved_rate_during_offer_per_s=answered_during_offer / offer_s,
        peak_queue_depth=peak,
        backlog_at_offer_end=backlog_at_offer_end,
        peak_queue_depth_at_s=peak_at - offer_started,
        drain_after_offer_s=drained - offer_ended,
        llm_calls=fake_llm.calls,
        llm_share=sum(1 for d in decisions if d.tier.value == "llm") / len(decisions),
        rss_bert_mib_start_peak_end=[round(v) for v in rss["bert"]],
        rss_llm_mib_start_peak_end=[round(v) for v in rss["llm"]],
        duplicates=len(ids) - len(set(ids)),
        dead_letters=len(dead),
    )
    # Judged against what the cluster answered during the offer itself, not the closed run.
    assert len(offered) >= 1.8 * answered_during_offer, "twice what was answered was offered"
    assert peak >= 0.1 * len(offered), (peak, backlog_at_offer_end)
    assert peak_at > offer_started + OFFER_S / 2, "the queues grew while the offer lasted"
    expected = [SENTINEL_ID, "warm-up", *(m.id for m in backlog), *offered]
    assert len(ids) == len(set(ids)) == len(expected), "each id answered once"
    assert set(ids) == set(expected)
    assert not [d for d in decisions if d.llm_skipped is not None], "no LLM errors"
    assert not dead, dead
    for name, (start, peak_mib, end) in rss.items():
        # The broker holds the backlog; a worker holds at most its prefetch window.
        assert peak_mib <= start * 1.5 + 100, (name, start, peak_mib, end)
        assert end <= start * 1.25 + 50, (name, start, peak_mib, end)
