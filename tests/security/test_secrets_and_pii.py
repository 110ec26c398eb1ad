"""Secrets and personal data: what leaves for the LLM, and what the logs keep.

Messages full of personal data go through the real gateway (uvicorn, embedded mode, Redis) to
the LLM tier, whose providers are the fake OpenAI and Anthropic APIs. The request bodies the
fake received must hold placeholders, never the values; the generated reply must have the
values back. Everything logged meanwhile (structlog, Python logging, the process's output) must
hold no API key, no provider key, no personal data and no message text.
"""

from __future__ import annotations

import json
import re

import pytest
import redis

from tests.security.conftest import (
    ANTHROPIC_KEY,
    KEY_ALL,
    KEY_LIMITED,
    KEY_WRONG,
    OPENAI_KEY,
    write_policy,
)
from tiergate.workers.llm.testing import Fail, RespondRaw, first_label_answer, message_of

PLACEHOLDER = re.compile(r"\[(?:EMAIL|PHONE|CARD|IBAN|IP)_\d+\]")
# Each message, and the personal values in it as written. All checksums are valid.
PERSONAL = {
    "pii-1": (
        (
            "Hi, Jane here (jane.doe+billing@example.co.uk, +44 20 7946 0958). I was charged "
            "twice on card 4111 1111 1111 1111 this month."
        ),
        ["jane.doe+billing@example.co.uk", "+44 20 7946 0958", "4111 1111 1111 1111"],
    ),
    "pii-2": (
        (
            "Please refund to IBAN GB82 WEST 1234 5698 7654 32 or DE89370400440532013000, and "
            "call me back on (555) 123-4567."
        ),
        ["GB82 WEST 1234 5698 7654 32", "DE89370400440532013000", "(555) 123-4567"],
    ),
    "pii-3": (
        (
            "Log-in fails from 192.168.10.42 and 2001:db8::8a2e:370:7334; my other card is "
            "5500-0000-0000-0004 and my mobile 555-123-4567."
        ),
        ["192.168.10.42", "2001:db8::8a2e:370:7334", "5500-0000-0000-0004", "555-123-4567"],
    ),
}
SECRETS = [OPENAI_KEY, ANTHROPIC_KEY, KEY_ALL, KEY_LIMITED, KEY_WRONG]


def compact(value: str) -> str:
    """``value`` without the separators people write numbers with."""
    return re.sub(r"[\s().-]", "", value)


def echo_placeholders(body):
    """An answer whose reply quotes every placeholder of the message, as a real reply would."""
    answer = first_label_answer(body)
    found = PLACEHOLDER.findall(message_of(body))
    answer["text"] = "We will contact you at " + ", ".join(found) + "."
    return answer


def assert_no_personal_data(text: str, where: str) -> None:
    """No personal value of any message is in ``text``, as written or without separators."""
    squeezed = compact(text)
    for _, values in PERSONAL.values():
        for value in values:
            assert value not in text, f"{value!r} in {where}"
            if len(compact(value)) >= 10 and not compact(value).isalpha():
                assert compact(value) not in squeezed, f"{value!r} (compacted) in {where}"


def assert_nothing_secret_logged(logged: str) -> None:
    """No key, no personal value and no message text in what was logged."""
    for secret in SECRETS:
        assert secret not in logged
    assert_no_personal_data(logged, "the logs")
    for text, _ in PERSONAL.values():
        assert text[:30] not in logged
        assert "charged twice" not in logged


@pytest.fixture
def gateway(make_gateway, tmp_path):
    """The tiny-model gateway whose tickets policy asks OpenAI, then Anthropic."""
    providers = [
        {"provider": "openai", "model": "gpt-4o-mini"},
        {"provider": "anthropic", "model": "claude-haiku-4-5"},
    ]
    tickets = write_policy(
        tmp_path, "tickets", llm={"providers": providers, "instructions": "Triage tickets."}
    )
    return make_gateway(policies=[tickets])


def classify_personal(gateway, task="reply"):
    """Send every personal message in one request; their decisions by id."""
    body = {"messages": [{"id": i, "text": t, "task": task} for i, (t, _) in PERSONAL.items()]}
    response = gateway.post("/v1/classify", json=body)
    assert response.status_code == 200, response.text
    return {d["id"]: d for d in response.json()["decisions"]}


def test_personal_data_never_reaches_the_llm_and_comes_back_in_the_reply(
    gateway, captured_logs, redis_prefix
):
    """The provider sees placeholders only; the reply has the values; nothing leaks to logs."""
    gateway.llm.answerer = echo_placeholders

    decisions = classify_personal(gateway)

    received = gateway.llm.requests
    assert len(received) == len(PERSONAL)
    for request in received:
        wire = json.dumps(request.body, ensure_ascii=False)
        assert_no_personal_data(wire, "a request to the LLM")
        assert PLACEHOLDER.search(message_of(request.body))
    for message_id, (_, values) in PERSONAL.items():
        decision = decisions[message_id]
        assert (decision["tier"], decision["llm_skipped"]) == ("llm", None)
        for value in values:
            assert value in decision["text"], (value, decision["text"])
        assert not PLACEHOLDER.search(decision["text"])
    assert_nothing_secret_logged(captured_logs.text())
    assert any(e["event"] == "llm.call" for e in captured_logs.events())
    client = redis.Redis(host="127.0.0.1", port=6379)
    try:
        keys = [key.decode() for key in client.scan_iter(match=f"{redis_prefix}:*")]
    finally:
        client.close()
    assert keys, "the cache and the decision records live in Redis"
    assert_no_personal_data("\n".join(keys), "a Redis key")


@pytest.mark.parametrize("provider", ["openai", "anthropic"])
def test_each_wire_format_carries_placeholders_only(make_gateway, tmp_path, provider):
    """OpenAI's chat turns and Anthropic's system and messages both hold no personal value."""
    model = "gpt-4o-mini" if provider == "openai" else "claude-haiku-4-5"
    tickets = write_policy(
        tmp_path, "tickets", llm={"providers": [{"provider": provider, "model": model}]}
    )
    gateway = make_gateway(policies=[tickets])
    gateway.llm.answerer = echo_placeholders
    decisions = classify_personal(gateway, task="summary")
    paths = {request.path for request in gateway.llm.requests}
    assert paths == {"/v1/chat/completions" if provider == "openai" else "/v1/messages"}
    for request in gateway.llm.requests:
        assert_no_personal_data(json.dumps(request.body, ensure_ascii=False), provider)
    assert all(d["llm"]["provider"] == provider for d in decisions.values())


def test_failures_and_repairs_log_no_secret_and_send_no_personal_data(gateway, captured_logs):
    """A 500, a fallback to the next provider and a repair attempt: still nothing leaks."""
    text, values = PERSONAL["pii-1"]
    gateway.llm.script(Fail(500), RespondRaw("Sure! Free text instead of JSON."))
    gateway.llm.answerer = echo_placeholders

    response = gateway.post("/v1/classify", json={"id": "f-1", "text": text, "task": "reply"})

    assert response.status_code == 200, response.text
    (decision,) = response.json()["decisions"]
    assert (decision["llm"]["provider"], decision["llm"]["attempts"]) == ("anthropic", 3)
    assert all(value in decision["text"] for value in values)
    assert [r.path for r in gateway.llm.requests] == [
        "/v1/chat/completions",
        "/v1/messages",
        "/v1/messages",
    ]
    for request in gateway.llm.requests:  # the repair turn included
        assert_no_personal_data(json.dumps(request.body, ensure_ascii=False), "a request")
    events = {e["event"] for e in captured_logs.events()}
    assert {"llm.fallback", "llm.repair", "llm.call"} <= events
    logged = captured_logs.text()
    for secret in SECRETS:
        assert secret not in logged
    for value in values:
        assert value not in logged


def test_settings_and_errors_do_not_reveal_the_provider_keys(gateway, captured_logs):
    """The gateway's settings print masked; a request with every kind of bad key logs none."""
    assert OPENAI_KEY not in repr(gateway.settings)
    assert ANTHROPIC_KEY not in str(gateway.settings.model_dump())
    for key in (KEY_WRONG, ""):
        gateway.post("/v1/classify", json={"text": "hello"}, key=key)
    gateway.get("/readyz", key=None)
    gateway.get("/metrics", key=None)
    metrics = gateway.get("/metrics", key=None).text
    for secret in SECRETS:
        assert secret not in metrics
    assert_nothing_secret_logged(captured_logs.text())
    assert any(e["event"] == "http.request" for e in captured_logs.events())
