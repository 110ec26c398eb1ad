"""Model versions across real worker processes: shadow, promotion mid-stream, rollback.

Celery BERT and LLM workers (tests/cluster.py) over the Redis broker serve the tiny test model;
a second version is the same model under another version name (tests/model_copies.py). The
workers check the pointer before every batch (``TIERGATE_MODEL_CHECK_INTERVAL_S=0``), so a
message published after ``promote`` returns is decided by the new version, with no sleep.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from cluster import SENTINEL_ID, Cluster, ClusterFactory
from model_copies import GATE_PASSING_CARD, renamed_copy
from tiergate.gateway.client import TiergateClient
from tiergate.policies.spec import Escalation, LabelSpec, LLMSpec, PolicySpec, ProviderRef
from tiergate.workers.bert.manifest import read_manifest
from tiergate.workers.bert.shadow import RedisShadowTally, ShadowFigures
from tiergate.workers.bert.versions import ModelVersions
from tiergate.workers.llm.testing import FakeLLMServer
from tiergate.workers.redis_connection import shared_redis
from tiergate.workers.schemas import Decision, Message, Tier

LABELS = ("account", "billing", "bug")
# The tiny model's scores sit near 1/3: one policy lets every BERT answer stand, the other
# sends every message to the LLM, so both steps run in each phase.
BERT_POLICY, LLM_POLICY = "tiny-bert", "tiny-llm"
WAIT_S = 300  # generous: a loaded 2-core machine starts workers slowly


def tiny_policy(name: str, min_probability: float) -> PolicySpec:
    """A policy over the tiny model's labels, asking the fake server as OpenAI."""
    return PolicySpec(
        name=name,
        version="1",
        labels=[LabelSpec(name=label, description=f"about {label}") for label in LABELS],
        escalation=Escalation(min_probability=min_probability),
        llm=LLMSpec(providers=[ProviderRef(provider="openai", model="gpt-4o-mini")]),
    )


def messages(prefix: str, count: int) -> list[Message]:
    """Distinct texts (each a cache miss), alternating between the two policies."""
    return [
        Message(
            id=f"{prefix}-{i}",
            text=f"message {prefix} {i} about refunds, passwords and crashes",
            policy=(BERT_POLICY, LLM_POLICY)[i % 2],
        )
        for i in range(count)
    ]


def stream_ids(client: TiergateClient) -> list[str]:
    """The message ids of every entry on the cluster's decisions stream, in order."""
    entries = client.ledger.client.xrange(client.ledger.stream)
    return [fields[b"id"].decode() for _, fields in entries]


def answered(client: TiergateClient, sent: list[Message], cluster: Cluster) -> list[Decision]:
    """Every decision of ``sent``, waiting as long as it takes (failing with the workers' logs)."""
    found = client.wait_many([m.id for m in sent], timeout_s=WAIT_S)
    missing = [m.id for m, d in zip(sent, found, strict=True) if d is None]
    assert not missing, cluster.log_text()
    return [d for d in found if d is not None]


@pytest.fixture
def cluster(tiny_model: Path, tmp_path: Path) -> Iterator[Cluster]:
    """A cluster over the tiny model, two policies, a version store and a fake LLM."""
    files = []
    for name, threshold in ((BERT_POLICY, 0.0), (LLM_POLICY, 0.99)):
        path = tmp_path / f"{name}.yaml"
        path.write_text(tiny_policy(name, threshold).to_yaml())
        files.append(str(path))
    with FakeLLMServer() as fake:  # answers the first allowed label: "account"
        factory = ClusterFactory(tiny_model, tmp_path, fake)
        try:
            yield factory.make(
                TIERGATE_POLICY_FILES=json.dumps(files),
                TIERGATE_MODEL_STORE=str(tmp_path / "versions"),
                TIERGATE_MODEL_CHECK_INTERVAL_S="0",
            )
        finally:
            factory.close()


def test_shadow_then_promotion_mid_stream_then_rollback_lose_and_repeat_nothing(
    cluster: Cluster, tiny_model: Path, tmp_path: Path
) -> None:
    """Shadow figures count every message; after promotion decisions carry v2, after rollback v1.

    Every id of every phase is answered exactly once, by the ledger and the decisions stream.
    """
    versions = ModelVersions.from_settings(cluster.settings)
    v1 = read_manifest(tiny_model).model_version
    v2 = versions.add(renamed_copy(tiny_model, tmp_path / "v2", "tiny-v2", GATE_PASSING_CARD))
    versions.shadow(v2)
    cluster.start_worker("bert", concurrency=2)
    cluster.start_worker("llm", concurrency=4)
    client = TiergateClient.from_settings(cluster.settings)

    # Shadow: the candidate scores each message; the LLM worker compares it with the LLM.
    shadowed = messages("shadow", 40)
    client.submit_many(shadowed)
    assert {d.model_version for d in answered(client, shadowed, cluster)} == {v1}
    tally = RedisShadowTally(
        shared_redis(cluster.settings.redis_url or ""), cluster.settings.cache_prefix
    )
    figures = tally.read(v2)
    # Same weights: it routes as the live model and agrees with every BERT answer; against
    # the LLM's "account" it agrees only where its top label is that too.
    assert figures[BERT_POLICY] == ShadowFigures(scored=20, compared=20, agreed=20)
    llm = figures[LLM_POLICY]
    assert (llm.scored, llm.compared, llm.would_llm, llm.live_llm) == (20, 20, 20, 20)

    # Promotion while a backlog flows through the workers.
    first = messages("before", 600)
    client.submit_many(first)
    assert len(client.wait_many([first[0].id], timeout_s=WAIT_S)) == 1
    versions.promote(v2)
    answered_at_promotion = len(stream_ids(client))
    assert versions.pointers.read().shadow is None, "the promoted candidate is no longer shadowed"
    second = messages("after", 200)
    client.submit_many(second)
    before = answered(client, first, cluster)
    after = answered(client, second, cluster)
    assert answered_at_promotion < len(shadowed) + len(first), "the switch came mid-stream"
    assert {d.model_version for d in before} <= {v1, v2}
    assert {d.model_version for d in after} == {v2}
    assert {d.tier for d in after} == {Tier.BERT, Tier.LLM}

    # Rollback: back to the model that served before the promotion.
    assert versions.rollback() == v1
    third = messages("rolled-back", 100)
    client.submit_many(third)
    assert {d.model_version for d in answered(client, third, cluster)} == {v1}

    # A second answer to any id would be on the stream before the sentinel's.
    cluster.send_sentinel(client)
    ids = [i for i in stream_ids(client) if i != SENTINEL_ID]
    sent = [m.id for batch in (shadowed, first, second, third) for m in batch]
    assert len(ids) == len(set(ids))
    assert sorted(ids) == sorted(sent)
