"""`tiergate batches list`, run as a user runs it, over batches recorded in the local Redis."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import redis

from tiergate.policies.routing import Reason
from tiergate.policies.spec import LabelSpec, LLMSpec, PolicySpec, ProviderRef
from tiergate.workers.batches import BatchStore, WaitingItem
from tiergate.workers.cascade import LLMWork
from tiergate.workers.schemas import Message
from tiergate.workers.testing import FixedScoreClassifier

SPEC = PolicySpec(
    name="films",
    version="1",
    labels=[LabelSpec(name="negative"), LabelSpec(name="positive")],
    llm=LLMSpec(
        providers=[ProviderRef(provider="openai", model="gpt-4o-mini")],
        mode="batch",
        max_batch=2,
    ),
)


def run(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    """``python -m tiergate <args>`` with ``env`` and no other TIERGATE_ variable."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("TIERGATE_")}
    return subprocess.run(
        [sys.executable, "-m", "tiergate", *args],
        env={**base, **env},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def queue(store: BatchStore, *ids: str) -> None:
    """Queue LLM work for messages ``ids`` of SPEC, as the LLM step does."""
    classifier = FixedScoreClassifier(("negative", "positive"), {}, default=(0.5, 0.5))
    for message_id in ids:
        message = Message(id=message_id, text=f"text of {message_id}", policy="films")
        work = LLMWork(
            message=message,
            prediction=classifier.predict([message.text])[0],
            policy="films",
            reason=Reason.LOW_CONFIDENCE,
            key=f"key-{message_id}",
        )
        assert store.enqueue(WaitingItem(work=work))


def test_batches_list_shows_claimed_batches_and_waiting_work(redis_prefix):
    """A batch is listed with its state, size and age; work still waiting is counted apart."""
    store = BatchStore(redis.Redis(host="127.0.0.1", port=6379), redis_prefix)
    queue(store, "a", "b")
    assert store.claim(SPEC) is not None
    queue(store, "c")
    env = {"TIERGATE_REDIS_URL": "redis://127.0.0.1:6379/0", "TIERGATE_CACHE_PREFIX": redis_prefix}
    listed = run("batches", "list", "--json", **env)
    assert listed.returncode == 0, listed.stderr
    lines = [json.loads(line) for line in listed.stdout.splitlines()]
    assert lines[0]["policy"] == "films"
    assert lines[0]["state"] == "claimed"
    assert lines[0]["age_s"] >= 0
    assert lines[1] == {**lines[1], "waiting": True, "policy": "films", "messages": 1}
    table = run("batches", "list", **env)
    assert table.returncode == 0, table.stderr
    assert "1 outstanding batch(es)" in table.stdout
    assert "films: 1 message(s) waiting" in table.stdout


def test_batches_list_without_redis_is_a_usage_error():
    """Without TIERGATE_REDIS_URL the command says what to set and exits 2, no traceback."""
    result = run("batches", "list")
    assert result.returncode == 2
    assert "TIERGATE_REDIS_URL" in result.stderr
    assert "Traceback" not in result.stderr
