"""API keys over real HTTP: every route but the deliberately open ones needs one, keys stay secret.

Open on purpose (the docstring of ``tiergate.gateway.http.routes`` and the README): ``/healthz``
and ``/readyz`` (orchestrators probe them without credentials), ``/metrics`` (Prometheus scrapes
it; it holds counts and latencies, no texts, ids or keys), and FastAPI's schema and docs pages
(``/openapi.json``, ``/docs``, ``/docs/oauth2-redirect``, ``/redoc``: the API's shape, no data).
The route walk below reads the app's own route table, so a route added later without
``GrantDep`` fails it until it is listed here as open, on purpose.
"""

from __future__ import annotations

import hashlib
import re

import pytest
from fastapi.routing import iter_route_contexts

from tests.security.conftest import KEY_ALL, KEY_LIMITED, KEY_WRONG

OPEN_ROUTES = frozenset(
    {"/healthz", "/readyz", "/metrics", "/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc"}
)
# Corrections name no policy: they give the id of a decision made under one.
FEEDBACK = "/v1/feedback"
# Bodies that name the policy the limited key may not use, per route that takes a body.
NAMING_ANOTHER_POLICY = {
    "/v1/classify": {"text": "a comment", "policy": "strict-moderation"},
    "/v1/messages": {"text": "a comment", "policy": "strict-moderation"},
    "/v1/moderations": {"input": "a comment", "model": "strict-moderation"},
}


def route_requests(app):
    """(method, template, concrete path) of every route the app serves, included routers too."""
    for route in iter_route_contexts(app.routes):
        for method in sorted(route.methods or ()):
            if method == "HEAD":
                continue
            yield method, route.path, re.sub(r"\{[^}]+\}", "some-id", route.path)


def assert_json_error(response, status):
    """A JSON error body with a detail and the request id, and no traceback."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert body["detail"]
    assert body["request_id"] == response.headers["X-Request-ID"]
    assert "Traceback" not in response.text


def test_every_route_but_the_open_ones_refuses_a_missing_or_wrong_key(moderation_gateway):
    """Walking the app's routes: no key, a wrong key (bearer or header) or a junk body is a 401."""
    gateway = moderation_gateway
    walked = list(route_requests(gateway.app))
    assert {template for _, template, _ in walked} >= OPEN_ROUTES | {"/v1/classify"}
    for method, template, path in walked:
        attempts = [
            {"key": None},
            {"key": None, "json": {"unexpected": ["fields"]}},
            {"key": KEY_WRONG},
            {"key": None, "headers": {"Authorization": f"Bearer {KEY_WRONG}"}},
            {"key": None, "headers": {"Authorization": f"Basic {KEY_ALL}"}},
            {"key": ""},
        ]
        for attempt in attempts:
            response = gateway.request(method, path, **attempt)
            if template in OPEN_ROUTES:
                assert response.status_code != 401, (method, template, attempt)
                continue
            assert_json_error(response, 401)
            assert response.headers["WWW-Authenticate"] == "Bearer"
            assert response.json()["detail"] == "a valid API key is required"


def test_the_schema_declares_a_key_on_every_route_that_needs_one(moderation_gateway):
    """Each keyed operation in the served OpenAPI schema lists both ways of sending a key."""
    openapi = moderation_gateway.get("/openapi.json", key=None).json()
    keyed = {
        (method, template)
        for method, template, _ in route_requests(moderation_gateway.app)
        if template not in OPEN_ROUTES
    }
    documented = {
        (method.upper(), path)
        for path, operations in openapi["paths"].items()
        for method, operation in operations.items()
        if {"HTTPBearer", "APIKeyHeader"}
        <= {name for s in operation.get("security", []) for name in s}
    }
    assert keyed == documented


def test_a_valid_key_is_accepted_as_bearer_token_or_header(moderation_gateway):
    """The all-policies key works both ways on a keyed route."""
    for headers in ({"Authorization": f"Bearer {KEY_ALL}"}, {"X-API-Key": KEY_ALL}):
        response = moderation_gateway.get("/v1/policies", key=None, headers=headers)
        assert response.status_code == 200
        assert [p["name"] for p in response.json()["policies"]] == [
            "moderation",
            "strict-moderation",
        ]


def test_a_key_limited_to_one_policy_gets_403_on_every_route_that_names_another(
    moderation_gateway,
):
    """Every body route naming a policy the key may not use answers 403 naming that policy."""
    gateway = moderation_gateway
    posts = {template for method, template, _ in route_requests(gateway.app) if method == "POST"}
    assert posts == {*NAMING_ANOTHER_POLICY, FEEDBACK}, (
        "a new body route: add how it names a policy"
    )
    for path, body in NAMING_ANOTHER_POLICY.items():
        allowed = {**body, "policy" if "policy" in body else "model": "moderation"}
        assert gateway.post(path, json=allowed, key=KEY_LIMITED).status_code in {200, 202}
        refused = gateway.post(path, json=body, key=KEY_LIMITED)
        assert_json_error(refused, 403)
        assert refused.json()["policy"] == "strict-moderation"
        assert gateway.post(path, json=body, key=KEY_ALL).status_code in {200, 202}
    # A correction names its policy through the decision whose id it gives.
    for message_id, policy in (("fb-allowed", "moderation"), ("fb-refused", "strict-moderation")):
        made = gateway.post(
            "/v1/classify", json={"id": message_id, "text": "a comment", "policy": policy}
        )
        assert made.status_code == 200
    correct = {"labels": ["spam"]}
    allowed = gateway.post(FEEDBACK, json={"id": "fb-allowed", **correct}, key=KEY_LIMITED)
    assert allowed.status_code == 200, allowed.text
    refused = gateway.post(FEEDBACK, json={"id": "fb-refused", **correct}, key=KEY_LIMITED)
    assert_json_error(refused, 403)
    assert refused.json()["policy"] == "strict-moderation"
    assert (
        gateway.post(FEEDBACK, json={"id": "fb-refused", **correct}, key=KEY_ALL).status_code == 200
    )


def test_a_batch_with_one_forbidden_message_is_refused_whole(moderation_gateway):
    """A 403 on the second message means the first is not answered either."""
    gateway = moderation_gateway
    body = {
        "messages": [
            {"id": "ok-1", "text": "fine"},
            {"id": "no-2", "text": "not yours", "policy": "strict-moderation"},
        ]
    }
    refused = gateway.post("/v1/messages", json=body, key=KEY_LIMITED)
    assert_json_error(refused, 403)
    assert refused.json()["index"] == 1
    assert gateway.get("/v1/messages/ok-1", key=KEY_ALL).status_code == 404


def test_a_limited_key_sees_only_its_policies_and_their_decisions(moderation_gateway):
    """Policies and decisions under another policy are invisible: listed out, read as 404."""
    gateway = moderation_gateway
    listed = gateway.get("/v1/policies", key=KEY_LIMITED).json()
    assert [p["name"] for p in listed["policies"]] == ["moderation"]
    made = gateway.post(
        "/v1/classify", json={"id": "strict-1", "text": "hi", "policy": "strict-moderation"}
    )
    assert made.status_code == 200
    assert gateway.get("/v1/messages/strict-1", key=KEY_ALL).status_code == 200
    assert_json_error(gateway.get("/v1/messages/strict-1", key=KEY_LIMITED), 404)


def test_keys_never_reach_the_logs(moderation_gateway, captured_logs):
    """Valid, wrong and forbidden keys, as bearer or header: no raw key or key hash is logged."""
    gateway = moderation_gateway
    for key in (KEY_ALL, KEY_LIMITED, KEY_WRONG):
        for headers in ({"Authorization": f"Bearer {key}"}, {"X-API-Key": key}):
            gateway.post("/v1/classify", json={"text": "hello"}, key=None, headers=headers)
            gateway.post(
                "/v1/classify",
                json={"text": "hello", "policy": "strict-moderation"},
                key=None,
                headers=headers,
            )
            gateway.get("/v1/policies", key=None, headers=headers)
            gateway.post("/v1/classify", content=b"{not json", key=None, headers=headers)
    logged = captured_logs.text()
    events = captured_logs.events()
    # The capture works: the requests were logged, the valid keys by their 12-digit key id.
    assert sum(e["event"] == "http.request" for e in events) >= 24
    assert {e.get("key_id") for e in events} >= {
        hashlib.sha256(KEY_ALL.encode()).hexdigest()[:12],
        hashlib.sha256(KEY_LIMITED.encode()).hexdigest()[:12],
    }
    for key in (KEY_ALL, KEY_LIMITED, KEY_WRONG):
        digest = hashlib.sha256(key.encode()).hexdigest()
        assert key not in logged
        assert digest not in logged  # the stored form is a secret too
    # A wrong key may be a typo of a real one: not even its short id is logged.
    assert hashlib.sha256(KEY_WRONG.encode()).hexdigest()[:12] not in logged


@pytest.mark.parametrize("header", ["X-API-Key", "Authorization"])
def test_an_oversized_key_is_a_401_not_an_error(moderation_gateway, header):
    """A 4 KB key, or one of odd characters, is simply not a valid key."""
    for junk in ("k" * 4096, "ключ-🔑", "a\tb"):
        value = f"Bearer {junk}" if header == "Authorization" else junk
        headers = {header: value.encode()}  # as the raw UTF-8 bytes a client may send
        response = moderation_gateway.get("/v1/policies", key=None, headers=headers)
        assert_json_error(response, 401)
