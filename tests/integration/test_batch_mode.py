"""Batch mode end to end: real broker, Redis and worker processes, the fake server's batch API."""

from __future__ import annotations

from cluster import FILM_SNIPPETS, unlimited_policy, wait_until
from tiergate.gateway.client import TiergateClient
from tiergate.policies.spec import CallMode, PolicySpec
from tiergate.workers.batches import BatchState, BatchStore
from tiergate.workers.llm.testing_batches import BatchPlan
from tiergate.workers.schemas import LLMMode, Message, Status, Tier

# Generous bounds: they include the workers' cold start on a loaded machine.
WAIT_S = 300


def batch_policy() -> PolicySpec:
    """The test policy (no budget) in batch mode: a batch once the oldest waited a second."""
    spec = unlimited_policy()
    llm = spec.llm.model_copy(update={"mode": CallMode.BATCH, "max_wait_s": 1.0})
    return spec.model_copy(update={"llm": llm})


def stream_ids(client: TiergateClient) -> list[str]:
    """The message ids of every entry on the cluster's decisions stream, in order."""
    entries = client.ledger.client.xrange(client.ledger.stream)
    return [fields[b"id"].decode() for _, fields in entries]


def test_llm_worker_killed_between_sending_a_batch_and_reading_it_loses_and_repeats_nothing(
    make_cluster, fake_llm
):
    """SIGKILL after the batch was sent: a new worker reads it; each id answered once, one batch."""
    fake_llm.batches.plan(*[BatchPlan(hold=True)] * 50)
    cluster = make_cluster(policy=batch_policy(), TIERGATE_LLM_BATCH_POLL_S="0.3")
    cluster.start_worker("bert")
    llm_worker = cluster.start_worker("llm")
    client = TiergateClient.from_settings(cluster.settings)
    sent = [Message(id=f"b-{i}", text=FILM_SNIPPETS[i % len(FILM_SNIPPETS)]) for i in range(40)]
    client.submit_many(sent)
    first = client.wait_many([m.id for m in sent], timeout_s=WAIT_S)
    assert all(d is not None for d in first), cluster.log_text()
    pending = {d.id for d in first if d is not None and d.status is Status.PENDING_LLM}
    assert pending, "the 0.9 threshold sends some to the LLM"
    assert all(d.tier is Tier.BERT for d in first if d is not None)
    store = BatchStore.from_settings(cluster.settings)

    def all_sent() -> bool:
        batches = store.outstanding()
        in_batches = sum(len(mids) for b in batches for mids in b.requests.values())
        return in_batches == len(pending) and all(b.state is BatchState.SUBMITTED for b in batches)

    wait_until(all_sent, WAIT_S, cluster, "every batch sent and recorded")
    submitted = len(fake_llm.batches.submitted)
    cluster.kill(llm_worker)
    fake_llm.batches.release()
    cluster.start_worker("llm")

    def all_final() -> bool:
        found = client.ledger.get_many(sorted(pending))
        return all(d is not None and d.status is Status.ANSWERED for d in found)

    wait_until(all_final, WAIT_S, cluster, "every pending message answered")
    assert len(fake_llm.batches.submitted) == submitted, "no batch was sent twice"
    assert fake_llm.calls == 0, "nothing was asked online"
    final = client.ledger.get_many(sorted(pending))
    assert all(d is not None and d.tier is Tier.LLM for d in final)
    assert all(d is not None and d.llm and d.llm.mode is LLMMode.BATCH for d in final)
    wait_until(lambda: store.outstanding() == [], WAIT_S, cluster, "the batches forgotten")
    ids = stream_ids(client)
    assert sorted(ids) == sorted(m.id for m in sent), "each id on the stream exactly once"
    # Eight distinct texts: each batch asks once per distinct text it holds.
    routed_texts = {m.text for m in sent if m.id in pending}
    asked = sum(len(b.requests) for b in fake_llm.batches.submitted)
    assert len(routed_texts) <= asked <= len(routed_texts) * submitted
