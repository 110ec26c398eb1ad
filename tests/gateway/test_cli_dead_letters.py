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
            "COLUMNS": "200",  # the table's columns whole, not wrapped
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
    ledger.dead_letter(
        {"id": "m-1", "text": "Lost to a missing policy"},
        "unknown policy 'x'",
        kind="unknown_policy",
    )
    ledger.dead_letter(
        {"message": {"id": "m-2", "text": "Gave up after retries"}, "attempt": 5},
        "gave up after 6 attempts: Redis unreachable",
        kind="gave_up",
    )
    ledger.dead_letter(
        {"webhook": "http://hook", "decision": "m-0"}, "webhook gave up", kind="webhook_gave_up"
    )
    ledger.dead_letter({"text": "   "}, "not a message: text is empty", kind="not_a_message")
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


def _ledger(env: dict[str, str]) -> RedisDecisionLedger:
    return RedisDecisionLedger.from_settings(
        Settings(redis_url=env["TIERGATE_REDIS_URL"], cache_prefix=env["TIERGATE_CACHE_PREFIX"])
    )


def test_list_shows_the_message_id_of_every_letter_that_holds_one(redis_prefix):
    """Invalid messages, wrong task arguments and raw task bodies all show their message id."""
    env = _environment(redis_prefix)
    ledger = _ledger(env)
    raw = json.dumps([[], {"message": {"id": "raw-1", "text": "hi"}}, {}])
    ledger.dead_letter(
        {"message": {"id": "bad-1", "text": "  "}, "attempt": 0},
        "not a message: text: Value error, text is empty or only whitespace",
        kind="not_a_message",
    )
    ledger.dead_letter(
        {"args": [], "kwargs": {"msg": {"id": "kw-1", "text": "hi"}}},
        "wrong arguments: expected keyword argument 'message'",
        kind="wrong_arguments",
    )
    ledger.dead_letter(
        {"task": "tiergate.clasify", "body": raw}, "unknown task", kind="unknown_task"
    )
    ledger.dead_letter({"webhook": "http://hook", "decision": "m-0"}, "gave up", kind="gave_up")
    table = _tiergate(env, "list")
    assert table.returncode == 0, table.stderr
    cells = [[c.strip() for c in line.split("│")[1:-1]] for line in table.stdout.splitlines()]
    rows = {row[3]: row for row in cells if len(row) == 5}
    assert {"bad-1", "kw-1", "raw-1", "-"} <= set(rows)
    assert rows["kw-1"][2] == "wrong_arguments"
    assert rows["bad-1"][4] == "no"  # an id, but no message to replay
    assert rows["raw-1"][4] == "yes"
    listed = _tiergate(env, "list", "--json")
    ids = [json.loads(line)["message_id"] for line in listed.stdout.splitlines()]
    assert ids == [None, "raw-1", "kw-1", "bad-1"]


def test_show_prints_whole_letters_and_discard_removes_them(redis_prefix):
    """`show` prints every letter of an id in full; `discard` removes by id or by kind."""
    env = _environment(redis_prefix)
    ledger = _ledger(env)
    long_text = "word " * 3000
    ledger.dead_letter(
        {"id": "s-1", "text": long_text}, "unknown policy 'x'", kind="unknown_policy"
    )
    ledger.dead_letter({"id": "s-2", "text": "x"}, "unknown policy 'x'", kind="unknown_policy")
    ledger.dead_letter({"task": None, "body": "\x00"}, "undecodable", kind="undecodable")
    shown = _tiergate(env, "show", "s-1")
    assert shown.returncode == 0, shown.stderr
    (letter,) = [json.loads(line) for line in shown.stdout.splitlines()]
    assert letter["payload"]["text"] == long_text
    assert letter["kind"] == "unknown_policy"
    missing = _tiergate(env, "show", "nobody")
    assert missing.returncode == 2
    assert "nobody" in missing.stderr

    assert _tiergate(env, "discard", "s-1").returncode == 0
    assert _tiergate(env, "discard", "--kind", "undecodable").returncode == 0
    assert [e["payload"].get("id") for e in ledger.dead_letters()] == ["s-2"]
    neither = _tiergate(env, "discard")
    assert neither.returncode == 2
    assert "--kind" in neither.stderr
    unknown = _tiergate(env, "discard", "--kind", "bogus")
    assert unknown.returncode == 2


def test_replay_keeps_letters_whose_id_was_answered_for_another_text(redis_prefix):
    """Replaying a reused id would only reuse it again: those letters stay, counted as kept."""
    env = _environment(redis_prefix)
    ledger = _ledger(env)
    ledger.dead_letter(
        {"message": {"id": "r-1", "text": "second text"}},
        "id 'r-1' was answered before for another text",
        kind="id_reused",
    )
    broker = redis.Redis(host="127.0.0.1", port=6379, db=BROKER_DB)
    try:
        replayed = _tiergate(env, "replay")
        assert replayed.returncode == 0, replayed.stderr
        assert "replayed 0 message(s); kept 1" in replayed.stderr
        assert broker.llen(f"{redis_prefix}:bert") == 0
        assert [e["kind"] for e in ledger.dead_letters()] == ["id_reused"]
    finally:
        broker.delete(f"{redis_prefix}:bert")
        broker.close()
