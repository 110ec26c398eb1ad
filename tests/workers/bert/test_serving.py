"""Model versions in a serving process: the hot switch between batches, and shadow scoring."""

from __future__ import annotations

from pathlib import Path

import pytest
from structlog.testing import capture_logs

from model_copies import GATE_PASSING_CARD, relabelled_copy, renamed_copy
from tiergate.policies.spec import Escalation, LabelSpec, LLMSpec, PolicySpec, ProviderRef
from tiergate.workers.bert.manifest import read_manifest
from tiergate.workers.bert.shadow import FileShadowTally, ShadowFigures, ShadowScoring
from tiergate.workers.bert.versions import AuditEntry, ModelVersions, Pointers
from tiergate.workers.cascade import Cascade, LLMWork, PolicyBook, open_cascade
from tiergate.workers.llm.breaker import LocalBreakerStore
from tiergate.workers.llm.testing import FakeLLMServer
from tiergate.workers.llm.tier import LLMTier
from tiergate.workers.schemas import Message, Tier
from tiergate.workers.settings import Settings
from tiergate.workers.testing import FixedScoreClassifier

TEXTS = [f"message number {i} about refunds and passwords" for i in range(6)]


def batch(prefix: str) -> list[Message]:
    """The same six texts under fresh ids."""
    return [Message(id=f"{prefix}-{i}", text=text) for i, text in enumerate(TEXTS)]


@pytest.fixture
def settings(tiny_model: Path, tmp_path: Path) -> Settings:
    """Embedded mode over the tiny model: pointers in a file, the SQLite cache, no throttle."""
    return Settings(data_dir=tmp_path / "data", model_dir=tiny_model, model_check_interval_s=0.0)


@pytest.fixture
def versions(settings: Settings) -> ModelVersions:
    """The version store of ``settings``."""
    return ModelVersions.from_settings(settings)


@pytest.fixture
def v2(versions: ModelVersions, tiny_model: Path, tmp_path: Path) -> str:
    """A second version (same weights, another version name) in the store, passing the gate."""
    return versions.add(renamed_copy(tiny_model, tmp_path / "v2", "tiny-v2", GATE_PASSING_CARD))


def test_a_promotion_reaches_the_embedded_cascade_at_its_next_batch(
    settings, versions, v2, tiny_model
) -> None:
    """Decisions before carry v1, after carry v2; v1's cached decisions are not served as v2's."""
    v1 = read_manifest(tiny_model).model_version
    cascade = open_cascade(settings)
    first = cascade.decide(batch("a"))
    assert {d.model_version for d in first} == {v1}
    assert all(d.cached for d in cascade.decide(batch("b"))), "the cache answers repeats"

    versions.promote(v2)
    after = cascade.decide(batch("c"))
    assert {d.model_version for d in after} == {v2}
    assert not any(d.cached for d in after), "v1's cache entries are not v2's"
    assert all(d.cached and d.model_version == v2 for d in cascade.decide(batch("d")))

    assert versions.rollback() == v1
    back = cascade.decide(batch("e"))
    assert {d.model_version for d in back} == {v1}
    assert all(d.cached for d in back), "v1's own entries serve v1 again"


def test_a_version_with_other_labels_is_refused_and_the_old_one_keeps_serving(
    settings, versions, tiny_model, tmp_path
) -> None:
    """A pointer moved to a model the policies do not fit is logged and ignored."""
    v1 = read_manifest(tiny_model).model_version
    other = versions.add(relabelled_copy(tiny_model, tmp_path / "other", ("x", "y", "z")))
    cascade = open_cascade(settings)
    # Past promote's own check, as an operator editing the pointer by hand would be.
    versions.pointers.update(
        lambda _: (Pointers(current=other), AuditEntry(time=0, action="promote", version=other))
    )
    with capture_logs() as logs:
        decisions = cascade.decide(batch("a"))
    assert {d.model_version for d in decisions} == {v1}
    refused = [e for e in logs if e["event"] == "model.switch_refused"]
    assert len(refused) == 1
    assert "has the labels" in refused[0]["reason"]


def test_a_shadow_candidate_scores_each_batch_without_changing_a_decision(
    settings, versions, v2, tiny_model
) -> None:
    """With a candidate set, each scored message is counted; decisions keep the live model."""
    v1 = read_manifest(tiny_model).model_version
    cascade = open_cascade(settings, use_cache=False)
    versions.shadow(v2)
    decisions = cascade.decide(batch("a"))
    assert {d.model_version for d in decisions} == {v1}
    tally = FileShadowTally(settings.resolved_model_store / "shadow")
    (figures,) = tally.read(v2).values()
    # Same weights: the candidate agrees with every live answer and routes as it does.
    assert figures == ShadowFigures(scored=6, compared=6, agreed=6, would_llm=0, live_llm=0)
    versions.clear_shadow()
    cascade.decide(batch("b"))
    assert list(tally.read(v2).values()) == [figures], "nothing is scored without a candidate"


LABELS = ("negative", "positive")


def films_policy() -> PolicySpec:
    """Escalate below 0.8 to the fake server as OpenAI."""
    return PolicySpec(
        name="films",
        version="1",
        labels=[LabelSpec(name=n, description=f"a {n} snippet") for n in LABELS],
        escalation=Escalation(min_probability=0.8),
        llm=LLMSpec(providers=[ProviderRef(provider="openai", model="gpt-4o-mini")]),
    )


def test_shadow_agreement_uses_the_llm_answer_where_the_llm_decided(tmp_path) -> None:
    """The candidate is compared with the LLM's label (carried in LLMWork) or the BERT answer."""
    live = FixedScoreClassifier(
        LABELS, {"unsure": (0.55, 0.45), "sure": (0.95, 0.05)}, model_version="live"
    )
    candidate = FixedScoreClassifier(LABELS, default=(0.1, 0.9), model_version="candidate")
    tally = FileShadowTally(tmp_path / "shadow")
    with FakeLLMServer(lambda _body: {"label": "positive"}) as server:
        settings = Settings(
            openai_api_key="test-key", openai_base_url=server.openai_base_url, llm_max_retries=0
        )
        cascade = Cascade(
            live,
            PolicyBook([films_policy()]),
            llm=LLMTier(settings, breaker_store=LocalBreakerStore()),
            shadow=ShadowScoring(lambda: candidate, tally),
        )
        messages = [Message(id="u", text="unsure", policy="films"), Message(id="s", text="sure")]
        first = cascade.first_pass(messages)
        work = first[0]
        assert isinstance(work, LLMWork)
        assert work.shadow is not None
        assert work.shadow.model_version == "candidate"
        decisions = cascade.decide(messages)
    assert [d.tier for d in decisions] == [Tier.LLM, Tier.BERT]
    assert [d.model_version for d in decisions] == ["live", "live"]
    # The first pass alone compared only the BERT-decided "sure" (the candidate disagrees);
    # decide() then compared both, and the candidate agrees with the LLM's "positive". It
    # would send neither message to the LLM; the live model sent "unsure" both times.
    assert tally.read("candidate") == {
        "films": ShadowFigures(scored=4, compared=3, agreed=1, would_llm=0, live_llm=2)
    }
