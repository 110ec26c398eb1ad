"""`tiergate dead-letters`: operators read the dead letters and replay those that hold a message."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys

import redis

from tiergate.workers.ledger import RedisDecisionLedger
from tiergate.workers.settings import Settings

BROKER_DB = 1


def _environment(prefix: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TIERGATE_")}
    env.update(
        {
            "TIERGATE_REDIS_URL": "redis://127.0.0.1:6379/0",
            "TIERGATE_BROKER_URL": f"redis://127.0.0.1:6379/{BROKER_DB}",
            "TIERGATE_CACHE_PREFIX": prefix,
            "TIERGATE_BERT_QUEUE": f"{prefix}:bert",
            "TIERGATE_LLM_QUEUE": f"{prefix}:llm",
        }
    )
    return env


def _tiergate(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tiergate", "dead-letters", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )


def test_replay_republishes_messages_and_keeps_what_is_not_one(redis_prefix):
    """Letters holding a message go back to the BERT queue; the others stay, listed."""
    env = _environment(redis_prefix)
    ledger = RedisDecisionLedger.from_settings(
        Settings(redis_url=env["TIERGATE_REDIS_URL"], cache_prefix=redis_prefix)
    )
    ledger.dead_letter({"id": "m-1", "text": "Lost to a missing policy"}, "unknown policy 'x'")
    ledger.dead_letter(
        {"message": {"id": "m-2", "text": "Gave up after retries"}, "attempt": 5},
        "gave up after 6 attempts: Redis unreachable",
    )
    ledger.dead_letter({"webhook": "http://hook", "decision": "m-0"}, "webhook gave up")
    ledger.dead_letter({"text": "   "}, "not a message: text is empty")
    broker = redis.Redis(host="127.0.0.1", port=6379, db=BROKER_DB)
    try:
        listed = _tiergate(env, "list", "--json")
        assert listed.returncode == 0, listed.stderr
        reasons = [json.loads(line)["reason"] for line in listed.stdout.splitlines()]
        assert reasons[0] == "not a message: text is empty"  # newest first
        assert len(reasons) == 4

        replayed = _tiergate(env, "replay")
        assert replayed.returncode == 0, replayed.stderr
        assert "replayed 2 message(s); kept 2" in replayed.stderr
        queued = [json.loads(raw) for raw in broker.lrange(f"{redis_prefix}:bert", 0, -1)]
        bodies = [json.loads(base64.b64decode(task["body"])) for task in queued]
        assert sorted(body[1]["message"]["id"] for body in bodies) == ["m-1", "m-2"]
        left = sorted(entry["reason"] for entry in ledger.dead_letters())
        assert left == ["not a message: text is empty", "webhook gave up"]
        assert ledger.client.zscore(ledger.accepted_key, "m-1") is not None

        table = _tiergate(env, "list")
        assert table.returncode == 0, table.stderr
        assert "2 dead letter(s)" in table.stdout
    finally:
        broker.delete(f"{redis_prefix}:bert")
        broker.close()


def test_dead_letters_need_redis():
    """Without TIERGATE_REDIS_URL the command says what is missing and exits 2."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TIERGATE_")}
    result = _tiergate(env, "list")
    assert result.returncode == 2
    assert "TIERGATE_REDIS_URL" in result.stderr
