"""The label store: opt-in collection of redacted examples, people's corrections, retention.

Every test runs the real cascade (``build_cascade``) against the fake LLM provider, over both
backends: real Redis and the SQLite file.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from structlog.testing import capture_logs

from tiergate.policies.calibrate import accuracy_interval
from tiergate.policies.routing import in_audit_sample
from tiergate.policies.spec import (
    Escalation,
    LabelSpec,
    LearningSpec,
    LLMSpec,
    PolicySpec,
    ProviderRef,
)
from tiergate.workers.cascade import Cascade, PolicyBook, build_cascade
from tiergate.workers.errors import LabelNotInPolicyError, UnknownDecisionError
from tiergate.workers.labels import (
    Corrections,
    RedisLabelStore,
    SqliteLabelStore,
    label_store_path,
    open_label_store,
)
from tiergate.workers.llm.testing import FakeLLMServer, first_label_answer, message_of
from tiergate.workers.schemas import Message, Tier
from tiergate.workers.settings import Settings
from tiergate.workers.testing import FixedScoreClassifier

LABELS = ("negative", "positive", "synopsis")
EMAIL = "jane.doe@example.com"
REDIS_URL = "redis://127.0.0.1:6379/0"


def scores_of(text: str) -> tuple[float, ...]:
    """'unsure' texts escalate (below 0.8), others are confidently negative."""
    return (0.4, 0.35, 0.25) if "unsure" in text else (0.9, 0.05, 0.05)


def answer_by_text(body: dict[str, Any]) -> dict[str, Any]:
    """The fake LLM answers 'synopsis' for texts about a plot, else 'positive'."""
    label = "synopsis" if "plot" in message_of(body) else "positive"
    return {**first_label_answer(body), "label": label}


def films(*, collect: bool = True, retain_days: int = 30, audit_share: float = 0.0) -> PolicySpec:
    """A policy escalating below 0.8 to the fake OpenAI provider, collecting labels if asked."""
    return PolicySpec(
        name="films",
        version="7",
        labels=[LabelSpec(name=name) for name in LABELS],
        escalation=Escalation(min_probability=0.8),
        llm=LLMSpec(providers=[ProviderRef(provider="openai", model="gpt-4o-mini")]),
        learning=LearningSpec(collect=collect, retain_days=retain_days, audit_share=audit_share),
    )


@pytest.fixture
def fake() -> Iterator[FakeLLMServer]:
    """The fake LLM provider answering by text (see :func:`answer_by_text`)."""
    with FakeLLMServer(answer_by_text) as server:
        yield server


@pytest.fixture(params=["sqlite", "redis"])
def make_settings(
    request: pytest.FixtureRequest, tmp_path: Path, fake: FakeLLMServer, redis_prefix: str
) -> Callable[[], Settings]:
    """Settings over the fake provider, with Redis (a fresh prefix) or the embedded SQLite file."""

    def make() -> Settings:
        shared = {"redis_url": REDIS_URL, "cache_prefix": redis_prefix}
        return Settings(
            data_dir=tmp_path,
            openai_api_key="test-key",
            openai_base_url=fake.openai_base_url,
            llm_max_retries=0,
            **(shared if request.param == "redis" else {}),
        )

    return make


def cascade_for(settings: Settings, spec: PolicySpec) -> Cascade:
    """The cascade ``build_cascade`` makes for ``spec`` over a fixed-score classifier."""
    classifier = FixedScoreClassifier(LABELS, scores_of, model_version="fixed-7")
    return build_cascade(settings, classifier, PolicyBook([spec]))


def stored_bytes(settings: Settings) -> bytes:
    """Everything the label store holds, raw: every Redis value under the prefix, or the file."""
    if settings.redis_url is None:
        path = label_store_path(settings)
        return b"".join(p.read_bytes() for p in path.parent.glob(f"{path.name}*"))
    client = redis.Redis.from_url(REDIS_URL)
    held = b""
    for key in client.scan_iter(f"{settings.cache_prefix}:labels:*"):
        kind = client.type(key)
        if kind == b"hash":
            held += b"".join(client.hgetall(key).values())
        elif kind == b"string":
            held += client.get(key) or b""
        elif kind == b"zset":
            held += b"".join(client.zrange(key, 0, -1))
    client.close()
    return held


def test_nothing_is_kept_for_a_policy_that_did_not_opt_in(make_settings):
    """Without learning.collect no store is opened and no decision can be corrected."""
    settings = make_settings()
    cascade = cascade_for(settings, films(collect=False))
    decisions = cascade.decide([Message(id="m1", text="unsure film"), Message(text="fine")])
    assert [d.tier for d in decisions] == [Tier.LLM, Tier.BERT]
    assert cascade.labels is None
    store = open_label_store(settings)
    assert store.count() == 0
    assert store.stats().unlabelled == 0
    with pytest.raises(UnknownDecisionError, match="'m1'"):
        store.correct("m1", ["negative"])


def test_an_llm_answer_is_kept_redacted_with_its_source_and_scores(make_settings):
    """The example holds the redacted text, the LLM's label and source, scores and versions."""
    settings = make_settings()
    cascade = cascade_for(settings, films())
    text = f"unsure about this film, write to {EMAIL}"
    [decision] = cascade.decide([Message(id="m1", text=text)])
    assert decision.tier is Tier.LLM
    [example] = cascade.labels.examples()
    assert example.text == "unsure about this film, write to [EMAIL_1]"
    assert example.labels == ["positive"]
    assert example.source == "llm:openai/gpt-4o-mini"
    assert example.kind == "llm"
    assert example.key == cascade.cache_key(Message(text=text), films())
    assert (example.policy, example.policy_version, example.model_version) == (
        "films",
        "7",
        "fixed-7",
    )
    assert example.scores == {"negative": 0.4, "positive": 0.35, "synopsis": 0.25}
    assert EMAIL.encode() not in stored_bytes(settings)


def test_a_bert_answer_is_kept_unlabelled_and_can_be_corrected(make_settings):
    """A BERT-answered text is not an example until a person labels it, redacted even so."""
    settings = make_settings()
    cascade = cascade_for(settings, films())
    [decision] = cascade.decide([Message(id="m1", text=f"a dull film says {EMAIL}")])
    assert decision.tier is Tier.BERT
    assert cascade.labels.examples() == []
    assert cascade.labels.stats().unlabelled == 1
    example = cascade.labels.correct("m1", ["positive"], source="agent-7")
    assert (example.labels, example.source, example.kind) == (
        ["positive"],
        "person:agent-7",
        "person",
    )
    assert example.text == "a dull film says [EMAIL_1]"
    assert cascade.labels.count() == 1
    assert EMAIL.encode() not in stored_bytes(settings)


def test_one_example_per_cache_key_and_every_id_can_be_corrected(make_settings):
    """Repeats of a text (in a batch, from the cache) share one example; each id is known."""
    settings = make_settings()
    cascade = cascade_for(settings, films())
    cascade.decide([Message(id="a", text="unsure plot"), Message(id="b", text="unsure plot")])
    [hit] = cascade.decide([Message(id="c", text="unsure plot")])
    assert hit.cached
    assert [e.labels for e in cascade.labels.examples()] == [["synopsis"]]
    key = cascade.cache_key(Message(text="unsure plot"), films())
    for message_id in ("a", "b", "c"):
        assert cascade.labels.observation(message_id).key == key


def test_a_person_outranks_the_llm_and_the_correction_clears_the_cache(make_settings, fake):
    """After a correction the text is decided afresh, and the LLM's new label does not win."""
    settings = make_settings()
    cascade = cascade_for(settings, films())
    cascade.decide([Message(id="m1", text="unsure film")])
    corrections = Corrections(cascade.labels, cascade.cache)
    corrected = corrections.correct("m1", ["negative"], source="moderator")
    assert corrected.labels == ["negative"]
    calls = fake.calls
    [again] = cascade.decide([Message(id="m2", text="unsure film")])
    assert not again.cached
    assert again.tier is Tier.LLM
    assert fake.calls == calls + 1
    [example] = cascade.labels.examples()
    assert (example.labels, example.source) == (["negative"], "person:moderator")
    stats = cascade.labels.stats("films")
    assert stats.by_kind == {"person": 1}
    assert stats.llm_vs_person.compared == 1
    assert stats.llm_vs_person.agreed == 0


def test_corrections_are_checked_against_the_decision_policy(make_settings):
    """Unknown ids, labels outside the set, and two labels for a single-label policy fail."""
    settings = make_settings()
    cascade = cascade_for(settings, films())
    cascade.decide([Message(id="m1", text="unsure film")])
    with pytest.raises(UnknownDecisionError, match="'nobody'"):
        cascade.labels.correct("nobody", ["negative"])
    with pytest.raises(LabelNotInPolicyError, match="'comedy'"):
        cascade.labels.correct("m1", ["comedy"])
    with pytest.raises(LabelNotInPolicyError, match="exactly one label"):
        cascade.labels.correct("m1", ["negative", "positive"])
    [example] = cascade.labels.examples()
    assert example.kind == "llm"


def test_stats_count_labels_sources_and_agreement(make_settings):
    """Counts by label and source; BERT's top label compared with the LLM's and people's."""
    settings = make_settings()
    cascade = cascade_for(settings, films())
    cascade.decide(
        [
            Message(id="u1", text="unsure film"),  # LLM: positive, BERT: negative
            Message(id="u2", text="unsure plot"),  # LLM: synopsis, BERT: negative
            Message(id="b1", text="bad film"),  # BERT: negative, unlabelled
        ]
    )
    cascade.labels.correct("b1", ["negative"], source="agent")
    stats = cascade.labels.stats()
    assert stats.examples == 3
    assert stats.unlabelled == 0
    assert stats.by_label == {"positive": 1, "synopsis": 1, "negative": 1}
    assert stats.by_kind == {"llm": 2, "person": 1}
    assert stats.by_source == {"llm:openai/gpt-4o-mini": 2, "person:agent": 1}
    assert (stats.bert_vs_llm.compared, stats.bert_vs_llm.agreed) == (2, 0)
    assert (stats.bert_vs_person.compared, stats.bert_vs_person.rate) == (1, 1.0)
    assert cascade.labels.stats("other").examples == 0


def test_llm_labels_of_keys_in_the_audit_sample_are_marked_audit(make_settings):
    """Texts in the sample are labelled however confident; only they come back marked audit."""
    settings = make_settings()
    spec = films(audit_share=0.5)
    cascade = cascade_for(settings, spec)
    texts = [f"{kind} film {i}" for kind in ("unsure", "bad") for i in range(8)]
    cascade.decide([Message(id=text, text=text) for text in texts])
    sampled = {
        text: in_audit_sample(cascade.cache_key(Message(text=text), spec), 0.5) for text in texts
    }
    labelled = {text for text in texts if "unsure" in text or sampled[text]}
    by_key = {example.key: example for example in cascade.labels.examples()}
    assert set(by_key) == {cascade.cache_key(Message(text=text), spec) for text in labelled}
    for text in labelled:
        example = by_key[cascade.cache_key(Message(text=text), spec)]
        assert (example.kind, example.audit) == ("llm", sampled[text]), text
    assert {example.audit for example in by_key.values()} == {True, False}
    stats = cascade.labels.stats()
    assert stats.unlabelled == len(texts) - len(labelled)
    assert stats.audit.examples == sum(sampled.values())
    unsampled = next(text for text in texts if text not in labelled)
    assert cascade.labels.correct(unsampled, ["positive"]).audit is False
    in_sample = next(text for text in texts if sampled[text])
    assert cascade.labels.correct(in_sample, ["positive"]).audit is True


def test_the_audit_mark_is_set_by_a_fresh_llm_label_and_never_cleared(make_settings):
    """A cached decision marks nothing; an LLM label given in the sample marks it for good."""
    settings = make_settings()
    outside = cascade_for(settings, films(audit_share=0.0))
    sampling = cascade_for(settings, films(audit_share=1.0))  # same keys, same cache
    outside.decide([Message(id="u1", text="unsure film")])
    [hit] = sampling.decide([Message(id="u2", text="unsure film")])
    assert hit.cached
    assert [e.audit for e in sampling.labels.examples()] == [False]
    Corrections(sampling.labels, sampling.cache).correct("u2", ["negative"])
    [fresh] = sampling.decide([Message(id="u3", text="unsure film")])
    assert (fresh.tier, fresh.cached) == (Tier.LLM, False)
    assert [e.audit for e in sampling.labels.examples()] == [True]
    Corrections(outside.labels, outside.cache).correct("u3", ["positive"])
    [again] = outside.decide([Message(id="u4", text="unsure film")])
    assert (again.tier, again.cached) == (Tier.LLM, False)
    [example] = outside.labels.examples()
    assert (example.audit, example.source) == (True, "person:anonymous")


def test_stats_measure_the_bert_tier_on_the_audit_sample(make_settings):
    """Over audit examples: BERT's answer against the reference label, with its interval."""
    settings = make_settings()
    unaudited = cascade_for(settings, films())
    unaudited.decide([Message(text="unsure plot")])
    empty = unaudited.labels.stats().model_dump()["audit"]
    assert empty == {"examples": 0, "agreed": 0, "accuracy": None, "interval": None}
    cascade = cascade_for(settings, films(audit_share=1.0))
    decisions = cascade.decide(
        [
            Message(id="b1", text="bad film"),  # BERT: negative, LLM: positive
            Message(id="b2", text="bad plot"),  # BERT: negative, LLM: synopsis
            Message(id="b3", text="bad acting"),  # BERT: negative, LLM: positive; person below
        ]
    )
    assert {d.tier for d in decisions} == {Tier.LLM}  # confident, but audited
    cascade.labels.correct("b3", ["negative"])
    stats = cascade.labels.stats("films")
    assert stats.examples == 4  # the unaudited one is not in the sample
    audit = stats.audit
    assert (audit.examples, audit.agreed, audit.accuracy) == (3, 1, 1 / 3)
    assert audit.interval == pytest.approx(accuracy_interval(1, 3, 0.95))
    assert audit.interval == pytest.approx((0.0084, 0.9057), abs=1e-4)  # the exact 95% interval


def test_a_sqlite_file_without_the_audit_column_is_upgraded_on_open(tmp_path, fake):
    """A file from before the audit mark reads its examples as unaudited and records new marks."""
    settings = Settings(
        data_dir=tmp_path, openai_api_key="test-key", openai_base_url=fake.openai_base_url
    )
    before = cascade_for(settings, films(audit_share=1.0))
    before.decide([Message(id="old", text="bad film")])
    before.labels.close()
    path = label_store_path(settings)
    with sqlite3.connect(path) as connection:  # the table as it was before the column
        connection.execute("ALTER TABLE label_examples DROP COLUMN audit")
    after = cascade_for(settings, films(audit_share=1.0))
    [old] = after.labels.examples()
    assert (old.audit, old.labels) == (False, ["positive"])
    after.decide([Message(id="new", text="bad plot")])
    assert [e.audit for e in after.labels.examples()] == [False, True]
    reopened = SqliteLabelStore(path)  # opening an upgraded file again changes nothing
    assert [e.audit for e in reopened.examples()] == [False, True]
    reopened.close()
    with sqlite3.connect(path) as connection:
        columns = [row[1] for row in connection.execute("PRAGMA table_info(label_examples)")]
    assert columns.count("audit") == 1


def test_every_redis_key_expires_within_the_retention(tmp_path, fake, redis_prefix):
    """Examples, observations and indexes all carry a TTL of at most retain_days."""
    settings = Settings(
        data_dir=tmp_path,
        openai_api_key="test-key",
        openai_base_url=fake.openai_base_url,
        redis_url=REDIS_URL,
        cache_prefix=redis_prefix,
    )
    cascade = cascade_for(settings, films(retain_days=2))
    cascade.decide([Message(id="u", text="unsure film"), Message(id="b", text="bad film")])
    cascade.labels.correct("b", ["negative"])
    client = redis.Redis.from_url(REDIS_URL)
    keys = list(client.scan_iter(f"{redis_prefix}:labels:*"))
    assert len(keys) >= 6  # two examples, two observations, the index, the policies
    for key in keys:
        assert 0 < client.ttl(key) <= 2 * 24 * 3600, key
    client.close()


def test_expired_sqlite_rows_are_ignored_and_purged(tmp_path, fake):
    """Rows past their expiry are not listed nor correctable, and the next write deletes them."""
    settings = Settings(
        data_dir=tmp_path, openai_api_key="test-key", openai_base_url=fake.openai_base_url
    )
    cascade = cascade_for(settings, films())
    cascade.decide([Message(id="old", text="unsure film")])
    path = label_store_path(settings)
    with sqlite3.connect(path) as connection:  # a month passes for what is stored so far
        connection.execute("UPDATE label_examples SET expires_at = ?", (time.time() - 1,))
        connection.execute("UPDATE label_observations SET expires_at = ?", (time.time() - 1,))
    assert cascade.labels.examples() == []
    with pytest.raises(UnknownDecisionError):
        cascade.labels.correct("old", ["negative"])
    cascade.decide([Message(id="new", text="unsure plot")])
    with sqlite3.connect(path) as connection:
        examples = connection.execute("SELECT count(*) FROM label_examples").fetchone()[0]
        seen = connection.execute("SELECT count(*) FROM label_observations").fetchone()[0]
    assert (examples, seen) == (1, 1)


def test_a_store_failure_never_fails_a_decision(tmp_path, fake):
    """With the store's Redis unreachable, decisions come back; the failure is logged, counted."""
    classifier = FixedScoreClassifier(LABELS, scores_of)
    settings = Settings(
        data_dir=tmp_path, openai_api_key="test-key", openai_base_url=fake.openai_base_url
    )
    cascade = build_cascade(settings, classifier, PolicyBook([films()]))
    unreachable = redis.Redis(host="127.0.0.1", port=1, socket_connect_timeout=1)
    cascade.labels = RedisLabelStore(unreachable, "nowhere")
    with capture_logs() as logs:
        decisions = cascade.decide([Message(text="unsure film"), Message(text="bad film")])
    assert [d.tier for d in decisions] == [Tier.LLM, Tier.BERT]
    assert cascade.labels.failures == 2  # the BERT step's write and the LLM step's
    assert [e["event"] for e in logs].count("labels.record_failed") == 2


def test_the_embedded_store_lives_beside_the_decision_cache(tmp_path):
    """Without Redis the store is a SQLite file next to the cache file."""
    settings = Settings(data_dir=tmp_path)
    store = open_label_store(settings)
    assert isinstance(store, SqliteLabelStore)
    assert store.path == tmp_path / "labels.sqlite3"
    assert store.path.parent == settings.resolved_cache_path.parent
    store.close()
