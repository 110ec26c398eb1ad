"""Shadow scoring: a candidate model scores live traffic beside the serving one, deciding nothing.

While ``tiergate model shadow VERSION`` names a candidate, each BERT step also runs the
candidate on the messages it scored (after the live predictions, so no decision waits for it or
depends on it) and counts, per policy:

- ``scored``: messages the candidate scored;
- ``would_llm``: those the policy would have sent to the LLM with the candidate's prediction
  (``policies.routing.decide`` with an unlimited budget); ``live_llm``: those the live model sent;
- ``compared`` and ``agreed``: decisions whose label(s) the candidate's answer was compared with,
  and how many it matched. The reference is the decision made: the LLM's label where the
  decision came from the LLM (counted by the LLM step, which may run on another worker: the
  candidate's prediction travels in :attr:`LLMWork.shadow`), otherwise the live BERT answer.
  Single-label: the candidate's top label is the decision's label. Multi-label: the labels the
  candidate flags (above the policy's flag threshold) are exactly the decision's.

Figures are kept in Redis (one hash per candidate, shared by every worker) when
``settings.redis_url`` is set, else in this process's memory and a JSON file per process under
``<store>/shadow/<candidate>/``, summed when read.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import uuid
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Protocol

import redis
import structlog
from pydantic import BaseModel, ConfigDict

from tiergate.policies.prediction import Prediction
from tiergate.policies.routing import UNLIMITED, Target, decide
from tiergate.policies.spec import PolicySpec
from tiergate.workers.bert.calibrated import ModelThresholds
from tiergate.workers.cascade import Classifier, LLMWork
from tiergate.workers.errors import TiergateError
from tiergate.workers.labels import CollectedExample
from tiergate.workers.redis_connection import redis_errors_as_coordination_errors, shared_redis
from tiergate.workers.schemas import Decision, Message
from tiergate.workers.settings import Settings

log = structlog.get_logger(__name__)

# Shadow figures outlive a candidate's trial by this much, then Redis drops them.
FIGURES_TTL_S = 90 * 24 * 3600
_FIGURES = ("scored", "compared", "agreed", "would_llm", "live_llm")


class ShadowFigures(BaseModel):
    """What a candidate did on live traffic for one policy (see the module docstring)."""

    model_config = ConfigDict(frozen=True)

    scored: int = 0
    compared: int = 0
    agreed: int = 0
    would_llm: int = 0
    live_llm: int = 0

    def plus(self, other: ShadowFigures) -> ShadowFigures:
        """Both sets of counts added up."""
        return ShadowFigures(**{n: getattr(self, n) + getattr(other, n) for n in _FIGURES})

    @property
    def agreement(self) -> float | None:
        """Share of compared decisions the candidate agreed with (``None``: none compared)."""
        return self.agreed / self.compared if self.compared else None

    @property
    def would_llm_share(self) -> float | None:
        """Share of scored messages the candidate would have sent to the LLM."""
        return self.would_llm / self.scored if self.scored else None

    @property
    def live_llm_share(self) -> float | None:
        """Share of the same messages the live model sent to the LLM."""
        return self.live_llm / self.scored if self.scored else None


class ShadowTally(Protocol):
    """Where shadow figures add up, by candidate version and policy."""

    def add(self, candidate: str, counts: Mapping[str, ShadowFigures]) -> None:
        """Add ``counts`` (by policy name) to ``candidate``'s figures."""
        ...

    def read(self, candidate: str) -> dict[str, ShadowFigures]:
        """``candidate``'s figures by policy name (empty: never scored)."""
        ...


class RedisShadowTally:
    """Figures in the hash ``{prefix}:model-shadow:{candidate}``, field ``<policy>:<figure>``."""

    def __init__(self, client: redis.Redis, prefix: str) -> None:
        self.client = client
        self.prefix = prefix

    def _key(self, candidate: str) -> str:
        return f"{self.prefix}:model-shadow:{candidate}"

    def add(self, candidate: str, counts: Mapping[str, ShadowFigures]) -> None:
        """See :meth:`ShadowTally.add`: one pipelined round trip."""
        key = self._key(candidate)
        with redis_errors_as_coordination_errors(self.client, "counting shadow figures"):
            pipe = self.client.pipeline(transaction=False)
            for policy, figures in counts.items():
                for name in _FIGURES:
                    if value := getattr(figures, name):
                        pipe.hincrby(key, f"{policy}:{name}", value)
            pipe.expire(key, FIGURES_TTL_S)
            pipe.execute()

    def read(self, candidate: str) -> dict[str, ShadowFigures]:
        """See :meth:`ShadowTally.read`."""
        with redis_errors_as_coordination_errors(self.client, "reading shadow figures"):
            raw = self.client.hgetall(self._key(candidate))
        by_policy: dict[str, dict[str, int]] = {}
        for field, value in raw.items():
            policy, _, name = _text(field).rpartition(":")
            if name in _FIGURES:
                by_policy.setdefault(policy, {})[name] = int(value)
        return {policy: ShadowFigures(**values) for policy, values in by_policy.items()}


class FileShadowTally:
    """Figures in memory, written after each change to ``<root>/<candidate>/<process>.json``.

    One file per process (host, pid and a random part), so processes never overwrite each
    other's counts; :meth:`read` sums every file of the candidate.
    """

    def __init__(self, root: Path) -> None:
        self.root = root
        self.process = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self._counts: dict[str, dict[str, ShadowFigures]] = {}
        self._lock = threading.Lock()

    def add(self, candidate: str, counts: Mapping[str, ShadowFigures]) -> None:
        """See :meth:`ShadowTally.add`: the process's file is replaced atomically."""
        with self._lock:
            mine = self._counts.setdefault(candidate, {})
            for policy, figures in counts.items():
                mine[policy] = mine.get(policy, ShadowFigures()).plus(figures)
            document = {policy: f.model_dump() for policy, f in mine.items()}
            directory = self.root / candidate
            directory.mkdir(parents=True, exist_ok=True)
            staging = directory / f".{self.process}.json.tmp"
            staging.write_text(json.dumps(document))
            staging.replace(directory / f"{self.process}.json")

    def read(self, candidate: str) -> dict[str, ShadowFigures]:
        """See :meth:`ShadowTally.read`: every process's file, summed."""
        total: dict[str, ShadowFigures] = {}
        directory = self.root / candidate
        files = sorted(directory.glob("*.json")) if directory.is_dir() else []
        for path in files:
            try:
                document = json.loads(path.read_text())
            except (OSError, ValueError):
                continue  # a process's file being replaced: the next read finds it
            for policy, values in document.items():
                figures = ShadowFigures.model_validate(values)
                total[policy] = total.get(policy, ShadowFigures()).plus(figures)
        return total


def open_shadow_tally(settings: Settings) -> ShadowTally:
    """Redis when ``settings.redis_url`` is set, else files under ``<store>/shadow``."""
    if settings.redis_url:
        return RedisShadowTally(shared_redis(settings.redis_url), settings.cache_prefix)
    return FileShadowTally(settings.resolved_model_store / "shadow")


def agrees(candidate: Prediction, reference: Sequence[str], spec: PolicySpec) -> bool:
    """Whether the candidate's answer matches a decision's label(s) (see the module docstring)."""
    return _agrees_at(candidate, reference, spec.escalation.flag_threshold)


def _agrees_at(candidate: Prediction, reference: Sequence[str], flag_threshold: float) -> bool:
    if candidate.multi_label:
        return set(candidate.labels_above(flag_threshold)) == set(reference)
    return candidate.top_label in reference


class PeopleAgreement(BaseModel):
    """How often a model's answers match people's corrections of one policy's decisions."""

    model_config = ConfigDict(frozen=True)

    examples: int
    agreed: int

    @property
    def agreement(self) -> float | None:
        """Share of the corrected texts the model answers as the person did."""
        return self.agreed / self.examples if self.examples else None


def agreement_with_people(
    classifier: Classifier, examples: Sequence[CollectedExample], flag_threshold: float = 0.5
) -> dict[str, PeopleAgreement]:
    """``classifier``'s agreement with the person-labelled ``examples``, by policy.

    People's corrections arrive after the decisions they correct, so live shadow scoring cannot
    use them; this scores the kept (redacted) texts afresh. Examples labelled by an LLM are
    left out. Multi-label answers are the labels at or above ``flag_threshold``.
    """
    people = [example for example in examples if example.kind == "person"]
    if not people:
        return {}
    predictions = classifier.predict([example.text for example in people])
    counts: dict[str, tuple[int, int]] = {}
    for example, prediction in zip(people, predictions, strict=True):
        seen, agreed = counts.get(example.policy, (0, 0))
        hit = _agrees_at(prediction, example.labels, flag_threshold)
        counts[example.policy] = (seen + 1, agreed + int(hit))
    return {
        policy: PeopleAgreement(examples=seen, agreed=agreed)
        for policy, (seen, agreed) in counts.items()
    }


class ShadowScoring:
    """The cascade's shadow hook: scores each batch with the candidate and counts the figures.

    ``candidate`` returns the candidate's classifier, or ``None`` while there is none. Never
    changes a decision and never fails a batch: an error of the candidate or of the tally is
    logged (``shadow.failed``) and the batch goes on.
    """

    def __init__(
        self,
        candidate: Callable[[], Classifier | None],
        tally: ShadowTally,
        thresholds: ModelThresholds | None = None,
    ) -> None:
        self.candidate = candidate
        self.tally = tally
        self.thresholds = thresholds

    def observe_first_pass(
        self,
        messages: Sequence[Message],
        specs: Sequence[PolicySpec],
        indices: Sequence[int],
        results: list[Decision | LLMWork | None],
    ) -> None:
        """Score ``messages[i]`` for ``i`` in ``indices`` with the candidate, after the live step.

        Decisions the BERT step made are compared at once; LLM work gets the candidate's
        prediction in :attr:`LLMWork.shadow`, compared when the LLM step answers.
        """
        candidate = self.candidate()
        if candidate is None or not indices:
            return
        try:
            predictions = candidate.predict([messages[i].text for i in indices])
            counts: dict[str, ShadowFigures] = {}
            for i, prediction in zip(indices, predictions, strict=True):
                spec, result = specs[i], results[i]
                # The share it would send is judged with the thresholds it would be served with.
                served = (
                    self.thresholds.spec(spec, candidate.model_version)
                    if self.thresholds is not None
                    else spec
                )
                route = decide(prediction, served, UNLIMITED, messages[i].task)
                figures = ShadowFigures(scored=1, would_llm=int(route.target is Target.LLM))
                if isinstance(result, LLMWork):
                    results[i] = result.model_copy(update={"shadow": prediction})
                    figures = figures.plus(ShadowFigures(live_llm=1))
                elif isinstance(result, Decision):
                    agreed = agrees(prediction, result.labels, spec)
                    figures = figures.plus(ShadowFigures(compared=1, agreed=int(agreed)))
                counts[spec.name] = counts.get(spec.name, ShadowFigures()).plus(figures)
            self.tally.add(candidate.model_version, counts)
        except (TiergateError, ValueError, OSError) as exc:
            log.warning("shadow.failed", candidate=candidate.model_version, error=str(exc))

    def observe_answer(self, work: LLMWork, decision: Decision, spec: PolicySpec) -> None:
        """Compare the candidate's prediction carried in ``work`` with the LLM step's decision."""
        if work.shadow is None:
            return
        agreed = agrees(work.shadow, decision.labels, spec)
        try:
            self.tally.add(
                work.shadow.model_version,
                {spec.name: ShadowFigures(compared=1, agreed=int(agreed))},
            )
        except (TiergateError, OSError) as exc:
            log.warning("shadow.failed", candidate=work.shadow.model_version, error=str(exc))


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
