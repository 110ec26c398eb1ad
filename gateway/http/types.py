"""The HTTP gateway's wire types: request and response bodies, and the OpenAPI error entries."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Discriminator, Field, StrictStr, Tag

from tiergate.policies.spec import Escalation, LabelSpec
from tiergate.workers.schemas import Decision, Message


class MessageBatch(BaseModel):
    """Several messages in one request (at most ``settings.max_batch_messages``)."""

    model_config = ConfigDict(extra="forbid")

    messages: Annotated[list[Message], Field(min_length=1)]


def _classify_shape(value: Any) -> str:
    # A body with a text is one message: a "messages" beside it is an extra field of its own.
    if isinstance(value, dict) and "messages" in value and "text" not in value:
        return "many-messages"
    if isinstance(value, MessageBatch):
        return "many-messages"
    return "one-message"


ClassifyRequest = Annotated[
    Annotated[Message, Tag("one-message")] | Annotated[MessageBatch, Tag("many-messages")],
    Discriminator(_classify_shape),
]


class ClassifyResponse(BaseModel):
    """The decisions of a request's messages, in input order."""

    decisions: list[Decision]


class AcceptedResponse(BaseModel):
    """The ids of accepted messages, in input order; read each later at /v1/messages/{id}."""

    ids: list[str]


class PendingResponse(BaseModel):
    """A message that was accepted and is not answered yet."""

    id: str
    status: Literal["pending"] = "pending"


class PolicyInfo(BaseModel):
    """One loaded policy as clients see it: labels, head type and escalation rules."""

    name: str
    version: str
    description: str
    labels: list[LabelSpec]
    multi_label: bool
    escalation: Escalation
    default: bool = Field(description="Whether messages naming policy 'default' get this one.")


class PoliciesResponse(BaseModel):
    """The policies the caller may use; ``default`` is the default policy's name, if usable."""

    policies: list[PolicyInfo]
    default: str | None


def _moderation_shape(value: Any) -> str:
    return "one-input" if isinstance(value, str) else "many-inputs"


class ModerationRequest(BaseModel):
    """OpenAI's moderation request: ``input`` text(s); ``model`` names a multi-label policy.

    Without ``model`` the first loaded multi-label policy answers.
    """

    input: Annotated[
        Annotated[str, Tag("one-input")]
        | Annotated[list[str], Tag("many-inputs"), Field(min_length=1)],
        Discriminator(_moderation_shape),
    ]
    # Constrained like Message.policy: the length bound also makes pydantic refuse a lone
    # surrogate, which an error echoing the name could not encode (a 500).
    model: Annotated[StrictStr, Field(min_length=1, max_length=128)] | None = None


class ModerationResult(BaseModel):
    """One input's verdict: flagged labels, every label's score, in OpenAI's shape."""

    flagged: bool
    categories: dict[str, bool]
    category_scores: dict[str, float]
    category_applied_input_types: dict[str, list[Literal["text"]]]


class ModerationResponse(BaseModel):
    """OpenAI's moderation response: ``model`` is the policy that answered."""

    id: str
    model: str
    results: list[ModerationResult]


class FeedbackRequest(BaseModel):
    """A person's correction of one decision, by its message ``id``.

    Give ``label`` (the right label) or ``labels`` (a multi-label policy's flags; ``[]`` when
    none applies), not both; ``source`` says who corrects (an agent's or moderator's id).
    """

    model_config = ConfigDict(extra="forbid")

    id: Annotated[StrictStr, Field(min_length=1, max_length=256)]
    label: Annotated[StrictStr, Field(min_length=1, max_length=128)] | None = None
    labels: (
        Annotated[
            list[Annotated[StrictStr, Field(min_length=1, max_length=128)]], Field(max_length=1000)
        ]
        | None
    ) = None
    source: Annotated[StrictStr, Field(min_length=1, max_length=256)] | None = None


class FeedbackResponse(BaseModel):
    """The corrected example as now stored (its text is not echoed).

    ``labels`` are the person's; ``source`` is ``person:<source>``; ``time`` is when the
    correction was stored (unix seconds). The cached decision of the text was deleted, so the
    next identical message is decided afresh.
    """

    id: str
    policy: str
    policy_version: str | None
    model_version: str
    labels: list[str]
    source: str
    time: float


class HealthResponse(BaseModel):
    """The process is up."""

    status: Literal["ok"] = "ok"


class ReadinessResponse(BaseModel):
    """Whether every dependency is ready; ``checks`` names each and its state."""

    ready: bool
    checks: dict[str, bool]


class FieldError(BaseModel):
    """One invalid field: its path (``messages[0].text``), what is wrong, the error type."""

    field: str
    message: str
    type: str


class ErrorResponse(BaseModel):
    """Every error response's body.

    ``detail`` says what went wrong; ``request_id`` matches the ``X-Request-ID`` header and the
    logs. Depending on the error: ``errors`` (422, each invalid field), ``field`` (the field
    at fault), ``index`` (the message at fault), ``policy`` (an unknown or forbidden policy),
    ``id`` (an unknown id, or 409: one reused for another text), ``pending`` (504: ids still
    being answered), ``not_ready`` (503: dependencies that are not ready).
    """

    detail: str
    request_id: str
    errors: list[FieldError] | None = None
    field: str | None = None
    index: int | None = None
    policy: str | None = None
    id: str | None = None
    pending: list[str] | None = None
    not_ready: list[str] | None = None


# What each error status means, as the OpenAPI schema describes it.
ERROR_TEXT = {
    400: "The request cannot be served as asked (for example no multi-label policy).",
    401: "No valid API key (Authorization: Bearer <key>, or X-API-Key).",
    403: "The API key may not use a policy the request names.",
    404: "No such message id.",
    409: "A message id was answered before for another text; send a new id.",
    413: "The body, a text, or the number of messages is over its limit.",
    422: "A field is invalid, the JSON is malformed, or a policy is unknown.",
    503: "A dependency (model, Redis, broker) is unavailable; retry later.",
    504: "The decisions were not ready in time; they are still being answered.",
}


def error_responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    """A route's OpenAPI ``responses`` for the error statuses ``codes``: body and meaning."""
    return {code: {"model": ErrorResponse, "description": ERROR_TEXT[code]} for code in codes}
