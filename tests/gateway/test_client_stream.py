"""``TiergateClient.stream`` against a Redis of the test's own that is restarted mid-stream."""

from __future__ import annotations

import queue
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry
from structlog.testing import capture_logs

from gateway.client import TiergateClient
from policies.routing import Reason
from workers.delivery import RedisDecisionLedger
from workers.schemas import Decision, Tier
from workers.settings import Settings


class PrivateRedis:
    """A ``redis-server`` without persistence on a free port, restartable on that port."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = int(probe.getsockname()[1])
        self.process: subprocess.Popen[bytes] | None = None

    def client(self) -> redis.Redis:
        """A client with short timeouts and no retries of its own (so SHUTDOWN returns at once)."""
        return redis.Redis(
            port=self.port, socket_timeout=2, socket_connect_timeout=2, retry=Retry(NoBackoff(), 0)
        )

    def start(self) -> None:
        """Start the server and wait until it answers PING."""
        command = ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1"]
        command += ["--save", "", "--appendonly", "no", "--dir", str(self.directory)]
        self.process = subprocess.Popen(
            command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        deadline = time.monotonic() + 10
        while True:
            try:
                with self.client() as probe:
                    probe.ping()
            except redis.ConnectionError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
            else:
                return

    def restart(self) -> None:
        """``SHUTDOWN NOSAVE`` (everything in memory is lost), then start on the same port."""
        with self.client() as admin:
            admin.shutdown(nosave=True)
        assert self.process is not None
        self.process.wait(timeout=10)
        self.start()

    def stop(self) -> None:
        """Kill the server if it runs."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[PrivateRedis]:
    """A started Redis of this test's own, killed afterwards."""
    server = PrivateRedis(tmp_path)
    server.start()
    yield server
    server.stop()


def decision(message_id: str) -> Decision:
    """A minimal BERT decision for ``message_id``."""
    return Decision(
        id=message_id,
        label="positive",
        labels=["positive"],
        scores={"positive": 0.9, "negative": 0.1},
        tier=Tier.BERT,
        reason=Reason.CONFIDENT,
        chunks=1,
        model_version="m",
        policy="p",
    )


def test_stream_survives_a_redis_restart_and_recreates_the_lost_group(private_redis):
    """A consumer blocked in the stream rides out a restart and yields a later decision."""
    settings = Settings(
        redis_url=f"redis://127.0.0.1:{private_redis.port}/0", broker_url="memory://"
    )
    client = TiergateClient.from_settings(settings)
    received: queue.Queue[str | BaseException] = queue.Queue()

    def consume() -> None:
        try:
            stream = client.stream(
                group="billing", consumer="c1", block_ms=200, reconnect_timeout_s=10
            )
            for item in stream:
                received.put(item.id)
                if item.id == "after":
                    return
        except Exception as exc:  # noqa: BLE001 -- handed to the test thread to fail on
            received.put(exc)

    with capture_logs() as logs:
        consumer = threading.Thread(target=consume, daemon=True)
        consumer.start()
        try:
            client.ledger.deliver(decision("before"))
            assert received.get(timeout=10) == "before"
            private_redis.restart()
            with private_redis.client() as fresh:
                RedisDecisionLedger.from_settings(settings, fresh).deliver(decision("after"))
            assert received.get(timeout=15) == "after"
            consumer.join(timeout=5)
        finally:
            client.ledger.client.close()
    events = [entry["event"] for entry in logs]
    assert "stream.redis_unavailable" in events
    assert "stream.group_recreated" in events
