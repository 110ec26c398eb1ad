"""The shapes that travel: messages in, predictions between tiers, decisions out."""

from __future__ import annotations

import uuid
from enum import StrEnum
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, StrictStr, field_validator, model_validator

JSONScalar = StrictStr | int | float | bool | None


class Task(StrEnum):
    """What the producer asks for: a label, or a label plus generated text."""

    CLASSIFY = "classify"
    REPLY = "reply"
    SUMMARY = "summary"
    EXPLAIN = "explain"


class Tier(StrEnum):
    """The tier that decided a message."""

    BERT = "bert"
    LLM = "llm"


class Reason(StrEnum):
    """Why the deciding tier decided.

    ``BERT_ONLY`` means no policy was applied: the BERT tier's top label is the answer.
    """

    BERT_ONLY = "bert_only"


def _new_id() -> str:
    return uuid.uuid4().hex


class Message(BaseModel):
    """One message to classify.

    ``text`` must be a non-empty string that is not only whitespace; it is never truncated.
    ``id`` is the producer's identifier (a random one is assigned when absent) and is echoed in
    the decision. ``metadata`` holds the producer's own JSON scalars, passed through untouched.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: Annotated[StrictStr, Field(min_length=1, max_length=256)] = Field(default_factory=_new_id)
    text: StrictStr
    policy: Annotated[StrictStr, Field(min_length=1, max_length=128)] = "default"
    task: Task = Task.CLASSIFY
    metadata: dict[StrictStr, JSONScalar] = Field(default_factory=dict)

    @field_validator("text")
    @classmethod
    def _text_has_content(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("text is empty or only whitespace")
        if any(0xD800 <= ord(ch) <= 0xDFFF for ch in value):
            raise ValueError("text is not valid UTF-8")
        return value


class Prediction(BaseModel):
    """What the BERT tier says about one text: calibrated probabilities over its label set.

    ``probabilities[i]`` belongs to ``labels[i]``. For a single-label head they sum to 1 (a
    temperature-scaled softmax, averaged over windows); for a multi-label head each is an
    independent temperature-scaled sigmoid (the maximum over windows). ``chunks`` is the number
    of windows the text was split into (1 when it fit the model's window).
    """

    model_config = ConfigDict(frozen=True)

    labels: tuple[str, ...]
    probabilities: tuple[float, ...]
    multi_label: bool
    chunks: int = Field(ge=1)
    model_version: str

    @model_validator(mode="after")
    def _probabilities_match_labels(self) -> Prediction:
        if len(self.labels) != len(self.probabilities) or not self.labels:
            raise ValueError("labels and probabilities must be non-empty and of equal length")
        if not all(0.0 <= p <= 1.0 for p in self.probabilities):
            raise ValueError("probabilities must lie in [0, 1]")
        return self

    @property
    def top_label(self) -> str:
        """The label with the highest probability."""
        return self.labels[self._ranked[0]]

    @property
    def top_probability(self) -> float:
        """The highest calibrated probability."""
        return self.probabilities[self._ranked[0]]

    @property
    def margin(self) -> float:
        """Top probability minus the runner-up's (1.0 when there is a single label)."""
        ranked = self._ranked
        if len(ranked) < 2:
            return 1.0
        return self.probabilities[ranked[0]] - self.probabilities[ranked[1]]

    def scores(self) -> dict[str, float]:
        """Probabilities keyed by label."""
        return dict(zip(self.labels, self.probabilities, strict=True))

    def labels_above(self, threshold: float) -> list[str]:
        """Labels whose probability is at least ``threshold`` (multi-label flags)."""
        return [
            label
            for label, p in zip(self.labels, self.probabilities, strict=True)
            if p >= threshold
        ]

    @property
    def _ranked(self) -> list[int]:
        return sorted(range(len(self.probabilities)), key=lambda i: -self.probabilities[i])


class Decision(BaseModel):
    """tiergate's answer to one message.

    ``label`` is the single answer (single-label policies); ``labels`` lists the flagged labels
    (multi-label policies; for single-label it holds ``label`` alone). ``scores`` gives every
    label's calibrated probability. ``tier`` says which tier decided and ``reason`` why.
    ``timings_ms`` holds the time spent per step (for example ``bert``), in milliseconds.
    """

    model_config = ConfigDict(frozen=True)

    id: str
    label: str | None
    labels: list[str]
    scores: dict[str, float]
    tier: Tier
    reason: Reason
    chunks: int
    model_version: str
    policy: str
    policy_version: str | None = None
    timings_ms: dict[str, float] = Field(default_factory=dict)
    metadata: dict[str, Any] = Field(default_factory=dict)
