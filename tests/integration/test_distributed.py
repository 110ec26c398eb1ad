"""The distributed path with real parts: broker, Redis, worker processes, HTTP to the fake LLM."""

from __future__ import annotations

import json
import time

import pytest

from cluster import FILM_SNIPPETS, SENTINEL_ID, SENTINEL_TEXT
from tiergate.gateway.client import TiergateClient
from tiergate.workers.ledger import RedisDecisionLedger, held_message_id
from tiergate.workers.llm.testing import message_of
from tiergate.workers.schemas import Message, Tier
from tiergate.workers.tasks import CLASSIFY_TASK, create_celery_app

# Messages in flight when a BERT worker is killed.
KILLED_MID_BATCH = 3000


def messages(count: int, prefix: str = "m") -> list[Message]:
    """``count`` messages cycling through FILM_SNIPPETS, ids ``<prefix>-<n>``."""
    return [
        Message(id=f"{prefix}-{i}", text=FILM_SNIPPETS[i % len(FILM_SNIPPETS)])
        for i in range(count)
    ]


def stream_ids(client: TiergateClient) -> list[str]:
    """The message ids of every entry on the cluster's decisions stream, in order."""
    entries = client.ledger.client.xrange(client.ledger.stream)
    return [fields[b"id"].decode() for _, fields in entries]


def wait_for_stream(client: TiergateClient, count: int, timeout_s: float) -> list[str]:
    """Stream ids once at least ``count`` entries arrived (or the timeout passed)."""
    deadline = time.monotonic() + timeout_s
    ids = stream_ids(client)
    while len(ids) < count and time.monotonic() < deadline:
        time.sleep(0.2)
        ids = stream_ids(client)
    return ids


@pytest.mark.parametrize("broker", ["redis", "rabbitmq"])
def test_messages_flow_through_bert_and_llm_workers_to_the_stream(make_cluster, fake_llm, broker):
    """Every message gets one decision on the stream; routed ones are answered by the LLM."""
    cluster = make_cluster(broker)
    cluster.start_worker("bert", concurrency=2)
    cluster.start_worker("llm", concurrency=4)
    client = TiergateClient.from_settings(cluster.settings)
    sent = messages(40)
    client.submit_many(sent)
    # The bound includes the workers' start (cold) on a loaded machine.
    decisions = client.wait_many([m.id for m in sent], timeout_s=300)
    assert all(d is not None for d in decisions), cluster.log_text()
    assert sorted(stream_ids(client)) == sorted(m.id for m in sent)
    by_tier = {tier: [d for d in decisions if d and d.tier is tier] for tier in Tier}
    assert by_tier[Tier.BERT], "the policy lets confident answers stand"
    assert by_tier[Tier.LLM], "the 0.9 threshold sends some to the LLM"
    assert {d.label for d in by_tier[Tier.LLM]} == {"positive"}
    # Eight distinct texts: the LLM is asked at most once per distinct routed text.
    routed_texts = {m.text for m, d in zip(sent, decisions, strict=True) if d.tier is Tier.LLM}
    assert fake_llm.calls == len(routed_texts)


def test_same_id_submitted_twice_is_answered_once(make_cluster):
    """A resubmitted id gets no second decision on the stream."""
    cluster = make_cluster()
    cluster.start_worker("bert")
    cluster.start_worker("llm")
    client = TiergateClient.from_settings(cluster.settings)
    batch = messages(10, prefix="dup")
    client.submit_many(batch)
    first = client.wait_many([m.id for m in batch], timeout_s=300)
    assert all(first), cluster.log_text()
    client.submit_many(batch)
    # One process per worker: a second answer would be on the stream before the sentinel's.
    cluster.send_sentinel(client)
    ids = stream_ids(client)
    assert sorted(ids) == sorted([m.id for m in batch] + [SENTINEL_ID])


def test_poison_message_goes_to_the_dead_letters_with_its_reason(make_cluster):
    """A payload that is not a message is never lost: it is kept with the reason."""
    cluster = make_cluster()
    cluster.start_worker("bert")
    app = create_celery_app(cluster.settings)
    app.send_task(
        CLASSIFY_TASK, kwargs={"message": {"text": "   "}}, queue=cluster.settings.bert_queue
    )
    app.send_task(
        CLASSIFY_TASK,
        kwargs={"message": {"text": "fine", "policy": "nope"}},
        queue=cluster.settings.bert_queue,
    )
    ledger = RedisDecisionLedger.from_settings(cluster.settings)
    deadline = time.monotonic() + 300
    letters = ledger.dead_letters()
    while len(letters) < 2 and time.monotonic() < deadline:
        time.sleep(0.2)
        letters = ledger.dead_letters()
    reasons = sorted(letter["reason"] for letter in letters)
    assert len(reasons) == 2, cluster.log_text()
    assert "unknown policy 'nope'" in reasons[1]
    assert "empty or only whitespace" in reasons[0]


@pytest.mark.parametrize("broker", ["rabbitmq", "redis"])
def test_worker_killed_mid_batch_loses_nothing_and_pays_no_llm_call_twice(
    make_cluster, fake_llm, broker
):
    """SIGKILL a BERT worker mid-stream; a new one finishes: each id once, no LLM call repeated.

    RabbitMQ redelivers a dead consumer's unacknowledged messages at once; the Redis broker
    restores them after the visibility timeout (10 s here).
    """
    # The Redis broker can lose a message the killed worker had popped but not yet recorded as
    # unacknowledged; the overdue sweep publishes it again after 60 s, well inside the wait
    # below. A backlog still being worked on at that point is republished too, harmlessly.
    cluster = make_cluster(broker, TIERGATE_REDELIVER_AFTER_S="60")
    fake_llm.latency_s = 0.05
    client = TiergateClient.from_settings(cluster.settings)
    # Many more than the 20 answered before the kill, so the kill comes mid-stream even when
    # the next poll comes late or the machine is fast.
    sent = messages(KILLED_MID_BATCH, prefix="k")
    client.submit_many(sent)
    cluster.start_worker("llm", concurrency=4)
    victim = cluster.start_worker("bert", concurrency=2)
    partial = wait_for_stream(client, 20, timeout_s=300)
    assert partial, cluster.log_text()
    cluster.kill(victim)
    answered_before = len(stream_ids(client))
    cluster.start_worker("bert", concurrency=2)
    decisions = client.wait_many([m.id for m in sent], timeout_s=600)
    missing = [m.id for m, d in zip(sent, decisions, strict=True) if d is None]
    assert not missing, cluster.log_text()
    # A second decision or LLM call would come before the sentinel's.
    cluster.send_sentinel(client)
    ids = [i for i in stream_ids(client) if i != SENTINEL_ID]
    assert len(ids) == len(set(ids)) == KILLED_MID_BATCH
    assert answered_before < KILLED_MID_BATCH, "the kill happened mid-stream"
    routed_texts = {m.text for m, d in zip(sent, decisions, strict=True) if d.tier is Tier.LLM}
    calls = [r for r in fake_llm.requests if message_of(r.body) != SENTINEL_TEXT]
    assert len(calls) == len(routed_texts)


def test_submit_command_publishes_a_file_and_reports_every_line(make_cluster, tmp_path):
    """`tiergate submit` sends a JSONL file through the broker and writes each line's answer."""
    import json
    import subprocess
    import sys

    cluster = make_cluster()
    cluster.start_worker("bert")
    cluster.start_worker("llm")
    data = tmp_path / "in.jsonl"
    lines = [
        json.dumps({"id": f"s-{i}", "text": FILM_SNIPPETS[i % len(FILM_SNIPPETS)]})
        for i in range(12)
    ]
    lines.insert(5, '{"id": "broken", "text": ""}')
    data.write_text("\n".join(lines) + "\n")
    out = tmp_path / "out.jsonl"
    result = subprocess.run(
        # The bound includes the workers' start (cold) on a loaded machine.
        [sys.executable, "-m", "tiergate", "submit", str(data), "-o", str(out), "--timeout", "300"],
        env=cluster.env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert result.returncode == 1, result.stderr  # one record rejected
    answers = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(answers) == 13
    assert answers[5] == {"line": 6, "error": "'text': text is empty or only whitespace"}
    assert [a["id"] for a in answers if "id" in a] == [f"s-{i}" for i in range(12)]
    assert "rejected line 6: 'text': text is empty or only whitespace" in result.stderr
    assert "13 messages: 12 answered, 1 rejected" in result.stderr


def test_submit_counts_a_message_not_answered_in_time_as_rejected(make_cluster, tmp_path):
    """With no worker running, each message times out: an error line in place, and exit 1."""
    import subprocess
    import sys

    cluster = make_cluster()
    data = tmp_path / "in.jsonl"
    data.write_text(
        "".join(json.dumps({"id": f"t-{i}", "text": FILM_SNIPPETS[i]}) + "\n" for i in range(3))
    )
    out = tmp_path / "out.jsonl"
    result = subprocess.run(
        [sys.executable, "-m", "tiergate", "submit", str(data), "-o", str(out), "--timeout", "1"],
        env=cluster.env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 1, result.stderr
    answers = [json.loads(line) for line in out.read_text().splitlines()]
    assert answers == [{"id": f"t-{i}", "error": "not answered in time"} for i in range(3)]
    assert "rejected t-2: not answered in time" in result.stderr
    assert "3 messages: 0 answered, 3 rejected" in result.stderr


def test_http_to_broker_to_both_workers_to_the_stream(make_cluster, fake_llm):
    """The full path: HTTP gateway (distributed mode) → broker → BERT and LLM workers → stream."""
    import socket
    import threading

    import httpx2 as httpx
    import uvicorn

    from tiergate.gateway.http import create_app

    # /v1/classify waits for workers that may still be starting on a loaded machine.
    cluster = make_cluster(TIERGATE_REQUEST_TIMEOUT_S="300")
    cluster.start_worker("bert", concurrency=2)
    cluster.start_worker("llm", concurrency=4)
    client = TiergateClient.from_settings(cluster.settings)
    app = create_app(cluster.settings, client=client)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 60
        while not server.started:
            assert thread.is_alive(), "the gateway failed to start"
            assert time.monotonic() < deadline, "the gateway did not start within 60 s"
            time.sleep(0.05)
        body = {
            "messages": [
                {"id": f"h-{i}", "text": FILM_SNIPPETS[i]} for i in range(len(FILM_SNIPPETS))
            ]
        }
        response = httpx.post(f"http://127.0.0.1:{port}/v1/classify", json=body, timeout=360)
        assert response.status_code == 200, response.text
        decisions = response.json()["decisions"]
        assert [d["id"] for d in decisions] == [f"h-{i}" for i in range(len(FILM_SNIPPETS))]
        tiers = {d["tier"] for d in decisions}
        assert tiers == {"bert", "llm"}, cluster.log_text()
        accepted = httpx.post(
            f"http://127.0.0.1:{port}/v1/messages",
            json={"text": "One more, answered later.", "id": "h-async"},
            timeout=60,
        )
        assert accepted.status_code == 202
        assert client.wait("h-async", timeout_s=300) is not None
        fetched = httpx.get(f"http://127.0.0.1:{port}/v1/messages/h-async", timeout=60)
        assert fetched.status_code == 200
        assert sorted(stream_ids(client)) == sorted([d["id"] for d in decisions] + ["h-async"])
    finally:
        server.should_exit = True
        thread.join(timeout=60)


def test_policy_webhook_gets_each_decision_signed_with_retries(make_cluster, tmp_path):
    """A webhook that fails twice still receives the decision, signed, on the third attempt."""
    import hashlib
    import hmac
    import json
    import threading
    import uuid
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from tiergate.policies.spec import Escalation, WebhookSpec, example_policy

    received: list[tuple[bytes, str]] = []

    class Hook(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["Content-Length"]))
            received.append((body, self.headers.get("X-Tiergate-Signature", "")))
            self.send_response(500 if len(received) <= 2 else 204)
            self.end_headers()

        def log_message(self, *args) -> None:
            """Quiet."""

    server = ThreadingHTTPServer(("127.0.0.1", 0), Hook)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    policy = example_policy("rotten-tomatoes").model_copy(
        update={
            "escalation": Escalation(min_probability=0.0),
            "webhook": WebhookSpec(url=f"http://127.0.0.1:{server.server_port}/hook"),
        }
    )
    policy_file = tmp_path / "hooked.yaml"
    policy_file.write_text(policy.to_yaml())
    secret = uuid.uuid4().hex
    cluster = make_cluster(
        TIERGATE_POLICY_FILES=json.dumps([str(policy_file)]), TIERGATE_WEBHOOK_SECRET=secret
    )
    cluster.start_worker("bert")
    cluster.start_worker("llm")
    client = TiergateClient.from_settings(cluster.settings)
    client.submit(Message(id="hooked", text=FILM_SNIPPETS[0]))
    assert client.wait("hooked", timeout_s=300) is not None, cluster.log_text()
    deadline = time.monotonic() + 120
    while len(received) < 3 and time.monotonic() < deadline:
        time.sleep(0.1)
    server.shutdown()
    server.server_close()
    assert len(received) == 3, cluster.log_text()
    body, signature = received[-1]
    assert json.loads(body)["id"] == "hooked"
    expected = hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()
    assert signature == f"sha256={expected}"


def test_a_message_the_broker_lost_is_published_again_and_answered(make_cluster):
    """Accepted but never reaching a worker (as when a broker loses it): the sweep resends it."""
    cluster = make_cluster()
    cluster.start_worker("bert")
    client = TiergateClient.from_settings(cluster.settings)
    lost = Message(id="lost-in-transit", text=FILM_SNIPPETS[2])
    client.ledger.accept({lost.id: json.dumps({"message": lost.model_dump(mode="json")})})
    started = time.monotonic()
    decision = client.wait(lost.id, timeout_s=300)
    assert decision is not None, cluster.log_text()
    assert time.monotonic() - started >= 10  # only once it was overdue (15 s here)
    assert stream_ids(client) == [lost.id]


def test_a_plain_producer_s_extra_scalar_fields_travel_as_metadata(make_cluster):
    """Plain Celery's extra scalar fields reach metadata; a nested one is dead-lettered, named.

    The producer uses no tiergate code, as one in another language would; it stamps no publish
    time, so the decision has ``total`` but no ``queued``.
    """
    from celery import Celery

    cluster = make_cluster("rabbitmq")
    cluster.start_worker("bert")
    cluster.start_worker("llm")  # the policy may route the message to the LLM
    plain = Celery("plain-producer", broker=cluster.settings.broker_url)
    try:
        for message in (
            {"id": "c3-bad-extra", "text": "A fine film.", "lang": "en"},
            {"id": "c3-nested", "text": "A fine film.", "tags": {"genre": "drama"}},
        ):
            plain.send_task(
                CLASSIFY_TASK, kwargs={"message": message}, queue=cluster.settings.bert_queue
            )
    finally:
        plain.close()
    client = TiergateClient.from_settings(cluster.settings)
    decision = client.wait("c3-bad-extra", timeout_s=300)
    assert decision is not None, cluster.log_text()
    assert decision.metadata == {"lang": "en"}
    assert "total" in decision.timings_ms
    assert "queued" not in decision.timings_ms
    letters = client.ledger.dead_letters()
    deadline = time.monotonic() + 60
    while not letters and time.monotonic() < deadline:
        time.sleep(0.2)
        letters = client.ledger.dead_letters()
    assert len(letters) == 1, cluster.log_text()
    assert "c3-nested" in json.dumps(letters[0]["payload"])
    assert "tags" in letters[0]["reason"]
    assert "must be a JSON scalar" in letters[0]["reason"]


@pytest.mark.parametrize("broker", ["redis", "rabbitmq"])
def test_distributed_decisions_carry_total_and_queued_timings(make_cluster, fake_llm, broker):
    """Distributed decisions' ``total`` covers their steps and ``queued`` their wait.

    ``total`` is at least the steps' timings (BERT, then LLM for routed ones); messages
    published before any BERT worker started were queued at least until then; and queued plus
    total fit in the time from publish to answer.
    """
    cluster = make_cluster(broker)
    fake_llm.latency_s = 0.05
    client = TiergateClient.from_settings(cluster.settings)
    sent = messages(16, prefix="t")
    before_submit = time.monotonic()
    client.submit_many(sent)
    submitted = time.monotonic()
    cluster.start_worker("llm", concurrency=2)
    bert_started = time.monotonic()  # no worker can take a message before this
    cluster.start_worker("bert")
    decisions = client.wait_many([m.id for m in sent], timeout_s=300)
    answered = time.monotonic()
    assert all(d is not None for d in decisions), cluster.log_text()
    slack_ms = 5.0  # rounding, and the wall clock against the monotonic one
    for decision in decisions:
        timings = decision.timings_ms
        steps = sum(timings.get(step, 0.0) for step in ("cache", "bert", "llm"))
        assert timings["total"] + slack_ms >= steps, timings
        assert timings["queued"] + slack_ms >= (bert_started - submitted) * 1000, timings
        end_to_end_ms = (answered - before_submit) * 1000
        assert timings["queued"] + timings["total"] <= end_to_end_ms + slack_ms, timings
    llm_answers = [d for d in decisions if d.tier is Tier.LLM and "llm" in d.timings_ms]
    assert llm_answers, "the 0.9 threshold sends some to the LLM"
    for decision in llm_answers:
        timings = decision.timings_ms
        assert timings["total"] + slack_ms >= timings["bert"] + timings["llm"], timings


def test_a_plain_producer_s_mistakes_are_dead_lettered_whole_counted_and_logged(make_cluster):
    """Wrong task arguments and reused ids from a plain Celery producer go to the dead letters.

    No tiergate code publishes: a wrong keyword, two positional arguments and an LLM task with a
    wrong keyword are dead-lettered with their arguments and a reason naming the keyword; a
    single positional message is answered; an id reused for another text is dead-lettered (the
    same text: answered once, nothing kept). Each is counted by kind and logged once.
    """
    from celery import Celery

    from tiergate.workers.ledger import IdReused
    from tiergate.workers.tasks import LLM_TASK

    cluster = make_cluster("rabbitmq")
    cluster.start_worker("bert")
    cluster.start_worker("llm")
    bert, llm = cluster.settings.bert_queue, cluster.settings.llm_queue
    plain = Celery("plain-producer", broker=cluster.settings.broker_url)
    try:
        plain.send_task(
            CLASSIFY_TASK, kwargs={"msg": {"id": "kw-1", "text": FILM_SNIPPETS[0]}}, queue=bert
        )
        plain.send_task(
            CLASSIFY_TASK, args=[{"id": "two-1", "text": FILM_SNIPPETS[1]}, 3], queue=bert
        )
        plain.send_task(LLM_TASK, kwargs={"job": {"id": "llm-1"}}, queue=llm)
        plain.send_task(CLASSIFY_TASK, args=[{"id": "pos-1", "text": FILM_SNIPPETS[2]}], queue=bert)
    finally:
        plain.close()
    client = TiergateClient.from_settings(cluster.settings)
    assert client.wait("pos-1", timeout_s=300) is not None, cluster.log_text()

    first = Message(id="q-1", text=FILM_SNIPPETS[3])
    client.submit(first)
    assert client.wait_for([first], timeout_s=300)[0] is not None, cluster.log_text()
    client.submit(first)  # the same text again: answered before, nothing to keep
    other = Message(id="q-1", text=FILM_SNIPPETS[4])
    client.submit(other)
    assert client.wait_for([other], timeout_s=10) == [IdReused("q-1")]

    expected = {"wrong_arguments": 3, "id_reused": 1}
    deadline = time.monotonic() + 300
    while client.dead_letter_counts() != expected and time.monotonic() < deadline:
        time.sleep(0.2)
    assert client.dead_letter_counts() == expected, cluster.log_text()
    cluster.send_sentinel(client)  # anything still in flight is through the workers by now
    assert client.dead_letter_counts() == expected
    by_id = {held_message_id(letter["payload"]): letter for letter in client.ledger.dead_letters()}
    assert set(by_id) == {"kw-1", "two-1", "llm-1", "q-1"}, by_id
    assert by_id["kw-1"]["payload"] == {
        "args": [],
        "kwargs": {"msg": {"id": "kw-1", "text": FILM_SNIPPETS[0]}},
    }
    assert "expected keyword argument 'message'" in by_id["kw-1"]["reason"]
    assert "'msg'" in by_id["kw-1"]["reason"]
    assert by_id["two-1"]["payload"]["args"] == [{"id": "two-1", "text": FILM_SNIPPETS[1]}, 3]
    assert "expected keyword argument 'work'" in by_id["llm-1"]["reason"]
    assert by_id["q-1"]["kind"] == "id_reused"
    assert by_id["q-1"]["payload"]["message"]["text"] == FILM_SNIPPETS[4]
    assert "'q-1'" in by_id["q-1"]["reason"]
    assert client.get_many(["q-1"])[0].label is not None
    assert stream_ids(client).count("q-1") == 1
    assert cluster.log_events("dead_letter.kept") == 4
