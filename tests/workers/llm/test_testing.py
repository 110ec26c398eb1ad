import json
import time
import urllib.error
import urllib.request

import pytest

from tiergate.workers.llm.testing import (
    ANTHROPIC_PATH,
    OPENAI_PATH,
    FakeLLMServer,
    Respond,
    Stall,
    Truncate,
    first_label_answer,
    message_of,
    schema_of,
)


def post(url, body):
    """POST ``body`` as JSON with the standard library; the status and the decoded answer."""
    request = urllib.request.Request(  # noqa: S310 -- a local http URL built by the test
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=60) as response:  # noqa: S310
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def openai_body(schema, text="hello"):
    """A Chat Completions request body asking for ``schema``."""
    return {
        "model": "m",
        "messages": [{"role": "user", "content": f"Classify.\n\n<message>\n{text}\n</message>"}],
        "response_format": {"type": "json_schema", "json_schema": {"name": "a", "schema": schema}},
    }


MULTI = {
    "type": "object",
    "properties": {
        "labels": {"type": "array", "items": {"type": "string", "enum": ["spam", "abuse"]}},
        "text": {"type": ["string", "null"]},
    },
}


def test_the_default_answerer_reads_the_schema_of_either_format():
    """The first enum value is answered, and nullable text is null, for both wire formats."""
    anthropic = {"messages": [], "tools": [{"name": "a", "input_schema": MULTI}]}
    assert schema_of(anthropic) == MULTI
    assert first_label_answer(openai_body(MULTI)) == {"labels": ["spam"], "text": None}
    assert first_label_answer(anthropic) == {"labels": ["spam"], "text": None}


def test_message_of_extracts_the_enclosed_text():
    """The benchmark hook sees the message between the delimiters."""
    assert message_of(openai_body(MULTI, text="two\nlines")) == "two\nlines"


def test_unknown_paths_are_404_and_not_counted():
    """Only the two provider endpoints answer; other paths get 404 and no call is counted."""
    with FakeLLMServer() as server:
        status, _ = post(f"{server.anthropic_base_url}/v1/embeddings", {})
        assert status == 404
        assert server.calls == 0


def test_calls_are_counted_per_path_and_bodies_kept():
    """Each request is counted under its path and its body is kept in order."""
    with FakeLLMServer() as server:
        server.script(Respond({"labels": ["abuse"], "text": None}))
        status, answer = post(f"{server.anthropic_base_url}{OPENAI_PATH}", openai_body(MULTI))
        assert status == 200
        assert json.loads(answer["choices"][0]["message"]["content"])["labels"] == ["abuse"]
        post(f"{server.anthropic_base_url}{OPENAI_PATH}", openai_body(MULTI, text="again"))
        assert server.calls_by_path == {OPENAI_PATH: 2}
        assert [message_of(r.body) for r in server.requests] == ["hello", "again"]


def test_latency_delays_every_answer():
    """latency_s holds each answer back by that long."""
    with FakeLLMServer(latency_s=0.2) as server:
        started = time.monotonic()
        post(f"{server.anthropic_base_url}{OPENAI_PATH}", openai_body(MULTI))
        assert time.monotonic() - started >= 0.2


@pytest.mark.parametrize("path", [OPENAI_PATH, ANTHROPIC_PATH])
def test_stopping_does_not_wait_for_a_stalled_answer(path):
    """stop() returns promptly even while a handler is stalled."""
    server = FakeLLMServer().start()
    server.script(Stall(600))
    request = urllib.request.Request(  # noqa: S310
        f"{server.anthropic_base_url}{path}", data=b"{}", method="POST"
    )
    with pytest.raises(TimeoutError):  # the client gives up first
        urllib.request.urlopen(request, timeout=0.2)  # noqa: S310
    deadline = time.monotonic() + 60
    while server.calls < 1 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert server.calls == 1  # the request reached its handler, which is now stalled
    started = time.monotonic()
    server.stop()
    assert time.monotonic() - started < 30  # the stall was not waited out


def test_a_truncated_answer_stops_at_the_output_limit_in_either_format():
    """Truncate cuts the answer off and says so: finish_reason length, stop_reason max_tokens."""
    with FakeLLMServer() as server:
        server.script(Truncate(), Truncate())
        body = {**openai_body(MULTI), "max_completion_tokens": 40}
        _, answer = post(f"{server.anthropic_base_url}{OPENAI_PATH}", body)
        choice = answer["choices"][0]
        assert choice["finish_reason"] == "length"
        assert json.dumps(first_label_answer(body)).startswith(choice["message"]["content"])
        assert answer["usage"]["completion_tokens"] == 40
        anthropic_body = {
            "model": "m",
            "max_tokens": 30,
            "messages": [{"role": "user", "content": "<message>\nhi\n</message>"}],
            "tools": [{"name": "answer", "input_schema": MULTI}],
        }
        _, answer = post(f"{server.anthropic_base_url}{ANTHROPIC_PATH}", anthropic_body)
        assert answer["stop_reason"] == "max_tokens"
        assert answer["content"] == [
            {"type": "tool_use", "id": answer["content"][0]["id"], "name": "answer", "input": {}}
        ]
        assert answer["usage"]["output_tokens"] == 30
