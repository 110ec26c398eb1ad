"""The shapes that travel: messages in, predictions between tiers, decisions out."""

from __future__ import annotations

import uuid
from enum import StrEnum
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, StrictStr, field_validator

from tiergate.policies.prediction import Prediction
from tiergate.policies.routing import Reason
from tiergate.policies.spec import Task

# JSON has no NaN or infinity: a producer's metadata must survive a round trip through JSON.
JSONScalar = StrictStr | int | Annotated[float, Field(allow_inf_nan=False)] | bool | None


def _new_id() -> str:
    return uuid.uuid4().hex


def _has_surrogates(value: str) -> bool:
    """Whether ``value`` holds a lone surrogate: bytes that were not UTF-8, or a bad escape."""
    return any(0xD800 <= ord(ch) <= 0xDFFF for ch in value)


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
        if _has_surrogates(value):
            raise ValueError("text is not valid UTF-8")
        return value

    @field_validator("metadata")
    @classmethod
    def _metadata_is_valid_unicode(cls, value: dict[str, Any]) -> dict[str, Any]:
        # A lone surrogate (from a "\ud800" escape) cannot be written as UTF-8 again: the
        # decision carrying it could be neither stored nor sent.
        for key, item in value.items():
            if _has_surrogates(key) or (isinstance(item, str) and _has_surrogates(item)):
                raise ValueError("a metadata key or value is not valid UTF-8")
        return value


class Tier(StrEnum):
    """The tier that decided a message."""

    BERT = "bert"
    LLM = "llm"


class Status(StrEnum):
    """Whether a decision is final.

    ``answered``: the decision is final. ``deferred``: the policy's budget was spent and its
    fallback is deferral, so the message must be submitted again later; the label is the BERT
    tier's provisional answer and the decision is not cached.
    """

    ANSWERED = "answered"
    DEFERRED = "deferred"


class LLMSkip(StrEnum):
    """Why a message the policy sent to the LLM was answered by the BERT tier instead.

    ``no_provider``: the policy lists no provider, or none has an API key configured.
    ``budget_exhausted``: the policy's LLM budget is spent (its fallback is the BERT answer).
    ``llm_unavailable``: every provider failed (errors, timeouts, an open circuit breaker).
    ``invalid_answer``: the LLM's answer stayed invalid after one repair attempt, or it refused.
    """

    NO_PROVIDER = "no_provider"
    BUDGET_EXHAUSTED = "budget_exhausted"
    LLM_UNAVAILABLE = "llm_unavailable"
    INVALID_ANSWER = "invalid_answer"


class LLMUsage(BaseModel):
    """What one LLM answer cost.

    Tokens as the provider reported them, summed over attempts, and dollars from the price
    table in settings (0 when the model has no price).
    """

    model_config = ConfigDict(frozen=True)

    provider: str
    model: str
    input_tokens: int = 0
    output_tokens: int = 0
    cost_usd: float = 0.0
    attempts: int = 1


class Decision(BaseModel):
    """tiergate's answer to one message.

    ``label`` is the single answer (single-label policies); ``labels`` lists the flagged labels
    (multi-label policies; for single-label it holds ``label`` alone). ``scores`` gives every
    label's calibrated BERT probability. ``tier`` says which tier decided and ``reason`` why
    the policy routed the message as it did. When the policy wanted the LLM but the BERT tier
    answered, ``llm_skipped`` says why (and ``llm_error`` gives the detail of a failure).
    ``text`` is the generated text when generation was asked for. ``cached`` is true when the
    decision was served from the decision cache (``tier`` is then the tier that first decided
    it). ``timings_ms`` holds the time spent per step, in milliseconds.
    """

    model_config = ConfigDict(frozen=True)

    id: str
    status: Status = Status.ANSWERED
    label: str | None
    labels: list[str]
    scores: dict[str, float]
    tier: Tier
    reason: Reason
    llm_skipped: LLMSkip | None = None
    llm_error: str | None = None
    text: str | None = None
    cached: bool = False
    chunks: int
    model_version: str
    policy: str
    policy_version: str | None = None
    task: Task = Task.CLASSIFY
    llm: LLMUsage | None = None
    timings_ms: dict[str, float] = Field(default_factory=dict)
    metadata: dict[str, Any] = Field(default_factory=dict)


__all__ = [
    "Decision",
    "LLMSkip",
    "LLMUsage",
    "Message",
    "Prediction",
    "Reason",
    "Status",
    "Task",
    "Tier",
]
