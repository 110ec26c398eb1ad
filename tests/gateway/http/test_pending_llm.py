"""The HTTP contract of batch mode: ``pending_llm`` at once, 202 while pending, then the answer.

The gateway runs in distributed mode over a Dispatcher double whose worker thread runs the
BERT step and the batch-mode LLM step (:func:`hold_for_batch`) on a real Redis ledger; the
batch runner's rounds are driven by the test, against the fake server's batch API.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import redis
from fastapi.testclient import TestClient

from tests.gateway.http.test_distributed import ThreadDispatcher
from tiergate.gateway.http import create_app
from tiergate.policies.spec import Escalation, LabelSpec, LLMSpec, PolicySpec, ProviderRef
from tiergate.workers.batches import BatchRunner, BatchStore, hold_for_batch
from tiergate.workers.cache import RedisDecisionCache
from tiergate.workers.cascade import Cascade, LLMWork, PolicyBook
from tiergate.workers.ledger import RedisDecisionLedger
from tiergate.workers.llm.breaker import LocalBreakerStore
from tiergate.workers.llm.testing import FakeLLMServer
from tiergate.workers.llm.tier import LLMTier
from tiergate.workers.schemas import Message
from tiergate.workers.settings import Settings
from tiergate.workers.testing import FixedScoreClassifier

LABELS = ("negative", "positive")
SPEC = PolicySpec(
    name="films",
    version="1",
    labels=[LabelSpec(name=n) for n in LABELS],
    escalation=Escalation(min_probability=0.8),
    llm=LLMSpec(
        providers=[ProviderRef(provider="openai", model="gpt-4o-mini")],
        mode="batch",
        max_batch=1,
    ),
)


class BatchDispatcher(ThreadDispatcher):
    """The thread dispatcher on a Redis ledger, whose worker queues LLM work for batches."""

    def __init__(self, server: FakeLLMServer, prefix: str) -> None:
        client = redis.Redis(host="127.0.0.1", port=6379)
        self.settings = Settings(
            openai_api_key="k", openai_base_url=server.openai_base_url, llm_max_retries=0
        )
        scorer = FixedScoreClassifier(LABELS, lambda t: (0.1, 0.9) if "good" in t else (0.5, 0.5))
        cascade = Cascade(
            scorer,
            PolicyBook([SPEC]),
            llm=LLMTier(self.settings, breaker_store=LocalBreakerStore()),
            cache=RedisDecisionCache(client, prefix),
        )
        ledger = RedisDecisionLedger(client, prefix=prefix, stream=f"{prefix}:decisions")
        self.store = BatchStore(client, prefix)
        self.runner = BatchRunner(cascade, ledger, self.store, self.settings)
        super().__init__(cascade, ledger)

    def handle(self, batch: list[Message]) -> None:
        """The BERT step; LLM work is held for a batch instead of answered online."""
        for message, first in zip(batch, self.cascade.first_pass(batch), strict=True):
            if isinstance(first, LLMWork):
                hold_for_batch(self.cascade, self.ledger, self.store, first)
            else:
                self.ledger.deliver(first, text=message.text)


@pytest.fixture
def dispatcher(redis_prefix) -> Iterator[BatchDispatcher]:
    """The double over the fake server and a fresh Redis prefix."""
    with FakeLLMServer() as server:
        double = BatchDispatcher(server, redis_prefix)
        yield double
        double.close()


def test_a_batch_mode_message_is_answered_pending_then_202_then_final(tmp_path, dispatcher):
    """Classify gives the BERT answer as pending_llm; GET says 202 until the batch answers."""
    settings = Settings(data_dir=tmp_path, broker_url="memory://")
    app = create_app(settings, client=dispatcher)
    with TestClient(app, raise_server_exceptions=False) as client:
        response = client.post("/v1/classify", json={"id": "unsure", "text": "so-so"})
        assert response.status_code == 200
        [pending] = response.json()["decisions"]
        assert (pending["status"], pending["tier"]) == ("pending_llm", "bert")
        waiting = client.get("/v1/messages/unsure")
        assert waiting.status_code == 202
        assert waiting.json()["status"] == "pending_llm"
        confident = client.post("/v1/classify", json={"id": "sure", "text": "good"})
        assert confident.json()["decisions"][0]["status"] == "answered"
        dispatcher.runner.run_once()  # sends the batch
        dispatcher.runner.run_once()  # reads and delivers it
        final = client.get("/v1/messages/unsure")
        assert final.status_code == 200
        assert (final.json()["status"], final.json()["tier"]) == ("answered", "llm")
        assert final.json()["llm"]["mode"] == "batch"
