"""POST /v1/feedback on the embedded gateway: the tiny test model, the fake LLM, over HTTP.

The gateway is built from settings alone (``create_app``), so the label store and the decision
cache are the ones a deployment gets: the embedded SQLite files under the data directory.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from tiergate.gateway.http import create_app, hash_api_key
from tiergate.policies.spec import (
    Escalation,
    LabelSpec,
    LearningSpec,
    LLMSpec,
    PolicySpec,
    ProviderRef,
)
from tiergate.workers.labels import label_store_path, open_label_store
from tiergate.workers.llm.testing import FakeLLMServer, first_label_answer
from tiergate.workers.settings import Settings

# The tiny test model's labels (tests/conftest.py).
LABELS = ("account", "billing", "bug")
ALL_KEY = "key-for-everything"
OTHER_KEY = "key-for-the-other-policy-only"
EMAIL = "jane.doe@example.com"


def billing_answer(body: dict[str, Any]) -> dict[str, Any]:
    """The fake LLM always answers 'billing'."""
    return {**first_label_answer(body), "label": "billing"}


def support(name: str, *, collect: bool = True) -> PolicySpec:
    """A policy over the tiny model's labels that sends every message to the LLM."""
    return PolicySpec(
        name=name,
        version="2",
        labels=[LabelSpec(name=label) for label in LABELS],
        escalation=Escalation(min_probability=0.99),
        llm=LLMSpec(providers=[ProviderRef(provider="openai", model="gpt-4o-mini")]),
        learning=LearningSpec(collect=collect),
    )


@pytest.fixture
def fake() -> Iterator[FakeLLMServer]:
    """The fake LLM provider, answering 'billing'."""
    with FakeLLMServer(billing_answer) as server:
        yield server


@pytest.fixture
def settings(tmp_path: Path, tiny_model: Path, fake: FakeLLMServer) -> Settings:
    """Embedded settings: the tiny model, two collecting policies and one that does not."""
    files = []
    for spec in (support("support"), support("other"), support("quiet", collect=False)):
        path = tmp_path / f"{spec.name}.yaml"
        path.write_text(spec.to_yaml(), encoding="utf-8")
        files.append(path)
    return Settings(
        data_dir=tmp_path / "data",
        model_dir=tiny_model,
        policy_files=files,
        openai_api_key="test-key",
        openai_base_url=fake.openai_base_url,
        llm_max_retries=0,
        intra_op_threads=1,
        api_keys={hash_api_key(ALL_KEY): ["*"], hash_api_key(OTHER_KEY): ["other"]},
    )


@pytest.fixture
def client(settings: Settings) -> Iterator[TestClient]:
    """The embedded gateway of ``settings``."""
    with TestClient(create_app(settings), raise_server_exceptions=False) as test_client:
        yield test_client


def classify(client: TestClient, message_id: str, text: str, policy: str = "support") -> dict:
    """POST /v1/classify one message with the all-policies key; its decision."""
    response = client.post(
        "/v1/classify",
        json={"id": message_id, "text": text, "policy": policy},
        headers={"X-API-Key": ALL_KEY},
    )
    assert response.status_code == 200, response.text
    return response.json()["decisions"][0]


def feedback(client: TestClient, body: dict, key: str = ALL_KEY) -> Any:
    """POST /v1/feedback with ``key``."""
    return client.post("/v1/feedback", json=body, headers={"X-API-Key": key})


def test_a_correction_outranks_the_llm_and_clears_the_cached_decision(client, settings, fake):
    """The person's label is kept over the LLM's, and the same text is decided afresh."""
    text = f"my invoice is wrong, reach me at {EMAIL}"
    first = classify(client, "m1", text)
    assert (first["tier"], first["label"]) == ("llm", "billing")
    assert classify(client, "m2", text)["cached"] is True

    response = feedback(client, {"id": "m1", "label": "bug", "source": "agent-7"})
    assert response.status_code == 200, response.text
    body = response.json()
    assert (body["id"], body["labels"], body["source"]) == ("m1", ["bug"], "person:agent-7")
    assert (body["policy"], body["policy_version"]) == ("support", "2")
    assert "text" not in body

    calls = fake.calls
    again = classify(client, "m3", text)
    assert again["cached"] is False
    assert again["tier"] == "llm"
    assert fake.calls == calls + 1  # decided afresh; the LLM said 'billing' again...
    store = open_label_store(settings)
    [example] = store.examples("support")
    store.close()
    assert (example.labels, example.kind) == (["bug"], "person")  # ...and the person still wins
    assert example.text == "my invoice is wrong, reach me at [EMAIL_1]"
    path = label_store_path(settings)
    held = b"".join(p.read_bytes() for p in path.parent.glob(f"{path.name}*"))
    assert EMAIL.encode() not in held


def test_a_correction_of_a_cached_decision_reaches_its_example(client):
    """An id whose decision came from the cache can be corrected too."""
    classify(client, "first", "the app crashes")
    assert classify(client, "hit", "the app crashes")["cached"] is True
    response = feedback(client, {"id": "hit", "labels": ["bug"]})
    assert response.status_code == 200, response.text
    assert response.json()["source"] == "person:anonymous"


def test_an_unknown_id_is_404_naming_it(client):
    """An id no collected decision has: 404 with the id in the body."""
    response = feedback(client, {"id": "never-seen", "label": "bug"})
    assert response.status_code == 404
    assert response.json()["id"] == "never-seen"
    assert "'never-seen'" in response.json()["detail"]


def test_a_decision_of_a_policy_that_does_not_collect_is_404(client):
    """Nothing is kept for a policy that did not opt in, so its ids are unknown."""
    classify(client, "q1", "reset my password", policy="quiet")
    response = feedback(client, {"id": "q1", "label": "account"})
    assert response.status_code == 404


def test_a_label_outside_the_policy_is_422_naming_it(client):
    """A label the policy does not have is refused by name, and nothing changes."""
    classify(client, "m1", "refund please")
    response = feedback(client, {"id": "m1", "label": "spam"})
    assert response.status_code == 422
    assert "'spam'" in response.json()["detail"]
    assert response.json()["field"] == "label"
    assert classify(client, "m2", "refund please")["cached"] is True


@pytest.mark.parametrize(
    "body",
    [
        {"id": "m1", "label": "bug", "labels": ["bug"]},
        {"id": "m1"},
        {"id": "m1", "labels": ["bug", "billing"]},
    ],
    ids=["both", "neither", "two-for-single-label"],
)
def test_label_and_labels_together_or_neither_is_422(client, body):
    """Exactly one of label and labels, and one label for a single-label policy."""
    classify(client, "m1", "refund please")
    response = feedback(client, body)
    assert response.status_code == 422, response.text
    assert "label" in response.json()["detail"]


def test_a_key_not_allowed_the_decision_policy_is_403(client):
    """A key may correct only decisions of the policies it may use."""
    classify(client, "m1", "refund please")
    refused = feedback(client, {"id": "m1", "label": "bug"}, key=OTHER_KEY)
    assert refused.status_code == 403
    assert refused.json()["policy"] == "support"
    classify(client, "o1", "refund please", policy="other")
    allowed = feedback(client, {"id": "o1", "label": "bug"}, key=OTHER_KEY)
    assert allowed.status_code == 200, allowed.text
