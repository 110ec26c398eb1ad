"""The HTTP gateway in distributed mode, over a Dispatcher double that runs a real cascade.

The double stands where Celery and the Redis ledger stand in production: it decides submitted
messages on its own thread and delivers them to a ledger the gateway waits on. The real
Celery path is tested with the client itself.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor

import pytest
from fastapi.testclient import TestClient

from tiergate.gateway.http import backends, create_app
from tiergate.policies.spec import LabelSpec, PolicySpec
from tiergate.workers.cascade import Cascade, PolicyBook
from tiergate.workers.errors import TransientError
from tiergate.workers.ledger import DecisionLedger, Delivery, IdReused, LocalDecisionLedger
from tiergate.workers.schemas import Decision, Message
from tiergate.workers.settings import Settings
from tiergate.workers.testing import FixedScoreClassifier

LABELS = ("negative", "positive")


class ThreadDispatcher:
    """A Dispatcher that decides messages on a worker thread and delivers them to a ledger.

    While ``paused`` is set, the worker holds the batch it took (setting ``holding``) and
    decides it once ``paused`` is cleared.
    """

    def __init__(self, cascade: Cascade, ledger: DecisionLedger | None = None) -> None:
        self.cascade = cascade
        self.ledger = ledger if ledger is not None else LocalDecisionLedger()
        self.health = {"broker": True, "redis": True}
        self.paused = threading.Event()
        self.holding = threading.Event()
        self.submitted: list[str] = []
        self._inbox: queue.Queue[list[Message] | None] = queue.Queue()
        self._worker = threading.Thread(target=self._work, daemon=True)
        self._worker.start()

    def _work(self) -> None:
        while (batch := self._inbox.get()) is not None:
            if self.paused.is_set():
                self.holding.set()
                while self.paused.is_set():
                    time.sleep(0.01)
            self.handle(batch)

    def handle(self, batch: list[Message]) -> None:
        """Decide ``batch`` and deliver its decisions, as a worker does."""
        for message, decision in zip(batch, self.cascade.decide(batch), strict=True):
            if self.ledger.deliver(decision, text=message.text) is Delivery.ID_REUSED:
                self.ledger.dead_letter(
                    message.model_dump(mode="json"), "id reused", kind="id_reused"
                )

    def close(self) -> None:
        """Stop the worker thread."""
        self.paused.clear()
        self._inbox.put(None)
        self._worker.join(timeout=60)

    def submit_many(self, messages: Sequence[Message]) -> list[str]:
        """Queue the messages for the worker."""
        self.submitted += [m.id for m in messages]
        self._inbox.put(list(messages))
        return [m.id for m in messages]

    def wait_for(
        self, messages: Sequence[Message], timeout_s: float
    ) -> list[Decision | IdReused | None]:
        """Block on the ledger for each message, all within one deadline."""
        deadline = time.monotonic() + timeout_s
        return [self.ledger.wait_for(m, max(0.0, deadline - time.monotonic())) for m in messages]

    def get_many(self, ids: Sequence[str]) -> list[Decision | None]:
        """Read the ledger."""
        return self.ledger.get_many(ids)

    def answers_for(self, messages: Sequence[Message]) -> list[Decision | IdReused | None]:
        """Read the ledger, telling a reused id."""
        return self.ledger.answers_for(messages)

    def dead_letter_counts(self) -> dict[str, int]:
        """The ledger's dead letters by kind."""
        return self.ledger.dead_letter_counts()

    def policies(self) -> list[PolicySpec]:
        """The cascade's policies."""
        return list(self.cascade.policies)

    def ready(self) -> dict[str, bool]:
        """The health this test sets."""
        return dict(self.health)

    def queue_depths(self) -> dict[str, int]:
        """Batches not yet taken by the worker."""
        return {"tiergate.bert": self._inbox.qsize()}


@pytest.fixture
def dispatcher() -> Iterator[ThreadDispatcher]:
    """A dispatcher over a films cascade: 'good' texts score positive."""
    scorer = FixedScoreClassifier(LABELS, lambda t: (0.1, 0.9) if "good" in t else (0.9, 0.1))
    spec = PolicySpec(name="films", version="1", labels=[LabelSpec(name=n) for n in LABELS])
    double = ThreadDispatcher(Cascade(scorer, PolicyBook([spec])))
    yield double
    double.close()


def gateway(tmp_path, dispatcher: ThreadDispatcher, **overrides) -> TestClient:
    """A distributed-mode gateway app over the double, in a test client."""
    settings = Settings(data_dir=tmp_path, broker_url="memory://", **overrides)
    return TestClient(create_app(settings, client=dispatcher), raise_server_exceptions=False)


def test_classify_waits_for_the_workers(tmp_path, dispatcher):
    """A classify request is submitted to the workers and returns their decisions in order."""
    with gateway(tmp_path, dispatcher) as client:
        response = client.post(
            "/v1/classify", json={"messages": [{"id": "a", "text": "good"}, {"text": "dull"}]}
        )
    assert response.status_code == 200
    decisions = response.json()["decisions"]
    assert [d["label"] for d in decisions] == ["positive", "negative"]
    assert decisions[0]["id"] == "a"
    assert dispatcher.submitted == [d["id"] for d in decisions]


def test_accepted_messages_are_read_back_from_the_ledger(tmp_path, dispatcher):
    """POST /v1/messages submits and answers 202; GET reads the delivered decision."""
    with gateway(tmp_path, dispatcher) as client:
        response = client.post("/v1/messages", json={"id": "later", "text": "good"})
        assert response.status_code == 202
        assert response.json() == {"ids": ["later"]}
        assert dispatcher.ledger.wait("later", 60) is not None
        found = client.get("/v1/messages/later")
        assert found.status_code == 200
        assert found.json()["label"] == "positive"
        assert client.get("/v1/messages/unknown").status_code == 404


def test_classify_times_out_with_504_naming_pending_ids(tmp_path, dispatcher):
    """When the workers do not answer in time, the gateway answers 504 with the pending ids."""
    dispatcher.paused.set()
    with gateway(tmp_path, dispatcher, request_timeout_s=0.2) as client:
        response = client.post("/v1/classify", json={"id": "stuck", "text": "good"})
        assert response.status_code == 504
        assert response.json()["pending"] == ["stuck"]
        dispatcher.paused.clear()
        assert dispatcher.ledger.wait("stuck", 60) is not None
        assert client.get("/v1/messages/stuck").status_code == 200


def test_unknown_policy_is_refused_before_submission(tmp_path, dispatcher):
    """The gateway checks policies against the workers' list and submits nothing on 422."""
    with gateway(tmp_path, dispatcher) as client:
        response = client.post("/v1/classify", json={"text": "x", "policy": "elsewhere"})
    assert response.status_code == 422
    assert response.json()["policy"] == "elsewhere"
    assert dispatcher.submitted == []


def test_readyz_follows_the_dispatcher(tmp_path, dispatcher):
    """Ready while broker and Redis answer; 503 naming Redis when the dispatcher reports it down."""
    with gateway(tmp_path, dispatcher) as client:
        assert client.get("/readyz").json() == {
            "ready": True,
            "checks": {"broker": True, "redis": True},
        }
        dispatcher.health["redis"] = False
        response = client.get("/readyz")
    assert response.status_code == 503
    assert response.json()["not_ready"] == ["redis"]


def test_metrics_show_queue_depth_and_decisions(tmp_path, dispatcher):
    """/metrics reads the dispatcher's queue depths and counts the decisions it returned."""
    dispatcher.paused.set()
    with gateway(tmp_path, dispatcher) as client:
        client.post("/v1/messages", json={"messages": [{"text": "good"}]})
        client.post("/v1/messages", json={"messages": [{"text": "dull"}]})
        # The worker holds the first batch, so the second is the one left in the queue.
        assert dispatcher.holding.wait(60)
        waiting = client.get("/metrics").text
        dispatcher.paused.clear()
        client.post("/v1/classify", json={"text": "good"})
        after = client.get("/metrics").text
    assert 'tiergate_queue_depth{queue="tiergate.bert"} 1.0' in waiting
    assert 'tiergate_decisions_total{policy="films",reason="confident",tier="bert"} 1.0' in after


def test_distributed_mode_needs_a_dispatcher(tmp_path):
    """With a broker configured and no Dispatcher, the app refuses to build."""
    with pytest.raises(ValueError, match="Dispatcher"):
        create_app(Settings(data_dir=tmp_path, broker_url="memory://"))


class ChangingPolicies(ThreadDispatcher):
    """A dispatcher whose workers' policies a test can change, or make unreadable."""

    def __init__(self, cascade: Cascade) -> None:
        super().__init__(cascade)
        self.served = list(cascade.policies)
        self.unreadable = False

    def policies(self) -> list[PolicySpec]:
        """What the test says the workers serve now."""
        if self.unreadable:
            raise TransientError("Redis is unreachable")
        return list(self.served)


def test_the_gateway_hears_of_new_policies_and_keeps_the_last_known_ones(
    tmp_path, dispatcher, monkeypatch
):
    """Policies are read again after the refresh interval; a failed read keeps the old ones."""
    monkeypatch.setattr(backends, "_POLICY_REFRESH_S", 0.0)
    changing = ChangingPolicies(dispatcher.cascade)
    renamed = changing.served[0].model_copy(update={"name": "films-v2"})
    try:
        with gateway(tmp_path, changing) as client:
            assert [p["name"] for p in client.get("/v1/policies").json()["policies"]] == ["films"]
            changing.served = [renamed]
            assert [p["name"] for p in client.get("/v1/policies").json()["policies"]] == [
                "films-v2"
            ]
            changing.unreadable = True
            response = client.get("/v1/policies")
    finally:
        changing.close()
    assert response.status_code == 200
    assert [p["name"] for p in response.json()["policies"]] == ["films-v2"]


def test_an_id_reused_for_another_text_is_409_and_never_submitted(tmp_path, dispatcher):
    """Answered ids: the same text is answered again, another text is a 409 naming the id."""
    with gateway(tmp_path, dispatcher) as client:
        first = client.post("/v1/classify", json={"id": "http-1", "text": "a dull film"})
        assert first.status_code == 200
        again = client.post("/v1/classify", json={"id": "http-1", "text": "a dull film"})
        assert again.json() == first.json()
        for route in ("/v1/classify", "/v1/messages"):
            reused = client.post(route, json={"id": "http-1", "text": "a good film"})
            assert reused.status_code == 409, route
            assert reused.json()["id"] == "http-1"
    assert dispatcher.submitted == ["http-1"]


def test_a_second_text_answered_meanwhile_under_its_id_is_a_409(tmp_path, dispatcher):
    """Submitted while another text under the same id is in flight: the first stands, a 409."""
    dispatcher.paused.set()
    with gateway(tmp_path, dispatcher, request_timeout_s=120) as client:
        assert client.post("/v1/messages", json={"id": "race", "text": "good"}).status_code == 202
        assert dispatcher.holding.wait(60)
        with ThreadPoolExecutor(max_workers=1) as pool:
            second = pool.submit(client.post, "/v1/classify", json={"id": "race", "text": "dull"})
            deadline = time.monotonic() + 60
            while dispatcher.submitted.count("race") < 2:  # submitted: past the id check
                assert time.monotonic() < deadline, "the second text was never submitted"
                time.sleep(0.01)
            dispatcher.paused.clear()
            response = second.result()
        assert response.status_code == 409, response.text
        assert client.get("/v1/messages/race").json()["label"] == "positive"
        while not dispatcher.ledger.dead_letters():  # the worker dead-letters the second text
            assert time.monotonic() < deadline + 60, "the second text was not dead-lettered"
            time.sleep(0.01)
        metrics = client.get("/metrics").text
    assert 'tiergate_dead_letters_total{reason="id_reused"} 1.0' in metrics


def test_an_id_answered_before_is_answered_from_the_ledger_and_counted_once(tmp_path, dispatcher):
    """The same id and text again gets the recorded decision, not republished nor recounted."""
    body = {"id": "again", "text": "good"}
    with gateway(tmp_path, dispatcher) as client:
        first = client.post("/v1/classify", json=body)
        second = client.post("/v1/classify", json=body)
        metrics = client.get("/metrics").text
    assert first.status_code == second.status_code == 200
    assert second.json()["decisions"] == first.json()["decisions"]
    assert dispatcher.submitted == ["again"]
    assert 'tiergate_decisions_total{policy="films",reason="confident",tier="bert"} 1.0' in metrics
