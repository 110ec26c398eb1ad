"""The shapes that travel: messages in, predictions between tiers, decisions out."""

from __future__ import annotations

import math
import uuid
from enum import StrEnum
from typing import Annotated, Any

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictStr,
    field_validator,
    model_validator,
)

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


def _is_json_scalar(value: Any) -> bool:
    """Whether ``value`` is a string, a finite number, a boolean or null."""
    if isinstance(value, float):
        return math.isfinite(value)
    return value is None or isinstance(value, str | int)


def _refuse_extra(_value: Any) -> Any:
    """Refuse an extra field left after the scalar ones moved into metadata."""
    raise ValueError(
        "an extra field must be a JSON scalar (a string, a finite number, a boolean or null);"
        " it travels in metadata"
    )


class Message(BaseModel):
    """One message to classify.

    ``text`` must be a non-empty string that is not only whitespace; it is never truncated.
    ``id`` is the producer's identifier (a random one is assigned when absent) and is echoed in
    the decision. ``metadata`` holds the producer's own JSON scalars, passed through untouched.

    Fields the schema does not define are the producer's own too: one holding a JSON scalar is
    moved into ``metadata`` (where a key of the same name, given explicitly, keeps its value),
    on every path (queue, HTTP, CLI); one holding a list or an object is refused, by name.
    """

    # Extra fields are allowed only so that the schema (OpenAPI included) types them as
    # scalars: scalar ones are moved into metadata first, and any left are refused by name.
    model_config = ConfigDict(extra="allow", frozen=True)
    __pydantic_extra__: dict[str, Annotated[JSONScalar, BeforeValidator(_refuse_extra)]] = Field(
        init=False
    )

    id: Annotated[StrictStr, Field(min_length=1, max_length=256)] = Field(default_factory=_new_id)
    text: StrictStr
    policy: Annotated[StrictStr, Field(min_length=1, max_length=128)] = "default"
    task: Task = Task.CLASSIFY
    metadata: dict[StrictStr, JSONScalar] = Field(default_factory=dict)

    @model_validator(mode="before")
    @classmethod
    def _extra_scalars_into_metadata(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        extra = {
            key: value
            for key, value in data.items()
            if isinstance(key, str) and key not in cls.model_fields and _is_json_scalar(value)
        }
        if not extra:
            return data
        kept = {key: value for key, value in data.items() if key not in extra}
        metadata = data.get("metadata", {})
        # Metadata that is not an object is the error to report; the scalars are not at fault.
        kept["metadata"] = {**extra, **metadata} if isinstance(metadata, dict) else metadata
        return kept

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
    tier's provisional answer and the decision is not cached. ``pending_llm``: the policy
    sends its LLM calls in batches (``llm.mode: batch``) and this message's is not answered yet;
    the label is the BERT tier's, and the final decision follows (on the stream, by webhook,
    at ``GET /v1/messages/{id}``) once its batch ends.
    """

    ANSWERED = "answered"
    DEFERRED = "deferred"
    PENDING_LLM = "pending_llm"


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


class LLMMode(StrEnum):
    """How an LLM call was made.

    ``online``: one request, answered at once. ``batch``: through the provider's batch API, at
    its discount.
    """

    ONLINE = "online"
    BATCH = "batch"


class LLMUsage(BaseModel):
    """What the LLM calls made for one decision cost, whatever their outcome.

    ``attempts`` counts the calls made (a repair attempt and each provider tried count; the
    SDKs' own retries do not); tokens are as the provider reported them, summed over the calls
    (a call that got no answer has none). ``input_tokens`` counts every input token, of which
    ``cached_input_tokens`` were read from the provider's prompt cache and
    ``cache_write_tokens`` written to it (Anthropic); dollars are those token counts at the
    price table's rates in settings, computed exactly and rounded once (0 when the model has
    no price), at the batch discount when ``mode`` is ``batch``. ``provider`` and ``model``
    are the ones that answered, or that failed last. A decision that reuses an answer paid for
    elsewhere (a cache hit, or an identical message in the same batch) carries
    :meth:`unpaid`: ``attempts == 0``, no tokens, no cost.
    """

    model_config = ConfigDict(frozen=True)

    provider: str
    model: str
    input_tokens: int = 0
    cached_input_tokens: int = 0
    cache_write_tokens: int = 0
    output_tokens: int = 0
    cost_usd: float = 0.0
    attempts: int = 1
    mode: LLMMode = LLMMode.ONLINE

    def unpaid(self) -> LLMUsage:
        """The same provider and model with no call, tokens or cost: for a reused answer."""
        return LLMUsage(provider=self.provider, model=self.model, attempts=0, mode=self.mode)


class Decision(BaseModel):
    """tiergate's answer to one message.

    ``label`` is the single answer (single-label policies); ``labels`` lists the flagged labels
    (multi-label policies; for single-label it holds ``label`` alone). ``scores`` gives every
    label's calibrated BERT probability. ``tier`` says which tier decided and ``reason`` why
    the policy routed the message as it did. When the policy wanted the LLM but the BERT tier
    answered, ``llm_skipped`` says why (and ``llm_error`` gives the detail of a failure).
    ``text`` is the generated text when generation was asked for. ``cached`` is true when the
    decision was served from the decision cache (``tier`` is then the tier that first decided
    it). ``llm`` is what the LLM calls made for this decision cost, failed ones included
    (``None`` when the LLM was never called for it; unpaid, with ``attempts == 0``, when it
    reuses an answer paid for elsewhere: see :class:`LLMUsage`), so summing ``llm.cost_usd``
    over decisions counts each call once. ``timings_ms`` holds the time spent per step, in
    milliseconds: ``cache``, ``bert``, ``llm``, and ``total`` for the whole decision; decisions
    from Celery workers add ``queued``, the wait in the queues (see
    :mod:`tiergate.workers.tasks.timings`).
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
    "LLMMode",
    "LLMSkip",
    "LLMUsage",
    "Message",
    "Prediction",
    "Reason",
    "Status",
    "Task",
    "Tier",
]
