"""The served OpenAPI schema is accurate: routes, error responses, and real bodies validate."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient

from tiergate.gateway.http import create_app, hash_api_key
from tiergate.policies.spec import LabelSpec, PolicySpec, example_policy
from tiergate.workers.cascade import Cascade, PolicyBook
from tiergate.workers.settings import Settings
from tiergate.workers.testing import FixedScoreClassifier

KEY = "schema-key"
MODERATION = example_policy("moderation")


def check(schema: dict[str, Any], value: Any, root: dict[str, Any], path: str = "$") -> None:
    """Assert that ``value`` satisfies the JSON Schema subset OpenAPI 3.1 uses here."""
    if "$ref" in schema:
        name = schema["$ref"].removeprefix("#/components/schemas/")
        check(root["components"]["schemas"][name], value, root, path)
        return
    check_combinators(schema, value, root, path)
    if "enum" in schema:
        assert value in schema["enum"], f"{path}: {value!r} not in {schema['enum']}"
    if "const" in schema:
        assert value == schema["const"], f"{path}: {value!r} != {schema['const']!r}"
    kind = schema.get("type")
    if kind is not None:
        kinds = kind if isinstance(kind, list) else [kind]
        assert any(fits(k, value) for k in kinds), f"{path}: {value!r} is not {kinds}"
    if isinstance(value, dict):
        check_object(schema, value, root, path)
    if isinstance(value, list) and "items" in schema:
        for index, item in enumerate(value):
            check(schema["items"], item, root, f"{path}[{index}]")


def check_combinators(schema: dict[str, Any], value: Any, root: dict, path: str) -> None:
    """Check ``anyOf`` (one option fits), ``oneOf`` (exactly one) and ``allOf`` (all)."""
    for key in ("anyOf", "oneOf"):
        if key in schema:
            failures = []
            for option in schema[key]:
                try:
                    check(option, value, root, path)
                except AssertionError as exc:
                    failures.append(str(exc))
            matched = len(schema[key]) - len(failures)
            assert matched >= 1, f"{path}: no {key} option fits: {failures}"
            if key == "oneOf":
                assert matched == 1, f"{path}: {matched} oneOf options fit"
    for option in schema.get("allOf", []):
        check(option, value, root, path)


def check_object(schema: dict[str, Any], value: dict, root: dict, path: str) -> None:
    """Check required, declared and additional properties of an object."""
    for name in schema.get("required", []):
        assert name in value, f"{path}: missing required {name!r}"
    properties = schema.get("properties", {})
    extra = schema.get("additionalProperties", True)
    for name, item in value.items():
        if name in properties:
            check(properties[name], item, root, f"{path}.{name}")
        elif extra is False:
            raise AssertionError(f"{path}: undeclared property {name!r}")
        elif isinstance(extra, dict):
            check(extra, item, root, f"{path}.{name}")


def fits(kind: str, value: Any) -> bool:
    """Whether ``value`` is of JSON type ``kind``."""
    number = isinstance(value, int | float) and not isinstance(value, bool)
    return {
        "object": isinstance(value, dict),
        "array": isinstance(value, list),
        "string": isinstance(value, str),
        "integer": isinstance(value, int) and not isinstance(value, bool),
        "number": number,
        "boolean": isinstance(value, bool),
        "null": value is None,
    }[kind]


def assert_documented(openapi: dict, method: str, path: str, response) -> None:
    """The response's status is declared for the route, and its body fits that schema."""
    declared = openapi["paths"][path][method]["responses"]
    status = str(response.status_code)
    assert status in declared, f"{method.upper()} {path} does not declare {status}"
    schema = declared[status]["content"]["application/json"]["schema"]
    check(schema, response.json(), openapi)


@pytest.fixture
def client(tmp_path) -> Iterator[TestClient]:
    """A keyed gateway serving moderation (default) and a single-label films policy."""
    films = PolicySpec(name="films", version="1", labels=[LabelSpec(name="negative")])
    scorer = FixedScoreClassifier(MODERATION.label_names, multi_label=True, default=[0.01] * 13)
    settings = Settings(data_dir=tmp_path, api_keys={hash_api_key(KEY): ["*"]}, max_text_chars=1000)
    app = create_app(settings, cascade=Cascade(scorer, PolicyBook([MODERATION, films])))
    with TestClient(app, raise_server_exceptions=False, headers={"X-API-Key": KEY}) as test:
        yield test


def test_every_route_is_in_the_schema_with_its_error_responses(client):
    """Each route is documented with its method and the error statuses it can answer."""
    openapi = client.get("/openapi.json").json()
    expected = {
        ("/v1/classify", "post"): {"200", "401", "403", "409", "413", "422", "504"},
        ("/v1/messages", "post"): {"202", "401", "403", "409", "413", "422"},
        ("/v1/messages/{message_id}", "get"): {"200", "202", "401", "404"},
        ("/v1/policies", "get"): {"200", "401"},
        ("/v1/moderations", "post"): {"200", "400", "401", "403", "413", "422", "504"},
        ("/healthz", "get"): {"200"},
        ("/readyz", "get"): {"200", "503"},
        ("/metrics", "get"): {"200"},
    }
    for (path, method), statuses in expected.items():
        declared = set(openapi["paths"][path][method]["responses"])
        assert statuses <= declared, f"{method} {path} lacks {statuses - declared}"
    schemes = openapi["components"]["securitySchemes"]
    assert {s["type"] for s in schemes.values()} == {"http", "apiKey"}
    assert "security" in openapi["paths"]["/v1/classify"]["post"]
    assert "security" not in openapi["paths"]["/healthz"]["get"]


def test_real_responses_validate_against_the_declared_schemas(client):
    """Bodies of real calls, successes and errors, fit the schemas the gateway declares."""
    openapi = client.get("/openapi.json").json()
    single = client.post("/v1/classify", json={"id": "one", "text": "hello"})
    batch = client.post(
        "/v1/classify", json={"messages": [{"text": "a"}, {"text": "b", "policy": "films"}]}
    )
    accepted = client.post("/v1/messages", json={"messages": [{"id": "later", "text": "c"}]})
    for response, path in (
        (single, "/v1/classify"),
        (batch, "/v1/classify"),
        (accepted, "/v1/messages"),
    ):
        assert response.status_code in {200, 202}
        assert_documented(openapi, "post", path, response)
    assert_documented(openapi, "get", "/v1/messages/{message_id}", client.get("/v1/messages/one"))
    moderation = client.post("/v1/moderations", json={"input": ["x", "y"]})
    assert moderation.status_code == 200
    assert_documented(openapi, "post", "/v1/moderations", moderation)
    assert_documented(openapi, "get", "/v1/policies", client.get("/v1/policies"))
    assert_documented(openapi, "get", "/healthz", client.get("/healthz"))
    assert_documented(openapi, "get", "/readyz", client.get("/readyz"))
    errors = [
        ("post", "/v1/classify", client.post("/v1/classify", json={"messages": [{}]})),
        ("post", "/v1/classify", client.post("/v1/classify", json={"text": "x" * 1001})),
        (
            "post",
            "/v1/classify",
            client.post("/v1/classify", json={"text": "x"}, headers={"X-API-Key": "wrong"}),
        ),
        ("get", "/v1/messages/{message_id}", client.get("/v1/messages/nobody")),
        (
            "post",
            "/v1/moderations",
            client.post("/v1/moderations", json={"input": "x", "model": "films"}),
        ),
        ("post", "/v1/classify", client.post("/v1/classify", json={"id": "one", "text": "bye"})),
        ("post", "/v1/messages", client.post("/v1/messages", json={"id": "one", "text": "bye"})),
    ]
    assert [r.status_code for _, _, r in errors] == [422, 413, 401, 404, 400, 409, 409]
    for method, path, response in errors:
        assert_documented(openapi, method, path, response)


def test_the_classify_request_schema_allows_extra_scalar_fields(client):
    """The declared request body admits extra scalar fields, and the gateway answers one.

    Extra values that are not scalars are outside the schema.
    """
    openapi = client.get("/openapi.json").json()
    request = openapi["paths"]["/v1/classify"]["post"]["requestBody"]["content"]
    schema = request["application/json"]["schema"]
    body = {"id": "extra", "text": "hello", "lang": "en", "stars": 4, "editor": None}
    check(schema, body, openapi)
    check(schema, {"messages": [body]}, openapi)
    with pytest.raises(AssertionError):
        check(schema, {"text": "hello", "tags": ["a"]}, openapi)
    response = client.post("/v1/classify", json=body)
    assert response.status_code == 200, response.text
    assert response.json()["decisions"][0]["metadata"] == {"lang": "en", "stars": 4, "editor": None}


def test_the_validator_catches_a_wrong_body(client):
    """The schema check used above does reject a body that does not fit."""
    openapi = client.get("/openapi.json").json()
    schema = {"$ref": "#/components/schemas/ClassifyResponse"}
    with pytest.raises(AssertionError):
        check(schema, {"decisions": [{"id": "x"}]}, openapi)
