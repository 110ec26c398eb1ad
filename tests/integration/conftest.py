"""Real worker processes for the distributed tests: Celery BERT and LLM workers as subprocesses.

Each test gets its own queues, key prefix and decisions stream, so tests never see each
other's messages; the broker is real Redis (database 1) or real RabbitMQ. The LLM provider is
the local fake server, reached by the workers over HTTP through the OpenAI SDK. The machinery
lives in ``tests/cluster.py``, shared with the reliability suite.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from cluster import Cluster, ClusterFactory, positive_answer
from workers.llm.testing import FakeLLMServer


@pytest.fixture
def fake_llm() -> Iterator[FakeLLMServer]:
    """The fake LLM provider, answering 'positive' unless a test scripts otherwise."""
    with FakeLLMServer(positive_answer) as server:
        yield server


@pytest.fixture
def make_cluster(
    trained_model, tmp_path: Path, fake_llm: FakeLLMServer
) -> Iterator[Callable[..., Cluster]]:
    """A factory of clusters over a broker, torn down (workers and keys) after the test."""
    factory = ClusterFactory(trained_model.directory, tmp_path, fake_llm)
    yield factory.make
    factory.close()
