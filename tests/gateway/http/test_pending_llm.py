"""The HTTP contract of batch mode: ``pending_llm`` at once, 202 while pending, then the answer.

The gateway runs in distributed mode over a Dispatcher double whose worker thread runs the
BERT step and the batch-mode LLM step (:func:`hold_for_batch`) on a real Redis ledger; the
batch runner's rounds are driven by the test, against the fake server's batch API.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Iterator, Sequence

import pytest
import redis
from fastapi.testclient import TestClient

from tiergate.gateway.http import create_app
from tiergate.policies.spec import Escalation, LabelSpec, LLMSpec, PolicySpec, ProviderRef
from tiergate.workers.batches import BatchRunner, BatchStore, hold_for_batch
from tiergate.workers.cache import RedisDecisionCache
from tiergate.workers.cascade import Cascade, LLMWork, PolicyBook
from tiergate.workers.ledger import IdReused, RedisDecisionLedger
from tiergate.workers.llm.breaker import LocalBreakerStore
from tiergate.workers.llm.testing import FakeLLMServer
from tiergate.workers.llm.tier import LLMTier
from tiergate.workers.schemas import Decision, Message
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


class BatchDispatcher:
    """A Dispatcher whose worker thread runs the BERT step and queues LLM work for batches."""

    def __init__(self, server: FakeLLMServer, prefix: str) -> None:
        client = redis.Redis(host="127.0.0.1", port=6379)
        self.settings = Settings(
            openai_api_key="k", openai_base_url=server.openai_base_url, llm_max_retries=0
        )
        scorer = FixedScoreClassifier(LABELS, lambda t: (0.1, 0.9) if "good" in t else (0.5, 0.5))
        self.cascade = Cascade(
            scorer,
            PolicyBook([SPEC]),
            llm=LLMTier(self.settings, breaker_store=LocalBreakerStore()),
            cache=RedisDecisionCache(client, prefix),
        )
        self.ledger = RedisDecisionLedger(client, prefix=prefix, stream=f"{prefix}:decisions")
        self.store = BatchStore(client, prefix)
        self.runner = BatchRunner(self.cascade, self.ledger, self.store, self.settings)
        self._inbox: queue.Queue[list[Message] | None] = queue.Queue()
        self._worker = threading.Thread(target=self._work, daemon=True)
        self._worker.start()

    def _work(self) -> None:
        while (batch := self._inbox.get()) is not None:
            for message, first in zip(batch, self.cascade.first_pass(batch), strict=True):
                if isinstance(first, LLMWork):
                    hold_for_batch(self.cascade, self.ledger, self.store, first)
                else:
                    self.ledger.deliver(first, text=message.text)

    def close(self) -> None:
        """Stop the worker thread."""
        self._inbox.put(None)
        self._worker.join(timeout=60)

    def submit_many(self, messages: Sequence[Message]) -> list[str]:
        """Queue the messages for the worker."""
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
        """Always ready."""
        return {"broker": True, "redis": True}

    def queue_depths(self) -> dict[str, int]:
        """Batches of messages not yet taken by the worker."""
        return {"tiergate.bert": self._inbox.qsize()}


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
