"""The HTTP gateway in embedded mode: routes, limits, keys, async delivery, metrics, errors."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest
import redis
from fastapi.testclient import TestClient

from tiergate.gateway.http import create_app, hash_api_key
from tiergate.gateway.http.app import _build_embedded_cascade
from tiergate.policies.spec import (
    BudgetSpec,
    Escalation,
    LabelSpec,
    LLMSpec,
    PolicySpec,
    ProviderRef,
)
from tiergate.workers.budget import RedisBudgetLedger
from tiergate.workers.cache import RedisDecisionCache
from tiergate.workers.cascade import Cascade, PolicyBook
from tiergate.workers.ledger import LocalDecisionLedger, RedisDecisionLedger
from tiergate.workers.llm.breaker import LocalBreakerStore
from tiergate.workers.llm.testing import FakeLLMServer, Respond
from tiergate.workers.llm.tier import LLMTier
from tiergate.workers.schemas import Decision
from tiergate.workers.settings import Settings
from tiergate.workers.testing import FixedScoreClassifier

FILM_LABELS = ("negative", "positive", "synopsis")
TICKET_LABELS = ("billing", "bug")
ALL_KEY = "key-for-everything"
FILMS_KEY = "key-for-films-only"


def films(**changes) -> PolicySpec:
    """The films policy (escalates below 0.8): the default policy of these tests."""
    spec = PolicySpec(
        name="films",
        version="3",
        labels=[LabelSpec(name=n, description=f"a {n} snippet") for n in FILM_LABELS],
        escalation=Escalation(min_probability=0.8),
    )
    return spec.model_copy(update=changes)


def tickets() -> PolicySpec:
    """A second policy, over other labels, for per-key restrictions."""
    return PolicySpec(
        name="tickets", version="1", labels=[LabelSpec(name=n) for n in TICKET_LABELS]
    )


def scores_by_text(text: str) -> tuple[float, ...]:
    """'good' texts score positive, 'plot' texts synopsis, 'unsure' near ties, else negative."""
    if "unsure" in text:
        return (0.4, 0.35, 0.25)
    if "good" in text:
        return (0.05, 0.9, 0.05)
    if "plot" in text:
        return (0.05, 0.05, 0.9)
    return (0.9, 0.05, 0.05)


class GatedClassifier(FixedScoreClassifier):
    """A classifier that waits for ``gate`` before scoring texts containing 'slow'."""

    def __init__(self) -> None:
        super().__init__(FILM_LABELS, scores_by_text)
        self.gate = threading.Event()

    def predict(self, texts):
        """Score ``texts``, first waiting (bounded) for the gate when one of them is slow."""
        if any("slow" in t for t in texts):
            self.gate.wait(timeout=60)
        return super().predict(texts)


class ExplodingClassifier(FixedScoreClassifier):
    """A classifier that fails unexpectedly, with a message quoting the text."""

    def predict(self, texts):
        """Raise a RuntimeError naming the text (which must never reach the client)."""
        raise RuntimeError(f"boom while reading {texts[0]!r}")


def two_policy_cascade(classifier=None) -> Cascade:
    """A cascade serving films (default) and tickets over a fixed-score classifier."""
    scorer = classifier or FixedScoreClassifier(FILM_LABELS, scores_by_text)
    return Cascade(scorer, PolicyBook([films(), tickets()]))


def settings(tmp_path, **overrides) -> Settings:
    """Embedded-mode settings with no broker and no Redis unless given."""
    return Settings(data_dir=tmp_path, **overrides)


@pytest.fixture
def client(tmp_path) -> Iterator[TestClient]:
    """An open (no API keys) gateway over the two-policy cascade."""
    app = create_app(settings(tmp_path), cascade=two_policy_cascade())
    with TestClient(app, raise_server_exceptions=False) as test_client:
        yield test_client


def wait_for_decision(client: TestClient, message_id: str, **kwargs) -> dict:
    """GET /v1/messages/{id} until it is answered (bounded to a minute)."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        response = client.get(f"/v1/messages/{message_id}", **kwargs)
        if response.status_code == 200:
            return response.json()
        assert response.status_code == 202, response.text
        time.sleep(0.01)
    raise AssertionError(f"{message_id} was not answered in time")


def wait_until_ready(client: TestClient, timeout_s: float = 60.0) -> None:
    """GET /readyz until the warm-up prediction has run (bounded by ``timeout_s``)."""
    deadline = time.monotonic() + timeout_s
    while client.get("/readyz").status_code != 200:
        assert time.monotonic() < deadline, "the gateway never became ready"
        time.sleep(0.01)


def assert_no_internals(response) -> None:
    """An error body is JSON with a detail and request id, and no traceback text."""
    body = response.json()
    assert set(body) >= {"detail", "request_id"}
    assert body["request_id"] == response.headers["X-Request-ID"]
    assert "Traceback" not in response.text
    assert 'File "' not in response.text


# ---------------------------------------------------------------------------------- classify


def test_single_message_is_classified_with_its_id_echoed(client):
    """One message object in, one decision out, carrying the producer's id and metadata."""
    response = client.post(
        "/v1/classify", json={"id": "m-1", "text": "a good film", "metadata": {"shop": 7}}
    )
    assert response.status_code == 200
    (decision,) = response.json()["decisions"]
    assert decision["id"] == "m-1"
    assert (decision["label"], decision["tier"], decision["policy"]) == (
        "positive",
        "bert",
        "films",
    )
    assert decision["metadata"] == {"shop": 7}
    Decision.model_validate(decision)


def test_batch_is_answered_in_input_order_with_generated_ids(client):
    """A batch gets its decisions in input order; messages without an id get a fresh one."""
    texts = ["a good film", "the plot", "dull", "good again", "plot twist"]
    response = client.post(
        "/v1/classify",
        json={
            "messages": [
                {"text": t} if i % 2 else {"id": f"m{i}", "text": t} for i, t in enumerate(texts)
            ]
        },
    )
    assert response.status_code == 200
    decisions = response.json()["decisions"]
    assert [d["label"] for d in decisions] == [
        "positive",
        "synopsis",
        "negative",
        "positive",
        "synopsis",
    ]
    assert [decisions[i]["id"] for i in (0, 2, 4)] == ["m0", "m2", "m4"]
    generated = [decisions[i]["id"] for i in (1, 3)]
    assert all(len(i) == 32 for i in generated)
    assert len(set(generated)) == 2


def test_a_message_may_name_another_policy(client):
    """A message naming a loaded policy is decided under it."""
    response = client.post("/v1/classify", json={"text": "a good film", "policy": "tickets"})
    assert response.status_code == 200
    assert response.json()["decisions"][0]["policy"] == "tickets"


def test_unknown_policy_is_422_naming_it(client):
    """A message naming a policy that is not loaded is refused before any work."""
    response = client.post(
        "/v1/classify", json={"messages": [{"text": "ok"}, {"text": "x", "policy": "nope"}]}
    )
    assert response.status_code == 422
    body = response.json()
    assert body["policy"] == "nope"
    assert body["field"] == "messages[1].policy"
    assert "nope" in body["detail"]
    assert_no_internals(response)


@pytest.mark.parametrize(
    ("payload", "field"),
    [
        ({"messages": [{"text": "ok"}, {"id": "x"}]}, "messages[1].text"),
        ({"messages": [{"text": "ok", "colour": ["red"]}]}, "messages[0].colour"),
        ({"text": "   "}, "text"),
        ({"text": "ok", "task": "sing"}, "task"),
        ({"messages": []}, "messages"),
        ({"text": "ok", "metadata": {"a": [1]}}, "metadata.a"),
    ],
)
def test_validation_errors_are_422_naming_the_field(client, payload, field):
    """An invalid field is a 422 JSON body whose field path names it."""
    response = client.post("/v1/classify", json=payload)
    assert response.status_code == 422
    body = response.json()
    assert body["field"] == field
    assert field in [e["field"] for e in body["errors"]]
    assert field in body["detail"]
    assert_no_internals(response)


def test_extra_scalar_fields_travel_as_metadata(client):
    """Fields the message schema does not define, holding scalars, reach the decision's metadata.

    One message, a batch, and the asynchronous route alike; a ``metadata`` key of the same name
    wins over an extra field.
    """
    single = client.post(
        "/v1/classify", json={"id": "c3-bad-extra", "text": "A fine film.", "lang": "en"}
    )
    assert single.status_code == 200, single.text
    assert single.json()["decisions"][0]["metadata"] == {"lang": "en"}
    batch = client.post(
        "/v1/classify",
        json={
            "messages": [
                {"id": "b-1", "text": "a good film", "stars": 4, "metadata": {"stars": 5}},
                {"id": "b-2", "text": "dull", "reviewed": True, "editor": None},
            ]
        },
    )
    assert batch.status_code == 200, batch.text
    assert [d["metadata"] for d in batch.json()["decisions"]] == [
        {"stars": 5},
        {"reviewed": True, "editor": None},
    ]
    named_like_a_batch = client.post("/v1/classify", json={"text": "a good film", "messages": 3})
    assert named_like_a_batch.status_code == 200, named_like_a_batch.text
    assert named_like_a_batch.json()["decisions"][0]["metadata"] == {"messages": 3}
    accepted = client.post("/v1/messages", json={"id": "a-1", "text": "the plot", "shop": "s-9"})
    assert accepted.status_code == 202, accepted.text
    assert wait_for_decision(client, "a-1")["metadata"] == {"shop": "s-9"}


def test_an_extra_field_that_is_not_a_scalar_is_a_422_saying_so(client):
    """An extra field holding an object is refused, the error naming it and the rule."""
    response = client.post(
        "/v1/classify", json={"messages": [{"text": "ok"}, {"text": "ok", "tags": {"a": 1}}]}
    )
    assert response.status_code == 422
    body = response.json()
    assert body["field"] == "messages[1].tags"
    assert "must be a JSON scalar" in body["detail"]
    assert_no_internals(response)


def test_malformed_json_is_a_json_422(client):
    """A body that is not JSON gets a 422 JSON answer naming the body."""
    response = client.post(
        "/v1/classify", content=b'{"text": "ok",', headers={"Content-Type": "application/json"}
    )
    assert response.status_code == 422
    assert response.json()["field"] == "body"
    assert "malformed JSON" in response.json()["detail"]
    assert_no_internals(response)


def test_repeated_ids_in_one_request_are_refused(client):
    """Two messages with the same id in one request are a 422 naming the second."""
    response = client.post(
        "/v1/classify", json={"messages": [{"id": "a", "text": "x"}, {"id": "a", "text": "y"}]}
    )
    assert response.status_code == 422
    assert response.json()["field"] == "messages[1].id"


# ---------------------------------------------------------------------------------- limits


def test_body_over_the_limit_is_413_by_content_length(tmp_path):
    """A declared Content-Length over max_body_bytes is refused before the body is read."""
    app = create_app(settings(tmp_path, max_body_bytes=200), cascade=two_policy_cascade())
    with TestClient(app, raise_server_exceptions=False) as client:
        response = client.post("/v1/classify", json={"text": "x" * 500})
        assert response.status_code == 413
        assert "200 bytes" in response.json()["detail"]
        assert_no_internals(response)
        assert client.post("/v1/classify", json={"text": "x" * 50}).status_code == 200


def test_body_streaming_past_the_limit_is_413(tmp_path):
    """A chunked body with no Content-Length is cut off once it passes max_body_bytes."""
    app = create_app(settings(tmp_path, max_body_bytes=200), cascade=two_policy_cascade())

    def chunks():
        yield b'{"text": "'
        for _ in range(10):
            yield b"y" * 50
        yield b'"}'

    with TestClient(app, raise_server_exceptions=False) as client:
        response = client.post(
            "/v1/classify", content=chunks(), headers={"Content-Type": "application/json"}
        )
        assert "content-length" not in {k.lower() for k in response.request.headers}
        assert response.status_code == 413
        assert_no_internals(response)


def test_text_over_the_limit_is_413_naming_the_message(tmp_path):
    """A text longer than max_text_chars is refused, naming the message's index."""
    app = create_app(settings(tmp_path, max_text_chars=20), cascade=two_policy_cascade())
    with TestClient(app, raise_server_exceptions=False) as client:
        response = client.post(
            "/v1/classify", json={"messages": [{"text": "short"}, {"text": "z" * 21}]}
        )
        assert response.status_code == 413
        body = response.json()
        assert (body["index"], body["field"]) == (1, "messages[1].text")
        assert "message 1" in body["detail"]
        assert_no_internals(response)


def test_too_many_messages_is_413(tmp_path):
    """More messages than max_batch_messages in one request is refused."""
    app = create_app(settings(tmp_path, max_batch_messages=3), cascade=two_policy_cascade())
    with TestClient(app, raise_server_exceptions=False) as client:
        response = client.post(
            "/v1/classify", json={"messages": [{"text": f"t{i}"} for i in range(4)]}
        )
        assert response.status_code == 413
        assert response.json()["field"] == "messages"


# ---------------------------------------------------------------------------------- keys


@pytest.fixture
def keyed_client(tmp_path) -> Iterator[TestClient]:
    """A gateway with two keys: one for every policy, one for films only."""
    keys = {hash_api_key(ALL_KEY): ["*"], hash_api_key(FILMS_KEY): ["films"]}
    app = create_app(settings(tmp_path, api_keys=keys), cascade=two_policy_cascade())
    with TestClient(app, raise_server_exceptions=False) as test_client:
        yield test_client


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("post", "/v1/classify"),
        ("post", "/v1/messages"),
        ("get", "/v1/messages/some-id"),
        ("get", "/v1/policies"),
        ("post", "/v1/moderations"),
    ],
)
def test_routes_need_a_valid_key(keyed_client, method, path):
    """Without a key, or with an unknown one, every API route answers 401 JSON."""
    payload = {"json": {"text": "x"}} if method == "post" else {}
    missing = getattr(keyed_client, method)(path, **payload)
    wrong = getattr(keyed_client, method)(
        path, headers={"Authorization": "Bearer not-a-key"}, **payload
    )
    for response in (missing, wrong):
        assert response.status_code == 401
        assert response.headers["WWW-Authenticate"] == "Bearer"
        assert_no_internals(response)


def test_health_routes_need_no_key(keyed_client):
    """/healthz, /readyz and /metrics answer without a key."""
    assert keyed_client.get("/healthz").json() == {"status": "ok"}
    wait_until_ready(keyed_client)
    assert keyed_client.get("/metrics").status_code == 200


def test_key_works_as_bearer_token_or_header(keyed_client):
    """A valid key is accepted as a bearer token and as X-API-Key."""
    for headers in ({"Authorization": f"Bearer {ALL_KEY}"}, {"X-API-Key": ALL_KEY}):
        response = keyed_client.post("/v1/classify", json={"text": "good"}, headers=headers)
        assert response.status_code == 200


def test_key_limited_to_one_policy(keyed_client):
    """A films-only key may use films (also as 'default') but not tickets: 403 naming it."""
    headers = {"X-API-Key": FILMS_KEY}
    ok = keyed_client.post(
        "/v1/classify",
        json={"messages": [{"text": "a"}, {"text": "b", "policy": "films"}]},
        headers=headers,
    )
    assert ok.status_code == 200
    refused = keyed_client.post(
        "/v1/classify",
        json={"messages": [{"text": "a"}, {"text": "b", "policy": "tickets"}]},
        headers=headers,
    )
    assert refused.status_code == 403
    assert (refused.json()["policy"], refused.json()["index"]) == ("tickets", 1)
    assert_no_internals(refused)
    listed = keyed_client.get("/v1/policies", headers=headers).json()
    assert [p["name"] for p in listed["policies"]] == ["films"]


def test_key_cannot_read_decisions_of_policies_it_may_not_use(keyed_client):
    """A decision under tickets reads as unknown (404) to a films-only key."""
    everything = {"X-API-Key": ALL_KEY}
    response = keyed_client.post(
        "/v1/classify", json={"id": "t-1", "text": "x", "policy": "tickets"}, headers=everything
    )
    assert response.status_code == 200
    assert keyed_client.get("/v1/messages/t-1", headers=everything).status_code == 200
    hidden = keyed_client.get("/v1/messages/t-1", headers={"X-API-Key": FILMS_KEY})
    assert hidden.status_code == 404


def test_default_policy_resolves_before_the_key_check(tmp_path):
    """A key for tickets only may not send a message that leaves the policy as default."""
    keys = {hash_api_key("tickets-key"): ["tickets"]}
    app = create_app(settings(tmp_path, api_keys=keys), cascade=two_policy_cascade())
    with TestClient(app, raise_server_exceptions=False) as client:
        response = client.post(
            "/v1/classify", json={"text": "x"}, headers={"X-API-Key": "tickets-key"}
        )
        assert response.status_code == 403
        assert response.json()["policy"] == "films"


def test_a_key_in_clear_text_in_settings_is_refused(tmp_path):
    """api_keys must hold SHA-256 digests; a clear-text entry fails at start-up."""
    with pytest.raises(ValueError, match="SHA-256"):
        create_app(settings(tmp_path, api_keys={"plain": ["*"]}), cascade=two_policy_cascade())


# ---------------------------------------------------------------------------------- async


def test_accepted_messages_are_answered_and_read_back(client):
    """POST /v1/messages answers 202 with ids; each decision can then be read by id."""
    response = client.post(
        "/v1/messages", json={"messages": [{"id": "a-1", "text": "good"}, {"text": "plot"}]}
    )
    assert response.status_code == 202
    ids = response.json()["ids"]
    assert ids[0] == "a-1"
    assert len(ids) == 2
    labels = [wait_for_decision(client, message_id)["label"] for message_id in ids]
    assert labels == ["positive", "synopsis"]


def test_unknown_message_id_is_404(client):
    """Reading an id nobody sent is a 404 JSON body naming the id."""
    response = client.get("/v1/messages/never-sent")
    assert response.status_code == 404
    assert response.json()["id"] == "never-sent"
    assert_no_internals(response)


def test_pending_message_reads_as_202_until_answered(tmp_path):
    """While an accepted message is being decided, its id reads as pending."""
    classifier = GatedClassifier()
    app = create_app(settings(tmp_path), cascade=two_policy_cascade(classifier))
    with TestClient(app, raise_server_exceptions=False) as client:
        client.post("/v1/messages", json={"id": "p-1", "text": "slow film"})
        pending = client.get("/v1/messages/p-1")
        assert pending.status_code == 202
        assert pending.json() == {"id": "p-1", "status": "pending"}
        classifier.gate.set()
        assert wait_for_decision(client, "p-1")["label"] == "negative"


def test_classify_past_its_timeout_is_504_and_answered_later(tmp_path):
    """A classify that outlasts request_timeout_s is a 504 naming the ids, answered later."""
    classifier = GatedClassifier()
    app = create_app(
        settings(tmp_path, request_timeout_s=0.2), cascade=two_policy_cascade(classifier)
    )
    with TestClient(app, raise_server_exceptions=False) as client:
        response = client.post(
            "/v1/classify",
            json={"messages": [{"id": "s-1", "text": "slow"}, {"id": "s-2", "text": "good"}]},
        )
        assert response.status_code == 504
        assert response.json()["pending"] == ["s-1", "s-2"]
        assert_no_internals(response)
        classifier.gate.set()
        assert wait_for_decision(client, "s-2")["label"] == "positive"


def test_decisions_are_delivered_to_a_redis_ledger(tmp_path, redis_prefix):
    """With the Redis ledger, accepted messages' decisions land in Redis under their ids."""
    connection = redis.Redis(host="127.0.0.1", port=6379)
    ledger = RedisDecisionLedger(
        connection, prefix=redis_prefix, stream=f"{redis_prefix}:decisions"
    )
    app = create_app(settings(tmp_path), cascade=two_policy_cascade(), ledger=ledger)
    with TestClient(app, raise_server_exceptions=False) as client:
        client.post("/v1/messages", json={"id": "r-1", "text": "good"})
        assert wait_for_decision(client, "r-1")["label"] == "positive"
    stored = ledger.get_many(["r-1"])[0]
    assert stored is not None
    assert stored.label == "positive"
    assert connection.xlen(f"{redis_prefix}:decisions") == 1
    connection.close()


# ---------------------------------------------------------------------------------- batching


def wait_for_queued_messages(client: TestClient, at_least: int) -> None:
    """GET /metrics until the gateway queue holds ``at_least`` messages (bounded to a minute)."""
    deadline = time.monotonic() + 60
    while sample(client.get("/metrics").text, "tiergate_queue_depth", queue="gateway") < at_least:
        assert time.monotonic() < deadline, f"{at_least} messages never queued up"
        time.sleep(0.01)


def test_concurrent_requests_are_micro_batched(tmp_path):
    """Twenty concurrent classify requests reach the classifier in fewer calls."""
    scorer = GatedClassifier()
    app = create_app(
        settings(tmp_path, gateway_batch_window_ms=100, request_timeout_s=120),
        cascade=two_policy_cascade(scorer),
    )
    with TestClient(app, raise_server_exceptions=False) as client:
        wait_until_ready(client)  # the warm-up prediction is not counted below
        warm_up_calls = scorer.calls

        def classify(i: int) -> dict:
            text = "slow but good" if i % 2 else "slow plot"
            return client.post("/v1/classify", json={"id": f"c{i}", "text": text}).json()

        with ThreadPoolExecutor(max_workers=20) as pool:
            asked = [pool.submit(classify, i) for i in range(20)]
            # The batches in flight are held until requests queue up behind them: those
            # requests then share the next call, however the twenty happen to arrive.
            wait_for_queued_messages(client, at_least=5)
            scorer.gate.set()
            answers = [answer.result() for answer in asked]
    for i, answer in enumerate(answers):
        (decision,) = answer["decisions"]
        assert decision["id"] == f"c{i}"
        assert decision["label"] == ("positive" if i % 2 else "synopsis")
    assert scorer.calls - warm_up_calls < 20


# ---------------------------------------------------------------------------------- policies


def test_policies_lists_what_is_loaded(client):
    """GET /v1/policies gives each policy's name, version, labels, head and escalation."""
    body = client.get("/v1/policies").json()
    assert body["default"] == "films"
    first, second = body["policies"]
    assert (first["name"], first["version"], first["default"]) == ("films", "3", True)
    assert [label["name"] for label in first["labels"]] == list(FILM_LABELS)
    assert first["multi_label"] is False
    assert first["escalation"]["min_probability"] == 0.8
    assert (second["name"], second["default"]) == ("tickets", False)


# ---------------------------------------------------------------------------------- health


def test_readyz_reports_model_and_redis(tmp_path):
    """Ready with a loaded model and a reachable Redis; 503 naming Redis when it is not."""
    up = create_app(
        settings(tmp_path, redis_url="redis://127.0.0.1:6379/0"), cascade=two_policy_cascade()
    )
    with TestClient(up, raise_server_exceptions=False) as client:
        wait_until_ready(client)
        response = client.get("/readyz")
        assert response.status_code == 200
        assert response.json() == {"ready": True, "checks": {"model": True, "redis": True}}
    down = create_app(
        settings(tmp_path, redis_url="redis://127.0.0.1:1/0"),
        cascade=two_policy_cascade(),
        ledger=LocalDecisionLedger(),
    )
    with TestClient(down, raise_server_exceptions=False) as client:
        deadline = time.monotonic() + 60
        while "model" in (response := client.get("/readyz")).json().get("not_ready", []):
            assert time.monotonic() < deadline, "the warm-up prediction never ran"
            time.sleep(0.01)
        assert response.status_code == 503
        assert response.json()["not_ready"] == ["redis"]
        assert_no_internals(response)


def test_readyz_is_503_while_the_model_cannot_predict(tmp_path):
    """A model whose warm-up prediction fails keeps the gateway not ready."""
    broken = ExplodingClassifier(FILM_LABELS)
    app = create_app(settings(tmp_path), cascade=two_policy_cascade(broken))
    with TestClient(app, raise_server_exceptions=False) as client:
        response = client.get("/readyz")
        assert response.status_code == 503
        assert response.json()["not_ready"] == ["model"]


# ---------------------------------------------------------------------------------- errors


def test_unexpected_error_is_500_json_without_traceback_or_text(tmp_path):
    """An exception nothing handles is a 500 with the request id, no traceback, no text."""
    app = create_app(
        settings(tmp_path), cascade=two_policy_cascade(ExplodingClassifier(FILM_LABELS))
    )
    with TestClient(app, raise_server_exceptions=False) as client:
        response = client.post(
            "/v1/classify", json={"text": "secret words"}, headers={"X-Request-ID": "req-42"}
        )
    assert response.status_code == 500
    assert response.json() == {"detail": "internal error", "request_id": "req-42"}
    assert "secret" not in response.text
    assert_no_internals(response)


def test_request_id_is_echoed_or_generated(client):
    """A well-formed X-Request-ID is echoed; a missing or odd one is replaced by a fresh one."""
    echoed = client.get("/healthz", headers={"X-Request-ID": "abc-123"})
    assert echoed.headers["X-Request-ID"] == "abc-123"
    odd = client.get("/healthz", headers={"X-Request-ID": "no spaces\tallowed"})
    assert len(odd.headers["X-Request-ID"]) == 32
    fresh = client.get("/healthz")
    assert len(fresh.headers["X-Request-ID"]) == 32


def test_unknown_route_is_a_json_404(client):
    """Even a route that does not exist answers JSON."""
    response = client.get("/v2/whatever")
    assert response.status_code == 404
    assert_no_internals(response)


# ---------------------------------------------------------------------------------- metrics


def sample(text: str, name: str, **labels: str) -> float:
    """The value of one sample in Prometheus text format (0 when absent)."""
    for line in text.splitlines():
        if line.startswith("#") or not line.startswith(name):
            continue
        series, _, value = line.rpartition(" ")
        if series.split("{")[0] != name:
            continue
        if all(f'{k}="{v}"' in series for k, v in labels.items()):
            return float(value)
    return 0.0


def test_metrics_after_some_requests(tmp_path, redis_prefix):
    """Requests, decisions, cache hits, LLM tokens and cost, budget, queue and batch series."""
    connection = redis.Redis(host="127.0.0.1", port=6379)
    with FakeLLMServer() as server:
        server.script(Respond({"label": "positive"}))
        llm_settings = Settings(
            data_dir=tmp_path,
            openai_api_key="test-key",
            openai_base_url=server.openai_base_url,
            llm_timeout_s=10.0,
            llm_max_retries=0,
        )
        spec = films(
            llm=LLMSpec(providers=[ProviderRef(provider="openai", model="gpt-4o-mini")]),
            budget=BudgetSpec(calls_per_minute=100, usd_per_day=5.0),
        )
        cascade = Cascade(
            FixedScoreClassifier(FILM_LABELS, scores_by_text),
            PolicyBook([spec]),
            llm=LLMTier(llm_settings, breaker_store=LocalBreakerStore()),
            cache=RedisDecisionCache(connection, redis_prefix),
            # A clock stopped mid-minute: the call counted below stays in the minute read.
            budget=RedisBudgetLedger(connection, redis_prefix, clock=lambda: 1_700_000_010.0),
        )
        app = create_app(llm_settings, cascade=cascade)
        with TestClient(app, raise_server_exceptions=False) as client:
            first = client.post(
                "/v1/classify", json={"messages": [{"text": "good"}, {"text": "unsure"}]}
            )
            assert first.status_code == 200
            assert [d["tier"] for d in first.json()["decisions"]] == ["bert", "llm"]
            again = client.post("/v1/classify", json={"text": "unsure"})
            assert again.json()["decisions"][0]["cached"] is True
            client.post("/v1/classify", json={"text": "x", "policy": "nope"})
            text = client.get("/metrics").text
    connection.close()
    assert server.calls == 1
    assert sample(text, "tiergate_http_requests_total", route="/v1/classify", status="200") == 2
    assert sample(text, "tiergate_http_requests_total", route="/v1/classify", status="422") == 1
    assert sample(text, "tiergate_decisions_total", tier="bert", reason="confident") == 1
    assert sample(text, "tiergate_decisions_total", tier="llm", reason="low_confidence") == 2
    assert sample(text, "tiergate_cache_lookups_total", policy="films") == 3
    assert sample(text, "tiergate_cache_hits_total", policy="films") == 1
    assert sample(text, "tiergate_llm_tokens_total", direction="input", model="gpt-4o-mini") > 0
    assert sample(text, "tiergate_llm_tokens_total", direction="output") > 0
    assert sample(text, "tiergate_llm_cost_usd_total", provider="openai") > 0
    assert sample(text, "tiergate_decision_step_seconds_count", step="bert") == 2
    assert sample(text, "tiergate_decision_step_seconds_count", step="llm") == 1
    assert sample(text, "tiergate_decision_step_seconds_count", step="total") == 3
    assert sample(text, "tiergate_budget_calls_left", policy="films") == 99
    assert 4.9 < sample(text, "tiergate_budget_usd_left", policy="films") < 5.0
    assert "tiergate_queue_depth{" in text
    assert sample(text, "tiergate_batch_size_count") >= 2
    assert sample(text, "tiergate_batch_size_sum") >= 3


# ---------------------------------------------------------------------------------- real model


@pytest.mark.slow
def test_embedded_mode_builds_its_cascade_from_a_real_model(tmp_path, trained_model):
    """Without a cascade given, the app loads the ONNX model and its shipped policy."""
    app = create_app(
        Settings(data_dir=tmp_path, model_dir=trained_model.directory, intra_op_threads=1)
    )
    with TestClient(app, raise_server_exceptions=False) as client:
        wait_until_ready(client, timeout_s=60)
        examples = trained_model.test[:6]
        response = client.post(
            "/v1/classify",
            json={"messages": [{"id": f"t{i}", "text": e.text} for i, e in enumerate(examples)]},
        )
        assert response.status_code == 200
        decisions = response.json()["decisions"]
        assert [d["id"] for d in decisions] == [f"t{i}" for i in range(len(examples))]
        assert {d["policy"] for d in decisions} == {"rotten-tomatoes"}
        assert all(d["label"] in FILM_LABELS for d in decisions)
        assert all(d["model_version"] == decisions[0]["model_version"] for d in decisions)
        assert client.get("/v1/policies").json()["default"] == "rotten-tomatoes"


@pytest.mark.parametrize(
    ("threads", "parallel_steps", "slots", "threads_per_step"),
    [(2, None, 2, 1), (2, 1, 1, 2), (4, 2, 2, 2), (1, 3, 1, 1)],
)
def test_the_embedded_gateway_shares_its_threads_between_parallel_steps(
    tmp_path, trained_model, threads, parallel_steps, slots, threads_per_step
):
    """intra_op_threads become single-threaded steps side by side unless told otherwise."""
    cascade = _build_embedded_cascade(
        Settings(
            data_dir=tmp_path,
            model_dir=trained_model.directory,
            intra_op_threads=threads,
            gateway_parallel_steps=parallel_steps,
        )
    )
    classifier = cascade.classifier.for_batch()  # the model version serving now
    assert classifier.scheduler.slots == slots
    assert classifier.intra_op_threads == threads_per_step
    assert classifier.session.get_session_options().intra_op_num_threads == threads_per_step


def test_accepted_messages_that_cannot_be_answered_go_to_the_dead_letters(tmp_path):
    """When the cascade fails on accepted messages, each is kept as a dead letter with why."""
    ledger = LocalDecisionLedger()
    app = create_app(
        settings(tmp_path),
        cascade=two_policy_cascade(ExplodingClassifier(FILM_LABELS)),
        ledger=ledger,
    )
    with TestClient(app, raise_server_exceptions=False) as client:
        response = client.post("/v1/messages", json={"id": "doomed", "text": "x"})
        assert response.status_code == 202
        deadline = time.monotonic() + 60
        while not ledger.dead_letters() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert client.get("/v1/messages/doomed").status_code == 404
    (letter,) = ledger.dead_letters()
    assert letter["payload"]["id"] == "doomed"
    assert letter["reason"] == "RuntimeError"
    assert letter["kind"] == "unanswered"


# ---------------------------------------------------------------------------------- reused ids


def test_an_id_reused_for_another_text_is_409_naming_it(client):
    """The same id and text is answered again; another text under it is a 409 on both routes."""
    first = client.post("/v1/classify", json={"id": "http-1", "text": "a dull film"})
    assert first.status_code == 200
    again = client.post("/v1/classify", json={"id": "http-1", "text": "a dull film"})
    assert again.status_code == 200
    assert again.json()["decisions"][0]["label"] == "negative"
    reused = client.post(
        "/v1/classify", json={"id": "http-1", "text": "A delight from start to finish, good."}
    )
    assert reused.status_code == 409
    body = reused.json()
    assert (body["id"], body["field"], body["index"]) == ("http-1", "id", 0)
    assert "http-1" in body["detail"]
    assert_no_internals(reused)
    batch = client.post(
        "/v1/messages",
        json={"messages": [{"id": "fresh", "text": "good"}, {"id": "http-1", "text": "good"}]},
    )
    assert batch.status_code == 409
    assert (batch.json()["field"], batch.json()["index"]) == ("messages[1].id", 1)
    assert client.get("/v1/messages/http-1").json()["label"] == "negative"
    assert client.get("/v1/messages/fresh").status_code == 404  # nothing of the batch was taken


def test_a_second_text_in_flight_under_the_same_id_is_409_and_the_first_stands(tmp_path):
    """Two texts under one id, both accepted before either is answered: the first wins."""
    classifier = GatedClassifier()
    app = create_app(
        settings(tmp_path, gateway_batches_in_flight=1, request_timeout_s=120),
        cascade=two_policy_cascade(classifier),
    )
    with TestClient(app, raise_server_exceptions=False) as client:
        wait_until_ready(client)
        first = client.post("/v1/messages", json={"id": "race", "text": "slow but good"})
        assert first.status_code == 202
        with ThreadPoolExecutor(max_workers=1) as pool:
            second = pool.submit(
                client.post, "/v1/classify", json={"id": "race", "text": "slow and dull"}
            )
            wait_for_queued_messages(client, at_least=1)  # past the id check, behind the first
            classifier.gate.set()
            response = second.result()
        assert response.status_code == 409, response.text
        assert response.json()["id"] == "race"
        assert wait_for_decision(client, "race")["label"] == "positive"


def test_an_accepted_second_text_under_an_id_goes_to_the_dead_letters(tmp_path):
    """Accepted for later, a text that loses its id to another is dead-lettered as id_reused."""
    classifier = GatedClassifier()
    ledger = LocalDecisionLedger()
    app = create_app(
        settings(tmp_path, gateway_batches_in_flight=1),
        cascade=two_policy_cascade(classifier),
        ledger=ledger,
    )
    with TestClient(app, raise_server_exceptions=False) as client:
        wait_until_ready(client)
        for text in ("slow but good", "slow and dull"):
            accepted = client.post("/v1/messages", json={"id": "twice", "text": text})
            assert accepted.status_code == 202
        classifier.gate.set()
        assert wait_for_decision(client, "twice")["label"] == "positive"
        deadline = time.monotonic() + 60
        while not ledger.dead_letters() and time.monotonic() < deadline:
            time.sleep(0.01)
        metrics = client.get("/metrics").text
    (letter,) = ledger.dead_letters()
    assert letter["kind"] == "id_reused"
    assert (letter["payload"]["id"], letter["payload"]["text"]) == ("twice", "slow and dull")
    assert "'twice'" in letter["reason"]
    assert sample(metrics, "tiergate_dead_letters_total", reason="id_reused") == 1
