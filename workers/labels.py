"""The label store: decisions kept as training examples, and people's corrections of them.

A policy opts in with ``learning: {collect: true, retain_days: 30}``. The cascade then hands
every decision of that policy to :meth:`LabelStore.record`, which keeps two things:

- an **observation** per message id: which cache key and policy the decision had, so a person
  can later correct *any* decision by its id (one the BERT tier answered or the cache served
  included);
- one **example** per decision-cache key: the *redacted* text (personal data replaced by the
  same :class:`~tiergate.workers.llm.redact.Redactor` the LLM tier uses, whether or not the
  text went to the LLM; the raw text is never stored), the BERT tier's calibrated scores, the
  model and policy versions, and the labels given to it. An LLM answer gives an ``llm`` label
  (source ``llm:<provider>/<model>``); :meth:`LabelStore.correct` gives a ``person`` label,
  which outranks the LLM's: a later LLM answer for the same key never overwrites it. Texts the
  BERT tier answered are kept unlabelled, so a correction has a text to attach to;
  :meth:`LabelStore.examples` returns labelled examples only.

An example the LLM labels while its key is in the policy's audit sample (``learning.audit_share``,
see :func:`~tiergate.policies.routing.in_audit_sample`) is marked ``audit``, and stays so. Such
a text goes to the LLM whatever the BERT tier's confidence, so the audit examples are a uniform
sample of the traffic, and :meth:`LabelStore.stats` measures the BERT tier on them. A text only
a person labelled is never marked: which texts people correct is their choice, not a draw.

Everything expires ``retain_days`` after it was last written (an observation after its
decision, an example after its last label or sighting), so nothing grows without bound.
Two backends: :class:`RedisLabelStore` (distributed: every key carries a TTL, and a sorted set
per policy, trimmed by expiry, lists the examples) and :class:`SqliteLabelStore` (embedded: a
file beside the decision cache; expired rows are purged on open and on every write).

Collecting never slows or breaks classification beyond one store round trip per batch:
:meth:`LabelStore.record` logs (``labels.record_failed``) and counts (:attr:`failures`) a store
error instead of raising it. :class:`Corrections` is the front doors' side: it checks a
correction against the decision's policy, stores it, and deletes the cached decision so the
next identical message is decided afresh.
"""

from __future__ import annotations

import os
import sqlite3
import threading
import time
from abc import ABC, abstractmethod
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

import redis
import structlog
from pydantic import BaseModel, ConfigDict, computed_field

from tiergate.policies.calibrate import accuracy_interval
from tiergate.policies.routing import in_audit_sample
from tiergate.policies.spec import PolicySpec
from tiergate.workers.cache import DecisionCache, open_cache
from tiergate.workers.errors import CoordinationError, LabelNotInPolicyError, UnknownDecisionError
from tiergate.workers.llm.redact import Redactor
from tiergate.workers.redis_connection import redis_errors_as_coordination_errors, shared_redis
from tiergate.workers.schemas import Decision, Message, Status, Tier
from tiergate.workers.settings import Settings

log = structlog.get_logger(__name__)

LabelKind = Literal["llm", "person"]
PERSON = "person"
ANONYMOUS = "anonymous"
AUDIT_CONFIDENCE = 0.95
"""The confidence of the interval around the BERT tier's accuracy on the audit sample."""


class CollectedExample(BaseModel):
    """One labelled example, per decision-cache key: what ``tiergate distill`` trains on.

    ``text`` is the redacted text, never the raw one. ``labels`` are the reference labels: a
    person's when one corrected the decision, else the LLM's. ``source`` is
    ``llm:<provider>/<model>`` or ``person:<source given with the correction>``; ``time`` is
    when that label was given (unix seconds). ``scores`` are the BERT tier's calibrated
    probabilities for the text under ``model_version``. ``audit``: the LLM labelled the text
    while it was in the policy's audit sample (``learning.audit_share``), so whether or not the
    BERT tier was confident: the audit examples are a uniform sample of the traffic.
    """

    model_config = ConfigDict(frozen=True)

    key: str
    text: str
    labels: list[str]
    source: str
    policy: str
    policy_version: str | None
    model_version: str
    scores: dict[str, float]
    time: float
    audit: bool = False

    @property
    def kind(self) -> LabelKind:
        """Who gave the label: ``llm`` or ``person``."""
        return "person" if self.source.startswith(f"{PERSON}:") else "llm"


class Observation(BaseModel):
    """Which cache key and policy the decision of one message id had."""

    model_config = ConfigDict(frozen=True)

    message_id: str
    key: str
    policy: str


class Agreement(BaseModel):
    """How often two labellers gave the same label set, over the examples both labelled."""

    compared: int = 0
    agreed: int = 0

    @computed_field  # type: ignore[prop-decorator]
    @property
    def rate(self) -> float | None:
        """``agreed / compared``; ``None`` when nothing was compared."""
        return self.agreed / self.compared if self.compared else None

    def count(self, same: bool) -> None:
        """Count one comparison."""
        self.compared += 1
        self.agreed += int(same)


class AuditAccuracy(BaseModel):
    """The BERT tier's accuracy on the audit sample: a uniform sample of the traffic.

    ``examples`` counts the labelled audit examples, ``agreed`` those whose BERT answer equals
    the reference label (a person's if one corrected it, else the LLM's). Unlike the
    agreements, which compare only the texts the BERT tier escalated or people corrected, this
    estimates the BERT tier's accuracy over all traffic: ``accuracy``, with ``interval`` its
    two-sided Clopper-Pearson interval at :data:`AUDIT_CONFIDENCE`; both ``None`` without
    audit examples.
    """

    examples: int = 0
    agreed: int = 0

    @computed_field  # type: ignore[prop-decorator]
    @property
    def accuracy(self) -> float | None:
        """``agreed / examples``; ``None`` without audit examples."""
        return self.agreed / self.examples if self.examples else None

    @computed_field  # type: ignore[prop-decorator]
    @property
    def interval(self) -> tuple[float, float] | None:
        """The exact interval around :attr:`accuracy`; ``None`` without audit examples."""
        if not self.examples:
            return None
        return accuracy_interval(self.agreed, self.examples, AUDIT_CONFIDENCE)

    def count(self, same: bool) -> None:
        """Count one audit example."""
        self.examples += 1
        self.agreed += int(same)


class LabelStats(BaseModel):
    """What the store holds for a policy (or all): counts and agreement between labellers.

    ``examples`` counts labelled examples (by their reference label in ``by_label``, by who
    gave it in ``by_kind`` and by full source in ``by_source``); ``unlabelled`` the texts only
    the BERT tier answered. ``bert_vs_llm`` compares the BERT tier's own answer with the
    LLM's, ``bert_vs_person`` and ``llm_vs_person`` with people's corrections. ``audit``: the
    BERT tier's answer against the reference label over the audit examples, the one unbiased
    measure of its accuracy (see :class:`AuditAccuracy`).
    """

    policy: str | None
    examples: int
    unlabelled: int
    by_label: dict[str, int]
    by_kind: dict[str, int]
    by_source: dict[str, int]
    bert_vs_llm: Agreement
    bert_vs_person: Agreement
    llm_vs_person: Agreement
    audit: AuditAccuracy


@dataclass(frozen=True)
class Observed:
    """One decision as the cascade hands it to :meth:`LabelStore.record`."""

    message: Message
    key: str
    decision: Decision
    spec: PolicySpec


# ---------------------------------------------------------------------------------- records


class _Given(BaseModel):
    """Labels given to an example: by whom (``source``) and when."""

    model_config = ConfigDict(frozen=True)

    labels: list[str]
    source: str
    time: float


class _Base(BaseModel):
    """What an example holds whoever labels it: written once per key, never overwritten.

    ``label_set`` and ``multi_label`` are the policy's, so a correction can be checked without
    the policy loaded; ``bert_labels`` is what the BERT tier alone answered (for agreement);
    ``retain_s`` is the policy's retention, which a correction renews.
    """

    model_config = ConfigDict(frozen=True)

    key: str
    text: str
    policy: str
    policy_version: str | None
    model_version: str
    scores: dict[str, float]
    bert_labels: list[str]
    label_set: list[str]
    multi_label: bool
    retain_s: int
    seen: float


@dataclass(frozen=True)
class _Record:
    """An example as stored: its base, the labels given to it so far, and its audit mark.

    ``audit`` is kept beside the base, not in it: unlike the base it can change, from false to
    true, when the LLM labels the key again while it is in the audit sample (never back).
    """

    base: _Base
    llm: _Given | None = None
    person: _Given | None = None
    audit: bool = False

    @property
    def reference(self) -> _Given | None:
        """The labels that count: a person's outrank the LLM's."""
        return self.person if self.person is not None else self.llm

    def example(self) -> CollectedExample | None:
        """The labelled example, or ``None`` while nobody labelled the text."""
        given = self.reference
        if given is None:
            return None
        base = self.base
        return CollectedExample(
            key=base.key,
            text=base.text,
            labels=list(given.labels),
            source=given.source,
            policy=base.policy,
            policy_version=base.policy_version,
            model_version=base.model_version,
            scores=dict(base.scores),
            time=given.time,
            audit=self.audit,
        )


@dataclass(frozen=True)
class _Entry:
    """One write of :meth:`LabelStore.record`: the example's base, an LLM label, the id seen.

    ``audit``: this decision's LLM label was given while the key was in the policy's audit
    sample (false without an LLM label: a cached or BERT decision labels nothing).
    """

    base: _Base
    llm: _Given | None
    observation: Observation
    audit: bool


def _bert_labels(decision: Decision, spec: PolicySpec) -> list[str]:
    """What the BERT tier alone answered, from the scores the decision carries."""
    scores = decision.scores
    if spec.multi_label:
        threshold = spec.escalation.flag_threshold
        return [label for label in spec.label_names if scores.get(label, 0.0) >= threshold]
    return [max(spec.label_names, key=lambda label: scores.get(label, 0.0))]


def _llm_label(decision: Decision, now: float) -> _Given | None:
    """The LLM's label when this decision is a fresh LLM answer (not reused, not a fallback)."""
    usage = decision.llm
    if (
        decision.tier is not Tier.LLM
        or decision.llm_skipped is not None
        or decision.cached
        or decision.status is not Status.ANSWERED
        or usage is None
    ):
        return None
    return _Given(
        labels=list(decision.labels), source=f"llm:{usage.provider}/{usage.model}", time=now
    )


def _entry(observed: Observed, redactor: Redactor, now: float) -> _Entry:
    decision, spec = observed.decision, observed.spec
    text, _ = redactor.redact(observed.message.text)
    base = _Base(
        key=observed.key,
        text=text,
        policy=spec.name,
        policy_version=decision.policy_version,
        model_version=decision.model_version,
        scores=dict(decision.scores),
        bert_labels=_bert_labels(decision, spec),
        label_set=list(spec.label_names),
        multi_label=spec.multi_label,
        retain_s=spec.learning.retain_seconds,
        seen=now,
    )
    observation = Observation(message_id=observed.message.id, key=observed.key, policy=spec.name)
    llm = _llm_label(decision, now)
    audit = llm is not None and in_audit_sample(observed.key, spec.learning.audit_share)
    return _Entry(base=base, llm=llm, observation=observation, audit=audit)


def _checked_labels(base: _Base, labels: Sequence[str]) -> list[str]:
    """``labels`` in the policy's order, or :class:`LabelNotInPolicyError` saying what is wrong."""
    unknown = [label for label in labels if label not in base.label_set]
    if unknown:
        raise LabelNotInPolicyError(
            base.policy,
            f"label(s) {', '.join(map(repr, unknown))} not in its label set "
            f"({', '.join(base.label_set)})",
        )
    chosen = [label for label in base.label_set if label in set(labels)]
    if not base.multi_label and len(chosen) != 1:
        raise LabelNotInPolicyError(
            base.policy, f"a single-label policy takes exactly one label, not {len(chosen)}"
        )
    return chosen


# ---------------------------------------------------------------------------------- the store


class LabelStore(ABC):
    """Collected examples and observations; see the module docstring for what is kept.

    Subclasses supply the storage (five primitives); the rules (opt-in, redaction, which
    label counts, checking a correction) live here, once. Safe to share between threads.
    """

    def __init__(self) -> None:
        self._redactor = Redactor()
        self._failures_lock = threading.Lock()
        self.failures = 0
        """Calls of :meth:`record` whose write failed (each is also logged)."""

    def record(self, observed: Sequence[Observed]) -> None:
        """Keep the decisions of the policies that opted in; never raises.

        Decisions of policies without ``learning.collect`` are ignored. A failure (the store
        unreachable, a bug) is logged as ``labels.record_failed`` and counted in
        :attr:`failures`: collecting must never cost a decision.
        """
        wanted = [item for item in observed if item.spec.learning.collect]
        if not wanted:
            return
        try:
            now = time.time()
            self._write([_entry(item, self._redactor, now) for item in wanted])
        except Exception as exc:  # noqa: BLE001 -- a label lost must not fail the decision
            with self._failures_lock:
                self.failures += 1
            log.warning(  # no traceback: its frames' locals hold texts
                "labels.record_failed",
                count=len(wanted),
                error_type=type(exc).__name__,
                error=str(exc),
            )

    def observation(self, message_id: str) -> Observation:
        """Which key and policy ``message_id``'s decision had.

        Raises :class:`UnknownDecisionError` when no collected decision has that id (never
        seen, expired, or not collected).
        """
        found = self._observation(message_id)
        if found is None:
            raise UnknownDecisionError(message_id)
        return found

    def correct(
        self, message_id: str, labels: Sequence[str], source: str | None = None
    ) -> CollectedExample:
        """Give the decision of ``message_id`` a person's ``labels``; the example as it now is.

        The labels must be in the decision's policy's label set, exactly one for a
        single-label policy (any number, none included, for a multi-label one), else
        :class:`LabelNotInPolicyError`; an unknown or expired id raises
        :class:`UnknownDecisionError`. The person's labels outrank the LLM's from now on, and
        the example is kept ``retain_days`` from now. ``source`` says who (an agent's id);
        the example's source is ``person:<source>``.
        """
        observation = self.observation(message_id)
        record = self._record(observation.key)
        if record is None:
            raise UnknownDecisionError(message_id)
        chosen = _checked_labels(record.base, labels)
        given = _Given(labels=chosen, source=f"{PERSON}:{source or ANONYMOUS}", time=time.time())
        if not self._give_person(record.base, given):
            raise UnknownDecisionError(message_id)  # expired between the read and the write
        example = replace(record, person=given).example()
        assert example is not None  # a person's label was just given
        log.info(
            "labels.corrected",
            message_id=message_id,
            policy=record.base.policy,
            source=given.source,
            overrode=record.llm.source if record.llm is not None else None,
        )
        return example

    def examples(self, policy: str | None = None) -> list[CollectedExample]:
        """The labelled examples of ``policy`` (all policies when ``None``), oldest first."""
        found = [example for r in self._records(policy) if (example := r.example()) is not None]
        return sorted(found, key=lambda example: (example.time, example.key))

    def count(self, policy: str | None = None) -> int:
        """How many labelled examples :meth:`examples` would return."""
        return sum(1 for r in self._records(policy) if r.reference is not None)

    def stats(self, policy: str | None = None) -> LabelStats:
        """Counts by label and by source, and agreement between the BERT tier, LLM and people."""
        by_label: Counter[str] = Counter()
        by_kind: Counter[str] = Counter()
        by_source: Counter[str] = Counter()
        bert_vs_llm, bert_vs_person, llm_vs_person = Agreement(), Agreement(), Agreement()
        audit = AuditAccuracy()
        unlabelled = 0
        for record in self._records(policy):
            example = record.example()
            if example is None:
                unlabelled += 1
                continue
            by_label.update(example.labels)
            by_kind[example.kind] += 1
            by_source[example.source] += 1
            bert = set(record.base.bert_labels)
            if record.llm is not None:
                bert_vs_llm.count(bert == set(record.llm.labels))
            if record.person is not None:
                bert_vs_person.count(bert == set(record.person.labels))
                if record.llm is not None:
                    llm_vs_person.count(set(record.llm.labels) == set(record.person.labels))
            if record.audit:
                audit.count(bert == set(example.labels))
        return LabelStats(
            policy=policy,
            examples=sum(by_kind.values()),
            unlabelled=unlabelled,
            by_label=dict(by_label.most_common()),
            by_kind=dict(by_kind.most_common()),
            by_source=dict(by_source.most_common()),
            bert_vs_llm=bert_vs_llm,
            bert_vs_person=bert_vs_person,
            llm_vs_person=llm_vs_person,
            audit=audit,
        )

    # ------------------------------------------------------------------------ storage

    @abstractmethod
    def _write(self, entries: Sequence[_Entry]) -> None:
        """Store each entry, and renew its retention.

        Its base unless the key has one, its LLM label if any (replacing an earlier LLM label,
        never a person's), its audit mark if set (never cleared), and its observation.
        """

    @abstractmethod
    def _observation(self, message_id: str) -> Observation | None:
        """The unexpired observation of ``message_id``."""

    @abstractmethod
    def _record(self, key: str) -> _Record | None:
        """The unexpired example stored under ``key``."""

    @abstractmethod
    def _give_person(self, base: _Base, given: _Given) -> bool:
        """Set the person's label of ``base.key`` if the example still exists; whether it did."""

    @abstractmethod
    def _records(self, policy: str | None) -> Iterator[_Record]:
        """Every unexpired example of ``policy`` (of all policies when ``None``)."""

    @abstractmethod
    def close(self) -> None:
        """Release the connections to the store; it is unusable afterwards."""


# ---------------------------------------------------------------------------------- Redis

# KEYS: example, index, policies. ARGV: person label JSON, retain s, expiry time, key, policy.
# One script so that a correction never recreates an example that expired meanwhile.
_GIVE_PERSON = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
redis.call('HSET', KEYS[1], 'person', ARGV[1])
redis.call('EXPIRE', KEYS[1], ARGV[2], 'GT')
redis.call('ZADD', KEYS[2], 'GT', ARGV[3], ARGV[4])
redis.call('EXPIRE', KEYS[2], ARGV[2], 'GT')
redis.call('ZADD', KEYS[3], 'GT', ARGV[3], ARGV[5])
redis.call('EXPIRE', KEYS[3], ARGV[2], 'GT')
return 1
"""

# HGETALLs per pipeline when listing examples.
_READ_BATCH = 500


def _text(value: object) -> str:
    """A Redis reply as text, from a client with or without ``decode_responses``."""
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


class RedisLabelStore(LabelStore):
    """The label store in Redis, shared by every worker and gateway.

    Keys under ``{prefix}:labels:``, each with a TTL of the policy's ``retain_days``:
    ``example:{key}`` a hash (``base``, ``llm``, ``person``: JSON; separate fields, so an LLM
    label is written without reading and never touches a person's; ``audit``, present once the
    LLM labelled the key in the audit sample), ``seen:{message id}`` the observation,
    ``index:{policy}`` a sorted set of keys scored by when each expires (trimmed on every
    write), ``policies`` the policies with examples, scored the same way. Renewals only extend
    (``EXPIRE ... GT``). Connection failures raise
    :class:`~tiergate.workers.errors.CoordinationError`.
    """

    def __init__(self, client: redis.Redis, prefix: str = "tiergate") -> None:
        super().__init__()
        self._client = client
        self._prefix = f"{prefix}:labels"
        self._give = client.register_script(_GIVE_PERSON)

    def _example_key(self, key: str) -> str:
        return f"{self._prefix}:example:{key}"

    def _seen_key(self, message_id: str) -> str:
        return f"{self._prefix}:seen:{message_id}"

    def _index_key(self, policy: str) -> str:
        return f"{self._prefix}:index:{policy}"

    @property
    def _policies_key(self) -> str:
        return f"{self._prefix}:policies"

    def _write(self, entries: Sequence[_Entry]) -> None:
        now = time.time()
        retention = {entry.base.policy: entry.base.retain_s for entry in entries}
        with redis_errors_as_coordination_errors(self._client, "recording labels"):
            pipe = self._client.pipeline(transaction=False)
            for entry in entries:
                base, retain = entry.base, entry.base.retain_s
                example = self._example_key(base.key)
                pipe.hsetnx(example, "base", base.model_dump_json())
                if entry.llm is not None:
                    pipe.hset(example, "llm", entry.llm.model_dump_json())
                if entry.audit:
                    pipe.hset(example, "audit", "1")
                self._renew(pipe, example, retain)
                pipe.set(
                    self._seen_key(entry.observation.message_id),
                    entry.observation.model_dump_json(),
                    ex=retain,
                )
                pipe.zadd(self._index_key(base.policy), {base.key: now + retain}, gt=True)
            for policy, retain in retention.items():  # once per policy, not per decision
                index = self._index_key(policy)
                pipe.zremrangebyscore(index, "-inf", now)
                self._renew(pipe, index, retain)
                pipe.zadd(self._policies_key, {policy: now + retain}, gt=True)
                self._renew(pipe, self._policies_key, retain)
            pipe.zremrangebyscore(self._policies_key, "-inf", now)
            pipe.execute()

    @staticmethod
    def _renew(pipe: redis.client.Pipeline, name: str, retain_s: int) -> None:
        """Expire ``name`` in ``retain_s`` unless it already lives longer (never shortened)."""
        # NX sets the first TTL, GT only ever extends it: every key expires.
        pipe.expire(name, retain_s, nx=True)
        pipe.expire(name, retain_s, gt=True)

    def _observation(self, message_id: str) -> Observation | None:
        with redis_errors_as_coordination_errors(self._client, "reading a label observation"):
            raw = self._client.get(self._seen_key(message_id))
        return None if raw is None else Observation.model_validate_json(raw)

    def _record(self, key: str) -> _Record | None:
        with redis_errors_as_coordination_errors(self._client, "reading a collected example"):
            fields = self._client.hgetall(self._example_key(key))
        return _record_of(fields)

    def _give_person(self, base: _Base, given: _Given) -> bool:
        expires = given.time + base.retain_s
        keys = [
            self._example_key(base.key),
            self._index_key(base.policy),
            self._policies_key,
        ]
        args: list[str | float] = [
            given.model_dump_json(),
            base.retain_s,
            expires,
            base.key,
            base.policy,
        ]
        with redis_errors_as_coordination_errors(self._client, "recording a correction"):
            return bool(self._give(keys=keys, args=args))

    def _records(self, policy: str | None) -> Iterator[_Record]:
        now = time.time()
        with redis_errors_as_coordination_errors(self._client, "listing collected examples"):
            if policy is None:
                policies = [
                    _text(p) for p in self._client.zrangebyscore(self._policies_key, now, "+inf")
                ]
            else:
                policies = [policy]
            for name in policies:
                keys = [
                    _text(k) for k in self._client.zrangebyscore(self._index_key(name), now, "+inf")
                ]
                for start in range(0, len(keys), _READ_BATCH):
                    pipe = self._client.pipeline(transaction=False)
                    for key in keys[start : start + _READ_BATCH]:
                        pipe.hgetall(self._example_key(key))
                    for fields in pipe.execute():
                        record = _record_of(fields)
                        if record is not None:
                            yield record

    def close(self) -> None:
        """See :meth:`LabelStore.close` (closes the client's connection pool)."""
        self._client.close()


def _record_of(fields: Mapping[Any, Any]) -> _Record | None:
    """A record from its Redis hash (``None`` for a missing or base-less one)."""
    found = {_text(name): _text(value) for name, value in fields.items()}
    if "base" not in found:
        return None
    return _Record(
        base=_Base.model_validate_json(found["base"]),
        llm=_Given.model_validate_json(found["llm"]) if "llm" in found else None,
        person=_Given.model_validate_json(found["person"]) if "person" in found else None,
        audit="audit" in found,
    )


# ---------------------------------------------------------------------------------- SQLite

_SCHEMA = """
CREATE TABLE IF NOT EXISTS label_examples (
    key TEXT PRIMARY KEY,
    policy TEXT NOT NULL,
    base TEXT NOT NULL,
    llm TEXT,
    person TEXT,
    expires_at REAL NOT NULL,
    audit INTEGER NOT NULL DEFAULT 0
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS label_examples_expiry ON label_examples (expires_at);
CREATE INDEX IF NOT EXISTS label_examples_policy ON label_examples (policy);
CREATE TABLE IF NOT EXISTS label_observations (
    message_id TEXT PRIMARY KEY,
    observation TEXT NOT NULL,
    expires_at REAL NOT NULL
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS label_observations_expiry ON label_observations (expires_at);
"""

# A file written before the audit mark existed lacks its column; its examples are not audited.
_ADD_AUDIT = "ALTER TABLE label_examples ADD COLUMN audit INTEGER NOT NULL DEFAULT 0"

# An example's base is kept; an LLM label replaces an earlier LLM label (never a person's, a
# column of its own); the audit mark is only ever set; the expiry only ever moves later.
_UPSERT_EXAMPLE = """
INSERT INTO label_examples (key, policy, base, llm, person, expires_at, audit)
VALUES (?, ?, ?, ?, NULL, ?, ?)
ON CONFLICT (key) DO UPDATE SET
    llm = coalesce(excluded.llm, label_examples.llm),
    expires_at = max(label_examples.expires_at, excluded.expires_at),
    audit = max(label_examples.audit, excluded.audit)
"""

_BUSY_TIMEOUT_S = 30.0


class SqliteLabelStore(LabelStore):
    """The label store in a SQLite file, for running without Redis (CLI, embedded gateway).

    Two tables, ``label_examples`` (one row per key; ``base``, ``llm`` and ``person`` as JSON,
    ``audit`` 0 or 1; a file without that column gets it on open) and ``label_observations``,
    each row with an expiry time; expired rows are ignored on read and deleted on open and at
    every write. One connection per process, used under a lock (a store created before a fork
    opens its own in the child); several processes share the file through SQLite's locking, in
    WAL mode. SQLite failures raise
    :class:`~tiergate.workers.errors.CoordinationError`.
    """

    def __init__(self, path: Path) -> None:
        super().__init__()
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._connection: sqlite3.Connection | None = None
        self._pid = os.getpid()
        with self._using("opening the label store") as connection:
            connection.execute("PRAGMA journal_mode=WAL")
            connection.executescript(_SCHEMA)
            self._add_audit_column(connection)
            self._purge(connection, time.time())

    @contextmanager
    def _using(self, doing: str) -> Iterator[sqlite3.Connection]:
        """This process's connection, held under the lock; SQLite errors as CoordinationError."""
        with self._lock:
            if self._connection is None or os.getpid() != self._pid:
                # A forked child must not use the parent's connection; it forgets it unclosed.
                self._pid = os.getpid()
                self._connection = sqlite3.connect(
                    self.path,
                    timeout=_BUSY_TIMEOUT_S,
                    isolation_level=None,
                    check_same_thread=False,
                )
            try:
                yield self._connection
            except sqlite3.Error as exc:
                raise CoordinationError(
                    f"{doing}: SQLite label store at {self.path} failed ({exc})"
                ) from exc

    @staticmethod
    def _add_audit_column(connection: sqlite3.Connection) -> None:
        """Add the ``audit`` column to a file written before it existed."""
        # Checked under the write lock, so two processes opening the file add it once.
        connection.execute("BEGIN IMMEDIATE")
        try:
            columns = {row[1] for row in connection.execute("PRAGMA table_info(label_examples)")}
            if "audit" not in columns:
                connection.execute(_ADD_AUDIT)
        except BaseException:
            connection.execute("ROLLBACK")
            raise
        connection.execute("COMMIT")

    @staticmethod
    def _purge(connection: sqlite3.Connection, now: float) -> None:
        connection.execute("DELETE FROM label_examples WHERE expires_at <= ?", (now,))
        connection.execute("DELETE FROM label_observations WHERE expires_at <= ?", (now,))

    def _write(self, entries: Sequence[_Entry]) -> None:
        now = time.time()
        examples = [
            (
                e.base.key,
                e.base.policy,
                e.base.model_dump_json(),
                e.llm.model_dump_json() if e.llm is not None else None,
                now + e.base.retain_s,
                int(e.audit),
            )
            for e in entries
        ]
        observations = [
            (e.observation.message_id, e.observation.model_dump_json(), now + e.base.retain_s)
            for e in entries
        ]
        with self._using("recording labels") as connection:
            connection.execute("BEGIN IMMEDIATE")
            try:
                # Purged first, so an expired row is replaced whole rather than renewed.
                self._purge(connection, now)
                connection.executemany(_UPSERT_EXAMPLE, examples)
                connection.executemany(
                    "INSERT OR REPLACE INTO label_observations (message_id, observation, "
                    "expires_at) VALUES (?, ?, ?)",
                    observations,
                )
            except BaseException:
                connection.execute("ROLLBACK")
                raise
            connection.execute("COMMIT")

    def _observation(self, message_id: str) -> Observation | None:
        with self._using("reading a label observation") as connection:
            row = connection.execute(
                "SELECT observation FROM label_observations WHERE message_id = ? "
                "AND expires_at > ?",
                (message_id, time.time()),
            ).fetchone()
        return None if row is None else Observation.model_validate_json(row[0])

    def _record(self, key: str) -> _Record | None:
        with self._using("reading a collected example") as connection:
            row = connection.execute(
                "SELECT base, llm, person, audit FROM label_examples "
                "WHERE key = ? AND expires_at > ?",
                (key, time.time()),
            ).fetchone()
        return None if row is None else _row_record(row)

    def _give_person(self, base: _Base, given: _Given) -> bool:
        with self._using("recording a correction") as connection:
            cursor = connection.execute(
                "UPDATE label_examples SET person = ?, expires_at = max(expires_at, ?) "
                "WHERE key = ? AND expires_at > ?",
                (given.model_dump_json(), given.time + base.retain_s, base.key, given.time),
            )
        return cursor.rowcount == 1

    def _records(self, policy: str | None) -> Iterator[_Record]:
        query = "SELECT base, llm, person, audit FROM label_examples WHERE expires_at > ?"
        args: tuple[object, ...] = (time.time(),)
        if policy is not None:
            query += " AND policy = ?"
            args = (*args, policy)
        with self._using("listing collected examples") as connection:
            rows = connection.execute(query, args).fetchall()
        return iter([_row_record(row) for row in rows])

    def close(self) -> None:
        """See :meth:`LabelStore.close`."""
        with self._lock:
            if self._connection is not None:
                self._connection.close()
                self._connection = None


def _row_record(row: tuple[str, str | None, str | None, int]) -> _Record:
    base, llm, person, audit = row
    return _Record(
        base=_Base.model_validate_json(base),
        llm=_Given.model_validate_json(llm) if llm is not None else None,
        person=_Given.model_validate_json(person) if person is not None else None,
        audit=bool(audit),
    )


def label_store_path(settings: Settings) -> Path:
    """The embedded label store's file: ``labels.sqlite3`` beside the decision cache file."""
    return settings.resolved_cache_path.with_name("labels.sqlite3")


def open_label_store(settings: Settings) -> LabelStore:
    """The label store ``settings`` ask for.

    Redis when ``redis_url`` is set (keys under ``cache_prefix``), else the SQLite file
    :func:`label_store_path`. Opening Redis does not connect; the first call does.
    """
    if settings.redis_url:
        return RedisLabelStore(shared_redis(settings.redis_url), settings.cache_prefix)
    return SqliteLabelStore(label_store_path(settings))


# ---------------------------------------------------------------------------------- corrections


class Corrections:
    """People's corrections, as every front door applies them (HTTP, client, CLI).

    :meth:`correct` stores the person's labels in ``store`` and deletes the cached decision of
    that text from ``cache``, so the next identical message is decided afresh. Without a store
    (no policy collects labels) every id is unknown.
    """

    def __init__(self, store: LabelStore | None, cache: DecisionCache | None) -> None:
        self.store = store
        self.cache = cache

    @classmethod
    def from_settings(cls, settings: Settings) -> Corrections:
        """Over the label store and decision cache that ``settings`` name."""
        return cls(open_label_store(settings), open_cache(settings))

    def observation(self, message_id: str) -> Observation:
        """See :meth:`LabelStore.observation`."""
        if self.store is None:
            raise UnknownDecisionError(message_id)
        return self.store.observation(message_id)

    def correct(
        self,
        message_id: str,
        labels: Sequence[str],
        source: str | None = None,
    ) -> CollectedExample:
        """See :meth:`LabelStore.correct`; then the cached decision of the text is deleted."""
        if self.store is None:
            raise UnknownDecisionError(message_id)
        example = self.store.correct(message_id, labels, source)
        if self.cache is not None:
            self.cache.forget(example.key)
        return example

    def close(self) -> None:
        """Close the store and the cache."""
        if self.store is not None:
            self.store.close()
        if self.cache is not None:
            self.cache.close()
