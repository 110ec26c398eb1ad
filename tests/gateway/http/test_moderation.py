"""POST /v1/moderations speaks OpenAI's moderation API: the official SDK is the client.

The gateway runs under a real uvicorn server on a free port; ``openai.OpenAI`` points its base
URL at it and calls ``moderations.create`` as an existing moderation client would.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import openai
import pytest
import uvicorn
from fastapi import FastAPI

from tiergate.gateway.http import create_app, hash_api_key
from tiergate.policies.spec import LabelSpec, PolicySpec, example_policy
from tiergate.workers.cascade import Cascade, PolicyBook
from tiergate.workers.settings import Settings
from tiergate.workers.testing import FixedScoreClassifier

KEY = "moderation-client-key"
MODERATION = example_policy("moderation")
THREAT = "I am going to hurt you badly"
KIND = "have a lovely day"


def moderation_scores(text: str) -> list[float]:
    """Threats score high on harassment, its threatening form and violence; the rest low."""
    high = {"harassment": 0.97, "harassment/threatening": 0.91, "violence": 0.82}
    return [high.get(label, 0.01) if text == THREAT else 0.01 for label in MODERATION.label_names]


class RunningServer:
    """A uvicorn server for ``app`` on a free local port, in a thread, until closed."""

    def __init__(self, app: FastAPI) -> None:
        config = uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> RunningServer:
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.01)
        return self

    @property
    def base_url(self) -> str:
        """The server's root URL."""
        port = self.server.servers[0].sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}"

    def __exit__(self, *_: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=60)


def moderation_app(tmp_path, *policies: PolicySpec) -> FastAPI:
    """A keyed gateway serving ``policies`` over the moderation scores."""
    specs = policies or (MODERATION,)
    labels = specs[0].label_names
    scorer = FixedScoreClassifier(labels, moderation_scores, multi_label=specs[0].multi_label)
    settings = Settings(data_dir=tmp_path, api_keys={hash_api_key(KEY): ["*"]})
    return create_app(settings, cascade=Cascade(scorer, PolicyBook(specs)))


@pytest.fixture
def server(tmp_path) -> Iterator[RunningServer]:
    """The moderation gateway, served by uvicorn."""
    with RunningServer(moderation_app(tmp_path)) as running:
        yield running


def sdk(server: RunningServer, key: str = KEY) -> openai.OpenAI:
    """The official OpenAI client pointed at the gateway."""
    return openai.OpenAI(base_url=f"{server.base_url}/v1", api_key=key, max_retries=0, timeout=60)


def test_sdk_moderation_flags_and_scores_each_input(server):
    """moderations.create parses flagged, categories and scores for each input, in order."""
    response = sdk(server).moderations.create(input=[THREAT, KIND])
    assert response.id.startswith("modr-")
    assert response.model == "moderation"
    threat, kind = response.results
    assert threat.flagged is True
    assert threat.categories.harassment is True
    assert threat.categories.harassment_threatening is True
    assert threat.categories.violence is True
    assert threat.categories.hate is False
    assert threat.categories.sexual_minors is False
    assert threat.category_scores.harassment == pytest.approx(0.97)
    assert threat.category_scores.violence == pytest.approx(0.82)
    assert threat.category_scores.self_harm_intent == pytest.approx(0.01)
    assert kind.flagged is False
    assert not any(kind.categories.model_dump().values())


def test_sdk_moderation_of_one_string_names_the_policy_as_model(server):
    """A single string input, with the policy named as the model, gets one result."""
    response = sdk(server).moderations.create(input=THREAT, model="moderation")
    assert len(response.results) == 1
    assert response.results[0].flagged is True


def test_sdk_sees_a_wrong_key_as_authentication_error(server):
    """A key the gateway does not know is a 401 the SDK raises as AuthenticationError."""
    with pytest.raises(openai.AuthenticationError):
        sdk(server, key="not-the-key").moderations.create(input=KIND)


def test_unknown_model_is_422_and_single_label_policy_is_400(tmp_path):
    """Naming an unknown policy is 422; naming a single-label one is 400."""
    films = PolicySpec(name="films", version="1", labels=[LabelSpec(name="negative")])
    scorer = FixedScoreClassifier(MODERATION.label_names, moderation_scores, multi_label=True)
    settings = Settings(data_dir=tmp_path, api_keys={hash_api_key(KEY): ["*"]})
    app = create_app(settings, cascade=Cascade(scorer, PolicyBook([MODERATION, films])))
    with RunningServer(app) as running:
        client = sdk(running)
        with pytest.raises(openai.UnprocessableEntityError) as unknown:
            client.moderations.create(input=KIND, model="omni-moderation-latest")
        assert unknown.value.body["policy"] == "omni-moderation-latest"
        with pytest.raises(openai.BadRequestError) as single:
            client.moderations.create(input=KIND, model="films")
        assert single.value.body["policy"] == "films"


def test_no_multi_label_policy_is_400(tmp_path):
    """Without any multi-label policy loaded, moderation is a 400 JSON error."""
    films = PolicySpec(
        name="films", version="1", labels=[LabelSpec(name=n) for n in MODERATION.label_names]
    )
    with (
        RunningServer(moderation_app(tmp_path, films)) as running,
        pytest.raises(openai.BadRequestError) as refused,
    ):
        sdk(running).moderations.create(input=KIND)
    assert "multi-label" in refused.value.body["detail"]


def test_blank_input_is_422_naming_its_index(server):
    """A whitespace-only input is refused, naming which one."""
    with pytest.raises(openai.UnprocessableEntityError) as refused:
        sdk(server).moderations.create(input=[KIND, "   "])
    assert refused.value.body["field"] == "input[1]"
