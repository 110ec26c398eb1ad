"""Label collection in distributed mode: BERT and LLM worker processes both record in Redis."""

from __future__ import annotations

import redis

from cluster import FILM_SNIPPETS, default_test_policy
from tiergate.gateway.client import TiergateClient
from tiergate.policies.spec import LearningSpec
from tiergate.workers.labels import RedisLabelStore
from tiergate.workers.schemas import Message, Tier


def test_workers_collect_and_the_client_corrects(make_cluster):
    """LLM answers become examples, any id can be corrected, and the correction clears the cache."""
    policy = default_test_policy().model_copy(
        update={"learning": LearningSpec(collect=True, retain_days=3)}
    )
    cluster = make_cluster(policy=policy)
    cluster.start_worker("bert")
    cluster.start_worker("llm")
    client = TiergateClient.from_settings(cluster.settings)
    sent = [Message(id=f"m-{i}", text=text) for i, text in enumerate(FILM_SNIPPETS)]
    client.submit_many(sent)
    decisions = client.wait_many([m.id for m in sent], timeout_s=300)
    assert all(d is not None for d in decisions), cluster.log_text()
    by_id = {d.id: d for d in decisions if d is not None}
    llm_ids = [i for i, d in by_id.items() if d.tier is Tier.LLM]
    bert_ids = [i for i, d in by_id.items() if d.tier is Tier.BERT]
    assert llm_ids, "the 0.9 threshold sends some to the LLM"
    assert bert_ids, "the policy lets confident answers stand"

    prefix = cluster.settings.cache_prefix
    connection = redis.Redis.from_url("redis://127.0.0.1:6379/0")
    store = RedisLabelStore(connection, prefix)
    examples = store.examples(policy.name)
    assert len(examples) == len(llm_ids)  # recorded by the LLM worker
    assert {e.source for e in examples} == {"llm:openai/gpt-4o-mini"}

    # A BERT-answered id (recorded by the BERT worker) is corrected through the client.
    bert_id = bert_ids[0]
    corrected = client.feedback(bert_id, label="negative", source="agent-7")
    assert (corrected.labels, corrected.source) == (["negative"], "person:agent-7")
    assert store.count(policy.name) == len(llm_ids) + 1
    text = next(m.text for m in sent if m.id == bert_id)
    client.submit(Message(id="again", text=text))
    again = client.wait("again", timeout_s=120)
    assert again is not None, cluster.log_text()
    assert again.cached is False

    keys = list(connection.scan_iter(f"{prefix}:labels:*"))
    assert keys
    assert all(0 < connection.ttl(key) <= 3 * 24 * 3600 for key in keys)
    store.close()
