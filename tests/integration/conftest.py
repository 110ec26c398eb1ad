"""Real worker processes for the distributed tests: Celery BERT and LLM workers as subprocesses.

Each test gets its own queues, key prefix and decisions stream, so tests never see each
other's messages; the broker is real Redis (database 1) or real RabbitMQ. The LLM provider is
the local fake server, reached by the workers over HTTP through the OpenAI SDK.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import kombu
import pytest
import redis

from policies.spec import Escalation, example_policy
from workers.llm.testing import FakeLLMServer
from workers.settings import Settings

BROKERS = {
    "redis": "redis://127.0.0.1:6379/1",
    "rabbitmq": "amqp://guest:guest@127.0.0.1:5672//",
}


@dataclass
class Cluster:
    """A tiergate deployment on this machine: settings, environment and worker processes."""

    settings: Settings
    env: dict[str, str]
    logs: Path
    processes: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def start_worker(self, queue: str, concurrency: int = 1) -> subprocess.Popen[bytes]:
        """Start ``tiergate worker --queue <queue>`` in its own process group."""
        command = [sys.executable, "-m", "gateway", "worker", "--queue", queue]
        command += ["--concurrency", str(concurrency)]
        with (self.logs / f"{queue}-{len(self.processes)}.log").open("wb") as log:
            process = subprocess.Popen(
                command,
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.processes.append(process)
        return process

    def kill(self, process: subprocess.Popen[bytes]) -> None:
        """SIGKILL a worker and every process it forked."""
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=10)

    def stop_all(self) -> None:
        """Stop every worker still running."""
        for process in self.processes:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)
        deadline = time.monotonic() + 10
        for process in self.processes:
            if process.poll() is None:
                try:
                    process.wait(timeout=max(0.1, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    os.killpg(process.pid, signal.SIGKILL)

    def log_text(self) -> str:
        """Everything the workers wrote, for failure messages."""
        return "\n".join(p.read_text(errors="replace")[-3000:] for p in self.logs.glob("*.log"))


@pytest.fixture
def fake_llm() -> Iterator[FakeLLMServer]:
    """The fake LLM provider, answering 'positive' unless a test scripts otherwise."""
    with FakeLLMServer(_positive) as server:
        yield server


def _positive(_body: dict) -> dict:
    return {"label": "positive"}


@pytest.fixture
def make_cluster(
    trained_model, tmp_path: Path, fake_llm: FakeLLMServer
) -> Iterator[Callable[..., Cluster]]:
    """A factory of clusters over a broker, torn down (workers and keys) after the test."""
    made: list[Cluster] = []

    def make(broker: str = "redis", **overrides: str) -> Cluster:
        name = f"itest-{uuid.uuid4().hex[:12]}"
        policy = example_policy("rotten-tomatoes").with_escalation(
            Escalation(min_probability=0.9), version="itest"
        )
        policy_file = tmp_path / f"{name}.yaml"
        policy_file.write_text(policy.to_yaml())
        values = {
            "TIERGATE_BROKER_URL": BROKERS[broker],
            "TIERGATE_REDIS_URL": "redis://127.0.0.1:6379/0",
            "TIERGATE_CACHE_PREFIX": name,
            "TIERGATE_BERT_QUEUE": f"{name}.bert",
            "TIERGATE_LLM_QUEUE": f"{name}.llm",
            "TIERGATE_DECISIONS_STREAM": f"{name}:decisions",
            "TIERGATE_MODEL_DIR": str(trained_model.directory),
            "TIERGATE_DATA_DIR": str(tmp_path / "data"),
            "TIERGATE_POLICY_FILES": f'["{policy_file}"]',
            "TIERGATE_OPENAI_API_KEY": "test-key",
            "TIERGATE_OPENAI_BASE_URL": fake_llm.openai_base_url,
            "TIERGATE_LLM_MAX_RETRIES": "0",
            "TIERGATE_VISIBILITY_TIMEOUT_S": "10",
            "TIERGATE_REDELIVER_AFTER_S": "15",
            "TIERGATE_BERT_FLUSH_EVERY": "16",
            "TIERGATE_LOG_LEVEL": "WARNING",
            **overrides,
        }
        env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith("TIERGATE_") and not k.endswith("_API_KEY")
        }
        env.update(values)
        fields = {k.removeprefix("TIERGATE_").lower(): v for k, v in values.items()}
        fields["policy_files"] = [policy_file]  # type: ignore[assignment]
        settings = Settings(**fields)
        logs = tmp_path / f"{name}-logs"
        logs.mkdir()
        cluster = Cluster(settings=settings, env=env, logs=logs)
        made.append(cluster)
        return cluster

    yield make
    client = redis.Redis(host="127.0.0.1", port=6379)
    for cluster in made:
        cluster.stop_all()
        if cluster.settings.broker_url and cluster.settings.broker_url.startswith("amqp"):
            with kombu.Connection(cluster.settings.broker_url) as connection:
                channel = connection.channel()
                for queue in (cluster.settings.bert_queue, cluster.settings.llm_queue):
                    with contextlib.suppress(Exception):
                        channel.queue_delete(queue)
        prefix = cluster.settings.cache_prefix
        for db in (0, 1):
            scoped = redis.Redis(host="127.0.0.1", port=6379, db=db)
            keys = list(scoped.scan_iter(match=f"{prefix}*"))
            if keys:
                scoped.delete(*keys)
            scoped.close()
    client.close()
