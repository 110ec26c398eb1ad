"""The gateway's routes, and the dependencies they share: the gateway state, the caller's grant.

- ``POST /v1/classify``: one message, or ``{"messages": [...]}``; waits up to
  ``settings.request_timeout_s`` for the decisions (504 naming the ids still pending, which
  are answered later and can be read with ``GET /v1/messages/{id}``).
- ``POST /v1/messages``: accepts messages and answers 202 with their ids; the decisions are
  delivered to the decision ledger (and, in distributed mode, the decisions stream).
- Both answer a message whose id was answered before for the same text with that decision, and
  one whose id was answered for another text with 409 naming the id.
- ``GET /v1/messages/{id}``: a delivered decision; 202 while it is pending (when the gateway
  can tell), else 404. A batch-mode policy's message waiting for its batch answers 202 with
  its BERT decision (status ``pending_llm``); ``POST /v1/classify`` answers such a message at
  once with that decision, and the final one follows on the stream, by webhook and here.
- ``GET /v1/policies``: the loaded policies the caller's key may use.
- ``POST /v1/feedback``: a person's correction of a decision by its message id (for a policy
  that collects labels); it outranks the LLM's label and clears the cached decision.
- ``POST /v1/moderations``: the OpenAI moderation endpoint's request and response shape over
  a multi-label policy, so an existing moderation client switches by its base URL.
- ``GET /healthz`` (the process runs), ``GET /readyz`` (model loaded, Redis and broker
  reachable), ``GET /metrics`` (Prometheus); these three need no API key.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Annotated, Any

import anyio.to_thread
import structlog
from fastapi import APIRouter, Body, Depends, Path, Request, Security
from fastapi.responses import JSONResponse, Response
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer
from pydantic import ValidationError

from tiergate.gateway.http.auth import Grant, KeyRing
from tiergate.gateway.http.backends import Backend
from tiergate.gateway.http.errors import GatewayError
from tiergate.gateway.http.metrics import GatewayMetrics
from tiergate.gateway.http.types import (
    ERROR_TEXT,
    AcceptedResponse,
    ClassifyRequest,
    ClassifyResponse,
    ErrorResponse,
    FeedbackRequest,
    FeedbackResponse,
    FieldError,
    HealthResponse,
    MessageBatch,
    ModerationRequest,
    ModerationResponse,
    ModerationResult,
    PendingResponse,
    PoliciesResponse,
    PolicyInfo,
    ReadinessResponse,
    error_responses,
)
from tiergate.policies.spec import PolicySpec
from tiergate.workers.cascade import PolicyBook
from tiergate.workers.errors import LabelNotInPolicyError, UnknownDecisionError, UnknownPolicyError
from tiergate.workers.labels import Corrections
from tiergate.workers.ledger import IdReused
from tiergate.workers.schemas import Decision, Message, Status
from tiergate.workers.settings import Settings

# Where a message's field sits in a request body: (message index, field name) -> path.
FieldPath = Callable[[int, str], str]

# ---------------------------------------------------------------------------------- dependencies


@dataclass
class Gateway:
    """Everything the routes share, kept on ``app.state.tiergate``."""

    settings: Settings
    keyring: KeyRing
    backend: Backend
    metrics: GatewayMetrics
    corrections: Corrections = field(default_factory=lambda: Corrections(None, None))


# The dependencies are coroutines on purpose: FastAPI runs a plain function dependency in its
# thread pool, which would cost every request two thread hops for a few microseconds of work.
async def _gateway(request: Request) -> Gateway:
    gateway: Gateway = request.app.state.tiergate
    return gateway


_bearer = HTTPBearer(auto_error=False, description="An API key as a bearer token.")
_api_key = APIKeyHeader(name="X-API-Key", auto_error=False, description="An API key.")


async def _grant(
    gateway: Annotated[Gateway, Depends(_gateway)],
    bearer: Annotated[HTTPAuthorizationCredentials | None, Security(_bearer)],
    api_key: Annotated[str | None, Security(_api_key)],
) -> Grant:
    key = bearer.credentials if bearer is not None else api_key
    grant = gateway.keyring.grant_for(key)
    if grant is None:
        raise GatewayError(
            401, "a valid API key is required", headers={"WWW-Authenticate": "Bearer"}
        )
    if grant.key_id:
        structlog.contextvars.bind_contextvars(key_id=grant.key_id)
    return grant


GatewayDep = Annotated[Gateway, Depends(_gateway)]
GrantDep = Annotated[Grant, Depends(_grant)]


# ---------------------------------------------------------------------------------- routes

router = APIRouter()


@router.post(
    "/v1/classify",
    response_model=ClassifyResponse,
    responses=error_responses(401, 403, 409, 413, 422, 503, 504),
    summary="Classify messages and wait for the decisions",
)
async def classify(
    body: Annotated[ClassifyRequest, Body()], gateway: GatewayDep, grant: GrantDep
) -> ClassifyResponse:
    """Decide one message or a batch; the decisions come back in input order."""
    batched = isinstance(body, MessageBatch)
    messages = body.messages if isinstance(body, MessageBatch) else [body]
    await _admit(gateway, grant, messages, _classify_field(batched))
    await _refuse_reused_ids(gateway, messages, _classify_field(batched))
    decisions = await gateway.backend.decide(messages, gateway.settings.request_timeout_s)
    return ClassifyResponse(decisions=_all_answered(messages, decisions, _classify_field(batched)))


@router.post(
    "/v1/messages",
    status_code=202,
    response_model=AcceptedResponse,
    responses=error_responses(401, 403, 409, 413, 422, 503),
    summary="Accept messages to be answered asynchronously",
)
async def accept_messages(
    body: Annotated[ClassifyRequest, Body()], gateway: GatewayDep, grant: GrantDep
) -> AcceptedResponse:
    """Accept one message or a batch; read each decision later at /v1/messages/{id}."""
    batched = isinstance(body, MessageBatch)
    messages = body.messages if isinstance(body, MessageBatch) else [body]
    await _admit(gateway, grant, messages, _classify_field(batched))
    await _refuse_reused_ids(gateway, messages, _classify_field(batched))
    return AcceptedResponse(ids=await gateway.backend.accept(messages))


@router.get(
    "/v1/messages/{message_id}",
    response_model=Decision,
    responses={
        202: {"model": PendingResponse, "description": "Accepted and not answered yet."},
        **error_responses(401, 404, 422, 503),
    },
    summary="Read the decision of a message",
)
async def get_message(
    message_id: Annotated[str, Path(min_length=1, max_length=256)],
    gateway: GatewayDep,
    grant: GrantDep,
) -> Any:
    """The message's decision; 202 while it is pending; 404 when unknown to this caller."""
    found = await gateway.backend.lookup(message_id)
    if isinstance(found, PendingResponse):
        return JSONResponse(found.model_dump(mode="json"), status_code=202)
    # A decision under a policy the key may not use is reported as unknown, not forbidden,
    # so a key cannot probe which ids exist elsewhere.
    if found is None or not grant.allows(found.policy):
        raise GatewayError(404, "no decision for this message id", id=message_id)
    if found.status is Status.PENDING_LLM:  # its LLM answer is due in a batch
        return JSONResponse(found.model_dump(mode="json"), status_code=202)
    return found


@router.get(
    "/v1/policies",
    response_model=PoliciesResponse,
    responses=error_responses(401, 503),
    summary="List the loaded policies",
)
async def list_policies(gateway: GatewayDep, grant: GrantDep) -> PoliciesResponse:
    """The loaded policies this caller's key may use."""
    book = await gateway.backend.policy_book()
    default = book.default.name
    return PoliciesResponse(
        policies=[
            PolicyInfo(
                name=spec.name,
                version=spec.version,
                description=spec.description,
                labels=list(spec.labels),
                multi_label=spec.multi_label,
                escalation=spec.escalation,
                default=spec.name == default,
            )
            for spec in book
            if grant.allows(spec.name)
        ],
        default=default if grant.allows(default) else None,
    )


@router.post(
    "/v1/moderations",
    response_model=ModerationResponse,
    responses=error_responses(400, 401, 403, 413, 422, 503, 504),
    summary="Moderate texts (OpenAI moderation API shape)",
)
async def moderate(
    body: ModerationRequest, gateway: GatewayDep, grant: GrantDep
) -> ModerationResponse:
    """Flag each input under a multi-label policy, answering as OpenAI's moderation API does."""
    spec = _moderation_policy(await gateway.backend.policy_book(), body.model)
    inputs = [body.input] if isinstance(body.input, str) else body.input
    messages = []
    for index, text in enumerate(inputs):
        try:
            messages.append(Message(text=text, policy=spec.name))
        except ValidationError as exc:
            field = _moderation_field(isinstance(body.input, str))(index, "text")
            message = exc.errors()[0]["msg"]
            raise GatewayError(
                422,
                f"invalid request: {field}: {message}",
                field=field,
                index=index,
                errors=[FieldError(field=field, message=message, type="value_error")],
            ) from None
    await _admit(gateway, grant, messages, _moderation_field(isinstance(body.input, str)))
    decisions = _all_answered(
        messages,
        await gateway.backend.decide(messages, gateway.settings.request_timeout_s),
        _moderation_field(isinstance(body.input, str)),
    )
    return ModerationResponse(
        id=f"modr-{uuid.uuid4().hex}",
        model=spec.name,
        results=[_moderation_result(spec, d) for d in decisions],
    )


@router.post(
    "/v1/feedback",
    response_model=FeedbackResponse,
    responses=error_responses(401, 403, 404, 422, 503),
    summary="Correct a decision: a person's label for a message id",
)
async def feedback(body: FeedbackRequest, gateway: GatewayDep, grant: GrantDep) -> FeedbackResponse:
    """Store a person's label for a decision; the next identical text is decided afresh.

    404 for an id with no collected decision, 422 for a label outside its policy.
    """
    if (body.label is None) == (body.labels is None):
        raise GatewayError(422, "give either label or labels (one of them)", field="label")
    labels = [body.label] if body.label is not None else list(body.labels or [])
    corrections = gateway.corrections
    try:
        seen = await anyio.to_thread.run_sync(corrections.observation, body.id)
        if not grant.allows(seen.policy):
            raise GatewayError(
                403, f"this API key may not use policy {seen.policy!r}", policy=seen.policy
            )
        example = await anyio.to_thread.run_sync(corrections.correct, body.id, labels, body.source)
    except UnknownDecisionError as exc:
        raise GatewayError(404, str(exc), id=body.id) from None
    except LabelNotInPolicyError as exc:
        where = "label" if body.label is not None else "labels"
        raise GatewayError(422, str(exc), field=where, policy=exc.policy) from None
    return FeedbackResponse(
        id=body.id,
        policy=example.policy,
        policy_version=example.policy_version,
        model_version=example.model_version,
        labels=example.labels,
        source=example.source,
        time=example.time,
    )


@router.get("/healthz", response_model=HealthResponse, summary="Liveness")
async def healthz() -> HealthResponse:
    """200 whenever the process answers."""
    return HealthResponse()


@router.get(
    "/readyz",
    response_model=ReadinessResponse,
    responses={503: {"model": ErrorResponse, "description": ERROR_TEXT[503]}},
    summary="Readiness",
)
async def readyz(gateway: GatewayDep) -> Any:
    """200 when the model is loaded and Redis and the broker answer; else 503 naming them."""
    checks = await gateway.backend.readiness()
    not_ready = sorted(name for name, ok in checks.items() if not ok)
    if not_ready:
        raise GatewayError(503, f"not ready: {', '.join(not_ready)}", not_ready=not_ready)
    return ReadinessResponse(ready=True, checks=checks)


@router.get(
    "/metrics",
    response_class=Response,
    responses={200: {"content": {"text/plain": {}}, "description": "Prometheus text format."}},
    summary="Prometheus metrics",
)
async def metrics(gateway: GatewayDep) -> Response:
    """The gateway's metrics in Prometheus text format."""
    # Scrape-time gauges may read Redis or the broker: keep that off the event loop.
    body = await anyio.to_thread.run_sync(gateway.metrics.render)
    return Response(body, media_type=gateway.metrics.content_type)


# ---------------------------------------------------------------------------------- checks


def _classify_field(batched: bool) -> FieldPath:
    """Where a message's field sits in a /v1/classify or /v1/messages body."""
    if batched:
        return lambda index, name: f"messages[{index}].{name}"
    return lambda _index, name: name


def _moderation_field(single: bool) -> FieldPath:
    """Where an input's text sits in a /v1/moderations body."""
    if single:
        return lambda _index, _name: "input"
    return lambda index, _name: f"input[{index}]"


async def _admit(
    gateway: Gateway, grant: Grant, messages: Sequence[Message], field_of: FieldPath
) -> None:
    """Refuse a request over a limit, with a repeated id, or naming a policy it may not use.

    ``field_of(index, name)`` gives the path, in the request body, of a message's field.
    """
    settings = gateway.settings
    if len(messages) > settings.max_batch_messages:
        raise GatewayError(
            413,
            f"{len(messages)} messages in one request; the limit is {settings.max_batch_messages}",
            field="messages",
        )
    seen: set[str] = set()
    book = await gateway.backend.policy_book()
    for index, message in enumerate(messages):
        if len(message.text) > settings.max_text_chars:
            raise GatewayError(
                413,
                f"message {index}: text of {len(message.text)} characters is over the limit "
                f"of {settings.max_text_chars}",
                field=field_of(index, "text"),
                index=index,
            )
        if message.id in seen:
            raise GatewayError(
                422,
                f"message {index}: id repeats an earlier message's",
                field=field_of(index, "id"),
                index=index,
            )
        seen.add(message.id)
        try:
            spec = book.get(message.policy)
        except UnknownPolicyError as exc:
            raise GatewayError(
                422, str(exc), field=field_of(index, "policy"), index=index, policy=message.policy
            ) from None
        if not grant.allows(spec.name):
            raise GatewayError(
                403,
                f"message {index}: this API key may not use policy {spec.name!r}",
                index=index,
                policy=spec.name,
            )


async def _refuse_reused_ids(
    gateway: Gateway, messages: Sequence[Message], field_of: FieldPath
) -> None:
    """Refuse a request holding a message whose id was answered before for another text."""
    reused = await gateway.backend.reused_ids(list(messages))
    if reused:
        raise _id_reused(messages, reused[0], field_of)


def _id_reused(messages: Sequence[Message], index: int, field_of: FieldPath) -> GatewayError:
    """The 409 for message ``index``, whose id was answered for another text."""
    message_id = messages[index].id
    return GatewayError(
        409,
        f"message {index}: id {message_id!r} was answered before for another text; "
        "send this text under a new id",
        field=field_of(index, "id"),
        index=index,
        id=message_id,
    )


def _all_answered(
    messages: Sequence[Message],
    decisions: Sequence[Decision | IdReused | None],
    field_of: FieldPath,
) -> list[Decision]:
    """The decisions, or the error a request gets when some are missing.

    409 for a message whose id was answered meanwhile for another text; else 504 naming the
    messages still being answered.
    """
    for index, found in enumerate(decisions):
        if isinstance(found, IdReused):
            raise _id_reused(messages, index, field_of)
    answered = [d for d in decisions if isinstance(d, Decision)]
    if len(answered) == len(messages):
        return answered
    pending = [m.id for m, d in zip(messages, decisions, strict=True) if d is None]
    raise GatewayError(
        504,
        f"{len(pending)} of {len(messages)} decisions were not ready in time; "
        "read them later at /v1/messages/{id}",
        pending=pending,
    )


def _moderation_policy(book: PolicyBook, model: str | None) -> PolicySpec:
    if model is None:
        for spec in book:
            if spec.multi_label:
                return spec
        raise GatewayError(400, "no multi-label policy is loaded to moderate with", field="model")
    try:
        spec = book.get(model)
    except UnknownPolicyError as exc:
        raise GatewayError(422, str(exc), field="model", policy=model) from None
    if not spec.multi_label:
        raise GatewayError(
            400, f"policy {spec.name!r} is not multi-label", field="model", policy=spec.name
        )
    return spec


def _moderation_result(spec: PolicySpec, decision: Decision) -> ModerationResult:
    flagged = set(decision.labels)
    return ModerationResult(
        flagged=bool(flagged),
        categories={label: label in flagged for label in spec.label_names},
        category_scores={label: decision.scores.get(label, 0.0) for label in spec.label_names},
        category_applied_input_types={label: ["text"] for label in spec.label_names},
    )
