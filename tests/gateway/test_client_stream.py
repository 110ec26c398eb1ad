"""``TiergateClient.stream`` against a Redis of the test's own that is restarted mid-stream."""

from __future__ import annotations

import queue
import threading
import time

from structlog.testing import capture_logs

from cluster import bert_decision
from tiergate.gateway.client import TiergateClient
from tiergate.workers.ledger import RedisDecisionLedger
from tiergate.workers.settings import Settings


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
                group="billing", consumer="c1", block_ms=200, reconnect_timeout_s=60
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
            client.ledger.deliver(bert_decision("before"))
            assert received.get(timeout=60) == "before"
            private_redis.shutdown()  # SHUTDOWN NOSAVE: the stream and its group are gone
            # Down until the consumer has noticed, however quickly a restart would have come.
            deadline = time.monotonic() + 60
            while not any(entry["event"] == "stream.redis_unavailable" for entry in list(logs)):
                assert time.monotonic() < deadline, "the consumer never noticed Redis was gone"
                time.sleep(0.01)
            private_redis.start()
            with private_redis.client() as fresh:
                RedisDecisionLedger.from_settings(settings, fresh).deliver(bert_decision("after"))
            assert received.get(timeout=60) == "after"
            consumer.join(timeout=60)
        finally:
            client.ledger.client.close()
    events = [entry["event"] for entry in logs]
    assert "stream.redis_unavailable" in events
    assert "stream.group_recreated" in events
