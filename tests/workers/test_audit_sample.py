"""The audit sample: the embedded cascade sends a fixed share of confident texts to the LLM.

Every test runs the real cascade (``build_cascade``, the embedded SQLite cache and label store)
over the tiny DistilBERT and the fake LLM provider.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tiergate.policies.routing import Reason, in_audit_sample
from tiergate.policies.spec import (
    Escalation,
    LabelSpec,
    LearningSpec,
    LLMSpec,
    PolicySpec,
    ProviderRef,
)
from tiergate.workers.bert.classifier import BertClassifier
from tiergate.workers.cascade import Cascade, PolicyBook, build_cascade
from tiergate.workers.llm.testing import FakeLLMServer
from tiergate.workers.schemas import Message, Tier
from tiergate.workers.settings import Settings

TEXTS = [f"ticket {i} about {word}" for i in range(16) for word in ("refunds", "crashes")]


def tickets(audit_share: float) -> PolicySpec:
    """The tiny model's labels, no thresholds (every answer stands), labels collected."""
    return PolicySpec(
        name="tickets",
        version="1",
        labels=[LabelSpec(name=label) for label in ("account", "billing", "bug")],
        escalation=Escalation(min_probability=0.0, min_margin=0.0),
        llm=LLMSpec(providers=[ProviderRef(provider="openai", model="gpt-4o-mini")]),
        learning=LearningSpec(collect=True, audit_share=audit_share),
    )


@pytest.fixture
def fake() -> Iterator[FakeLLMServer]:
    """The fake LLM provider, answering the first label the policy allows."""
    with FakeLLMServer() as server:
        yield server


def cascade_for(
    data_dir: Path, model: Path, fake: FakeLLMServer, spec: PolicySpec, *, use_cache: bool = True
) -> Cascade:
    """The embedded cascade over the tiny model, the fake provider and ``data_dir``."""
    settings = Settings(
        data_dir=data_dir,
        openai_api_key="test-key",
        openai_base_url=fake.openai_base_url,
        llm_max_retries=0,
    )
    return build_cascade(settings, BertClassifier(model), PolicyBook([spec]), use_cache=use_cache)


def routes(cascade: Cascade, spec: PolicySpec) -> dict[str, tuple[Tier, Reason, bool]]:
    """Each text's tier, reason and whether it came from the cache, for one batch of TEXTS."""
    decisions = cascade.decide([Message(text=text, policy=spec.name) for text in TEXTS])
    return {text: (d.tier, d.reason, d.cached) for text, d in zip(TEXTS, decisions, strict=True)}


def test_texts_in_the_audit_sample_are_answered_by_the_llm_the_rest_by_bert(
    tmp_path: Path, tiny_model: Path, fake: FakeLLMServer
):
    """Sampled texts (by cache key) get the LLM with reason audit; the others stay confident."""
    spec = tickets(0.5)
    cascade = cascade_for(tmp_path, tiny_model, fake, spec)
    first = routes(cascade, spec)
    sampled = {
        text
        for text in TEXTS
        if in_audit_sample(cascade.cache_key(Message(text=text, policy=spec.name), spec), 0.5)
    }
    assert 0 < len(sampled) < len(TEXTS)
    for text, (tier, reason, cached) in first.items():
        expected = (Tier.LLM, Reason.AUDIT) if text in sampled else (Tier.BERT, Reason.CONFIDENT)
        assert (tier, reason) == expected, text
        assert not cached
    assert fake.calls == len(sampled)


def test_a_text_sent_again_keeps_its_route(tmp_path: Path, tiny_model: Path, fake: FakeLLMServer):
    """A repeat is served from the cache with its first route; uncached, it is routed alike."""
    spec = tickets(0.5)
    first = routes(cascade_for(tmp_path, tiny_model, fake, spec), spec)
    audited = sum(reason is Reason.AUDIT for _, reason, _ in first.values())
    again = routes(cascade_for(tmp_path, tiny_model, fake, spec), spec)
    assert {t: r[:2] for t, r in again.items()} == {t: r[:2] for t, r in first.items()}
    assert all(cached for _, _, cached in again.values())
    assert fake.calls == audited
    uncached = cascade_for(tmp_path / "other", tiny_model, fake, spec, use_cache=False)
    assert {t: r[:2] for t, r in routes(uncached, spec).items()} == {
        t: r[:2] for t, r in first.items()
    }
    assert fake.calls == 2 * audited


def test_no_text_is_audited_with_a_share_of_zero(
    tmp_path: Path, tiny_model: Path, fake: FakeLLMServer
):
    """With audit_share 0 (collection on) every confident answer stands and the LLM is idle."""
    spec = tickets(0.0)
    decided = routes(cascade_for(tmp_path, tiny_model, fake, spec), spec)
    assert set(decided.values()) == {(Tier.BERT, Reason.CONFIDENT, False)}
    assert fake.calls == 0
