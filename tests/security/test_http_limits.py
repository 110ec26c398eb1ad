"""Limits and malformed bodies over real HTTP: a clear 4xx JSON error, never a 500 or a hang.

The gateway is the tiny ticket model's, served by uvicorn, with the default 1,000,000-byte body
limit and a 20,000-character text limit. Every request has a client timeout (the fixture's
60 s, generous for a loaded machine) that bounds a hang: a request that does not come back in
time fails its test.
"""

from __future__ import annotations

import json

import pytest

JSON = {"Content-Type": "application/json"}


@pytest.fixture(scope="module")
def gateway(make_shared_gateway):
    """The keyed tiny-model gateway with a 1 MB body and a 20,000-character text limit."""
    return make_shared_gateway(max_body_bytes=1_000_000)


def assert_error(response, status, *needles):
    """A JSON error with the request id, no internals, and each of ``needles`` in its detail."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert body["request_id"] == response.headers["X-Request-ID"]
    assert "Traceback" not in response.text
    assert 'File "' not in response.text
    for needle in needles:
        assert needle in body["detail"], body
    return body


def test_body_over_the_limit_by_its_length_is_413(gateway):
    """A declared body over max_body_bytes is refused before it is read."""
    body = json.dumps({"text": "x" * 1_100_000}).encode()
    response = gateway.post("/v1/classify", content=body, headers=JSON)
    assert_error(response, 413, "over the limit of 1000000 bytes")


def test_chunked_body_streaming_past_the_limit_is_413(gateway):
    """A body without a length that streams past the limit is cut off with a 413."""

    def chunks():
        yield b'{"text": "'
        for _ in range(30):
            yield b"y" * 40_000
        yield b'"}'

    response = gateway.post("/v1/classify", content=chunks(), headers=JSON)
    assert "content-length" not in {k.lower() for k in response.request.headers}
    assert_error(response, 413, "over the limit of 1000000 bytes")


def test_text_over_max_text_chars_is_413_naming_the_message(gateway):
    """A text one character over the limit is refused, naming the message and its field."""
    batch = {"messages": [{"text": "fine"}, {"text": "z" * 20_001}]}
    body = assert_error(gateway.post("/v1/classify", json=batch), 413, "over the limit of 20000")
    assert (body["field"], body["index"]) == ("messages[1].text", 1)
    single = assert_error(gateway.post("/v1/messages", json={"text": "z" * 20_001}), 413)
    assert single["field"] == "text"


def test_text_under_the_limit_spanning_many_windows_is_answered_whole(gateway):
    """19,000 characters (hundreds of 32-token windows) are answered, every window read."""
    text = "The invoice total is wrong and the export crashes again. " * 330
    assert len(text) < 20_000
    response = gateway.post("/v1/classify", json={"id": "long", "text": text}, timeout=120)
    assert response.status_code == 200, response.text
    (decision,) = response.json()["decisions"]
    assert decision["id"] == "long"
    assert decision["chunks"] > 100
    assert decision["label"] in {"account", "billing", "bug"}


@pytest.mark.parametrize(
    "body",
    [
        pytest.param(b"[" * 100_000 + b"]" * 100_000, id="100k-arrays"),
        pytest.param(b'{"a":' * 90_000 + b"1" + b"}" * 90_000, id="90k-objects"),
        pytest.param(
            b'{"text": "x", "metadata": {"a": ' + b"[" * 100_000 + b"]" * 100_000 + b"}}",
            id="100k-arrays-in-metadata",
        ),
        pytest.param(b"[" * 100_000, id="100k-unclosed"),
    ],
)
def test_deeply_nested_json_is_a_422_without_a_hang(gateway, body):
    """JSON nested 100,000 deep is refused as malformed, quickly, by every body route."""
    for path in ("/v1/classify", "/v1/messages", "/v1/moderations"):
        response = gateway.post(path, content=body, headers=JSON)
        error = assert_error(response, 422, "malformed JSON")
        assert error["field"] == "body"


def test_nesting_the_parser_accepts_is_still_a_422_naming_the_field(gateway):
    """Metadata nested 500 deep parses, and is refused because metadata holds scalars only."""
    body = b'{"text": "x", "metadata": {"a": ' + b"[" * 500 + b"]" * 500 + b"}}"
    response = gateway.post("/v1/classify", content=body, headers=JSON)
    assert assert_error(response, 422)["field"].startswith("metadata")


@pytest.mark.parametrize(
    "body",
    [
        pytest.param('{"text": "café"}'.encode("latin-1"), id="latin-1"),
        pytest.param(b'{"text": "\x80 stray continuation byte"}', id="stray-continuation"),
        pytest.param(b'{"text": "overlong \xc0\xaf slash"}', id="overlong"),
        pytest.param(b'{"text": "cut \xe2\x82"}', id="truncated-sequence"),
        pytest.param(b'{"text": "ok", "id": "\xff\xfe"}', id="in-the-id"),
    ],
)
def test_body_that_is_not_utf8_is_a_422_saying_so(gateway, body):
    """Bytes that are not UTF-8 anywhere in the body get a 422 naming UTF-8, not a 400 or 500."""
    response = gateway.post("/v1/classify", content=body, headers=JSON)
    error = assert_error(response, 422, "not valid UTF-8")
    assert error["field"] == "body"


@pytest.mark.parametrize(
    "body",
    [
        pytest.param(b'{"text": "\xed\xa0\x80"}', id="encoded-surrogate"),
        pytest.param(b'{"text": "a\\ud800b"}', id="surrogate-escape-in-text"),
    ],
)
def test_a_lone_surrogate_in_the_text_is_a_422_saying_so(gateway, body):
    """A surrogate, encoded or escaped, never reaches the model: the text is not valid UTF-8."""
    response = gateway.post("/v1/classify", content=body, headers=JSON)
    assert assert_error(response, 422, "not valid UTF-8")["field"] == "text"


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/classify", b'{"text": "ok", "metadata": {"k": "\\udc80"}}'),
        ("/v1/classify", b'{"text": "ok", "metadata": {"\\ud800": 1}}'),
        ("/v1/messages", b'{"text": "ok", "metadata": {"k": "\\ud800"}}'),
        ("/v1/moderations", b'{"input": "ok", "model": "\\ud800"}'),
    ],
)
def test_a_lone_surrogate_anywhere_else_is_a_422_not_a_500(gateway, path, body):
    """Metadata and policy names with a lone surrogate escape are refused, not a 500 on output."""
    response = gateway.post(path, content=body, headers=JSON)
    assert_error(response, 422, "invalid request")


@pytest.mark.parametrize("value", [b"NaN", b"Infinity", b"-Infinity"])
def test_non_finite_numbers_in_metadata_are_a_422(gateway, value):
    """NaN and infinities (which JSON cannot carry back out) are refused in metadata."""
    body = b'{"text": "ok", "metadata": {"score": ' + value + b"}}"
    response = gateway.post("/v1/classify", content=body, headers=JSON)
    assert assert_error(response, 422)["field"].startswith("metadata.score")


def test_an_integer_of_thousands_of_digits_is_a_422(gateway):
    """An integer past Python's conversion limit is malformed JSON, not a 400 or a 500."""
    body = b'{"text": "ok", "metadata": {"n": ' + b"9" * 5_000 + b"}}"
    response = gateway.post("/v1/classify", content=body, headers=JSON)
    assert_error(response, 422, "too many digits")


@pytest.mark.parametrize(
    "headers",
    [
        {"Content-Type": "text/plain"},
        {"Content-Type": "application/x-www-form-urlencoded"},
        {"Content-Type": "multipart/form-data; boundary=xyz"},
        {"Content-Type": "application/xml"},
        {},
    ],
)
def test_a_body_that_is_not_declared_json_is_a_422_naming_the_content_type(gateway, headers):
    """JSON sent with the wrong (or no) Content-Type gets told to send application/json."""
    for path in ("/v1/classify", "/v1/messages", "/v1/moderations"):
        response = gateway.post(path, content=b'{"text": "ok"}', headers=headers)
        error = assert_error(response, 422, "Content-Type: application/json")
        assert error["errors"] == [
            {"field": "body", "message": error["errors"][0]["message"], "type": "content_type"}
        ]


@pytest.mark.parametrize("headers", [JSON, {}])
def test_an_empty_body_is_a_422_saying_it_is_empty(gateway, headers):
    """No body at all is refused as empty, on every body route."""
    for path in ("/v1/classify", "/v1/messages", "/v1/moderations"):
        response = gateway.post(path, content=b"", headers=headers)
        assert_error(response, 422, "body is empty")


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        (b"[]", "body"),
        (b'"just text"', "body"),
        (b"null", "body"),
        (b"42", "body"),
        (b'{"text": "ok",', "malformed JSON"),
        (b'{"text": "ok"} {"text": "again"}', "malformed JSON"),
        (b'{"messages": []}', "messages"),
        (b'{"text": "ok", "id": "' + b"i" * 257 + b'"}', "id"),
        (b'{"text": 42}', "text"),
        (b'{"text": "ok", "task": "format_disk"}', "task"),
        (b'{"text": "ok", "admin": {"role": "root"}}', "admin"),
    ],
)
def test_malformed_or_invalid_bodies_are_a_422_naming_the_problem(gateway, body, needle):
    """Not an object, broken JSON, an empty batch, a long id, wrong types, nested extras: 422."""
    response = gateway.post("/v1/classify", content=body, headers=JSON)
    assert_error(response, 422, needle)


def test_too_many_messages_are_a_413(gateway):
    """257 messages in one request are over the batch limit of 256."""
    messages = {"messages": [{"text": f"m{i}"} for i in range(257)]}
    assert_error(gateway.post("/v1/classify", json=messages), 413, "limit is 256")
    assert_error(gateway.post("/v1/messages", json=messages), 413, "limit is 256")


def test_moderation_limits_are_those_of_classify(moderation_gateway):
    """257 moderation inputs are a 413; an input over max_text_chars is a 413 naming it."""
    many = {"input": [f"m{i}" for i in range(257)]}
    assert_error(moderation_gateway.post("/v1/moderations", json=many), 413, "limit is 256")
    long = {"input": ["fine", "w" * 20_001]}
    error = assert_error(moderation_gateway.post("/v1/moderations", json=long), 413)
    assert (error["field"], error["index"]) == ("input[1]", 1)


def test_a_message_id_path_over_its_length_is_a_422(gateway):
    """GET /v1/messages/{id} with a 10,000-character id is a validation error, not a lookup."""
    response = gateway.get("/v1/messages/" + "q" * 10_000)
    assert_error(response, 422, "message_id")
