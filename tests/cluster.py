"""Real tiergate deployments on this machine, for the integration and reliability suites.

A :class:`ClusterFactory` makes :class:`Cluster` objects: settings and an environment with
their own queues, key prefix and decisions stream (so tests never see each other's messages),
over a real broker (Redis database 1 or RabbitMQ) and real Redis, with Celery BERT and LLM
workers started as subprocesses (``python -m tiergate worker --queue bert|llm``). The LLM
provider is the local fake server, reached by the workers over HTTP through the OpenAI SDK.
The shared fixtures (``make_cluster``, ``fake_llm``, ``private_redis``) in ``tests/conftest.py``
build on it.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self

import kombu
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from tiergate.gateway.client import TiergateClient
from tiergate.policies.routing import Reason
from tiergate.policies.spec import BudgetSpec, Escalation, PolicySpec, Task, example_policy
from tiergate.workers.errors import TransientError
from tiergate.workers.llm.testing import FakeLLMServer, first_label_answer
from tiergate.workers.schemas import Decision, Message, Tier
from tiergate.workers.settings import Settings

BROKERS = {
    "redis": "redis://127.0.0.1:6379/1",
    "rabbitmq": "amqp://guest:guest@127.0.0.1:5672//",
}

# How long a process or thread of these suites may take to start or stop. Generous: a loaded
# 2-core runner can take many seconds, and on a healthy one nothing waits this long.
START_STOP_S = 60

SENTINEL_ID = "sentinel"
SENTINEL_TEXT = "A last message, sent after every other one."


def default_test_policy(min_probability: float = 0.9) -> PolicySpec:
    """The shipped Rotten Tomatoes policy with a 0.9 threshold (a third go to the LLM)."""
    return example_policy("rotten-tomatoes").with_escalation(
        Escalation(min_probability=min_probability), version="itest"
    )


def positive_answer(body: dict[str, Any]) -> dict[str, Any]:
    """The fake LLM's answer in these suites: always ``positive``, with a text if one is asked."""
    return {**first_label_answer(body), "label": "positive"}


def bert_decision(message_id: str, label: str = "positive") -> Decision:
    """A minimal confident BERT decision for ``message_id`` (ledger and stream tests)."""
    return Decision(
        id=message_id,
        label=label,
        labels=[label],
        scores={"positive": 0.9, "negative": 0.1},
        tier=Tier.BERT,
        reason=Reason.CONFIDENT,
        chunks=1,
        model_version="m",
        policy="p",
    )


# Real held-out snippets would do as well; these are short, varied and give both tiers work.
FILM_SNIPPETS = [
    "A gorgeous, heartfelt film that earns every tear.",
    "Two hours I will never get back.",
    "A retired detective returns to his home town to solve one last case.",
    "Not bad, not great; the second half drags but the leads are charming.",
    "The plot follows three sisters who inherit a failing vineyard in Napa.",
    "An ambitious mess, occasionally brilliant, mostly exhausting.",
    "Sharp, funny and far smarter than it has any right to be.",
    "A young boxer from Philadelphia gets a shot at the heavyweight title.",
]


@dataclass
class Cluster:
    """A tiergate deployment on this machine: settings, environment and worker processes."""

    settings: Settings
    env: dict[str, str]
    logs: Path
    processes: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def start_worker(self, queue: str, concurrency: int = 1) -> subprocess.Popen[bytes]:
        """Start ``tiergate worker --queue <queue>`` in its own process group."""
        command = [sys.executable, "-m", "tiergate", "worker", "--queue", queue]
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
        process.wait(timeout=START_STOP_S)

    def stop_all(self) -> None:
        """Stop every worker still running."""
        for process in self.processes:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)
        deadline = time.monotonic() + START_STOP_S
        for process in self.processes:
            if process.poll() is None:
                try:
                    process.wait(timeout=max(0.1, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    os.killpg(process.pid, signal.SIGKILL)

    def warm_up(self, client: TiergateClient, text: str) -> None:
        """Have one message answered end to end, so every worker is up before a clock starts."""
        warm = Message(id="warm-up", text=text)
        client.submit(warm)
        assert client.wait(warm.id, timeout_s=120) is not None, self.log_text()

    def send_sentinel(self, client: TiergateClient, timeout_s: float = 600) -> Decision:
        """Submit a sentinel message after everything else; its decision, once answered.

        Its task (``explain``) sends it through the LLM step as well, and both queues are
        FIFO: once it is answered, each worker has taken the work published before it on either
        queue, such as a redelivered copy that would answer an id a second time. Tests check
        for duplicates after this, not after a sleep that a slow machine can outlast. Its id
        is ``SENTINEL_ID`` and its text ``SENTINEL_TEXT``, so that tests can leave it out.
        """
        sentinel = Message(id=SENTINEL_ID, text=SENTINEL_TEXT, task=Task.EXPLAIN)
        client.submit(sentinel)
        decision = client.wait(sentinel.id, timeout_s=timeout_s)
        assert decision is not None, f"the sentinel was not answered\n{self.log_text()}"
        return decision

    def log_text(self) -> str:
        """Everything the workers wrote, for failure messages."""
        return "\n".join(p.read_text(errors="replace")[-3000:] for p in self.logs.glob("*.log"))

    def log_events(self, event: str) -> int:
        """How many times the workers logged ``event`` (structlog's JSON lines)."""
        needle = f'"event": "{event}"'
        return sum(p.read_text(errors="replace").count(needle) for p in self.logs.glob("*.log"))


def process_tree_rss_kib(pid: int) -> int:
    """Resident memory (``VmRSS``, KiB) of a process and all its descendants; 0 once gone."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            # The command name (2nd field) may hold spaces; the parent id follows its ')'.
            after_name = stat.read_text().rsplit(")", 1)[1].split()
            children.setdefault(int(after_name[1]), []).append(int(stat.parent.name))
    total, todo = 0, [pid]
    while todo:
        current = todo.pop()
        todo += children.get(current, [])
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{current}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
    return total


class ClusterFactory:
    """Makes clusters over one trained model and one fake LLM; :meth:`close` tears them down.

    Teardown stops every worker, deletes the clusters' RabbitMQ queues and every key under
    their prefixes in the shared Redis (databases 0 and 1).
    """

    def __init__(self, model_dir: Path, tmp_path: Path, fake_llm: FakeLLMServer) -> None:
        self.model_dir = model_dir
        self.tmp_path = tmp_path
        self.fake_llm = fake_llm
        self.made: list[Cluster] = []

    def make(
        self, broker: str = "redis", *, policy: PolicySpec | None = None, **overrides: str
    ) -> Cluster:
        """A cluster over ``broker`` (``redis`` or ``rabbitmq``); ``overrides`` are env vars.

        The policy is ``policy``, by default the shipped Rotten Tomatoes one with a 0.9
        threshold, so that about a third of the messages go to the LLM.
        """
        name = f"itest-{uuid.uuid4().hex[:12]}"
        if policy is None:
            policy = default_test_policy()
        policy_file = self.tmp_path / f"{name}.yaml"
        policy_file.write_text(policy.to_yaml())
        values = {
            "TIERGATE_BROKER_URL": BROKERS[broker],
            "TIERGATE_REDIS_URL": "redis://127.0.0.1:6379/0",
            "TIERGATE_CACHE_PREFIX": name,
            "TIERGATE_BERT_QUEUE": f"{name}.bert",
            "TIERGATE_LLM_QUEUE": f"{name}.llm",
            "TIERGATE_DECISIONS_STREAM": f"{name}:decisions",
            "TIERGATE_MODEL_DIR": str(self.model_dir),
            "TIERGATE_DATA_DIR": str(self.tmp_path / "data"),
            "TIERGATE_POLICY_FILES": f'["{policy_file}"]',
            "TIERGATE_OPENAI_API_KEY": "test-key",
            "TIERGATE_OPENAI_BASE_URL": self.fake_llm.openai_base_url,
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
        fields: dict[str, Any] = {k.removeprefix("TIERGATE_").lower(): v for k, v in values.items()}
        fields["policy_files"] = [Path(p) for p in json.loads(values["TIERGATE_POLICY_FILES"])]
        settings = Settings(**fields)
        logs = self.tmp_path / f"{name}-logs"
        logs.mkdir()
        cluster = Cluster(settings=settings, env=env, logs=logs)
        self.made.append(cluster)
        return cluster

    def close(self) -> None:
        """Stop every cluster's workers and delete its queues and keys."""
        for cluster in self.made:
            cluster.stop_all()
            if cluster.settings.broker_url and cluster.settings.broker_url.startswith("amqp"):
                with kombu.Connection(cluster.settings.broker_url) as connection:
                    channel = connection.channel()
                    for queue in (cluster.settings.bert_queue, cluster.settings.llm_queue):
                        with contextlib.suppress(Exception):
                            channel.queue_delete(queue)
            for db in (0, 1):
                delete_keys(f"{cluster.settings.cache_prefix}*", db=db)


def delete_keys(pattern: str, db: int = 0) -> None:
    """Delete every key of the local Redis (database ``db``) that matches ``pattern``."""
    client = redis.Redis(host="127.0.0.1", port=6379, db=db)
    try:
        keys = list(client.scan_iter(match=pattern))
        if keys:
            client.delete(*keys)
    finally:
        client.close()


class BackgroundLoop:
    """A context manager running ``_run`` in a daemon thread until the block ends.

    ``_run`` polls ``self._stop`` (a :class:`threading.Event`) and returns once it is set.
    """

    def __init__(self, name: str) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.stop()

    def stop(self) -> None:
        """Ask ``_run`` to return and wait, a bounded time, for the thread to end."""
        self._stop.set()
        self._thread.join(timeout=START_STOP_S)

    @property
    def stopped(self) -> bool:
        """Whether the thread has ended."""
        return not self._thread.is_alive()

    def _run(self) -> None:
        raise NotImplementedError


class StreamTail(BackgroundLoop):
    """Reads a decisions stream continuously in a background thread, as a consumer would.

    ``XREAD`` from the last entry id seen, so every entry is read once, with the time it was
    read. Redis going away is survived: errors are counted, and reading resumes from the last
    id once Redis answers again (a Redis restarted without persistence starts an empty stream,
    and its new ids are later than any seen before, so nothing new is skipped).
    """

    def __init__(self, redis_url: str, stream: str) -> None:
        super().__init__("stream-tail")
        self.redis_url = redis_url
        self.stream = stream
        self.errors = 0
        self.last_id = "0"
        self._entries: list[tuple[str, float, Decision]] = []
        self._lock = threading.Lock()

    def _run(self) -> None:
        client = redis.Redis.from_url(self.redis_url, socket_timeout=5, socket_connect_timeout=2)
        while not self._stop.is_set():
            try:
                batches: Any = client.xread({self.stream: self.last_id}, count=1000, block=500)
            except redis.RedisError:
                self.errors += 1
                self._stop.wait(0.2)
                continue
            now = time.monotonic()
            read = []
            last = self.last_id
            for _, items in batches or []:
                for entry_id, fields in items:
                    last = entry_id.decode()
                    decision = Decision.model_validate_json(fields[b"decision"])
                    read.append((fields[b"id"].decode(), now, decision))
            with self._lock:
                self._entries += read
                self.last_id = last
        client.close()

    def entries(self) -> list[tuple[str, float, Decision]]:
        """``(message id, monotonic time read, decision)`` of every entry read so far."""
        with self._lock:
            return list(self._entries)

    def ids(self) -> list[str]:
        """The message ids read so far, in stream order (repeats included)."""
        with self._lock:
            return [message_id for message_id, _, _ in self._entries]

    def wait_for(self, ids: Collection[str], timeout_s: float) -> set[str]:
        """Wait until every id in ``ids`` was read or ``timeout_s`` passed; the ids missing."""
        wanted = set(ids)
        deadline = time.monotonic() + timeout_s
        while True:
            missing = wanted - set(self.ids())
            if not missing or time.monotonic() > deadline:
                return missing
            time.sleep(0.2)


class Producer(BackgroundLoop):
    """Submits new messages in chunks at a steady pace until stopped, as a real producer would.

    Message ``n`` is ``<prefix>-<n>`` with the ``n``-th of ``texts`` (numbered once they run
    out). A chunk is accepted when ``submit_many`` returns; one refused (``TransientError``,
    such as Redis down) is counted in ``refused`` and submitted again, and the pace resumes
    from then on rather than catching up. Otherwise chunks are due on a fixed schedule, so a
    slow submit is made up for. With ``tail`` and ``max_backlog``: while that many accepted
    messages are not yet on the stream, one chunk a second goes out instead, so that a slow
    machine does not pile up a backlog it cannot drain, yet the producer keeps submitting (and
    so meets an outage). A failure other than a refusal ends the thread, kept in ``error``.
    """

    def __init__(
        self,
        client: TiergateClient,
        texts: list[str],
        per_s: float,
        *,
        prefix: str = "p",
        chunk: int = 10,
        tail: StreamTail | None = None,
        max_backlog: int | None = None,
    ) -> None:
        super().__init__("producer")
        self.client = client
        self.texts = texts
        self.interval_s = chunk / per_s
        self.prefix = prefix
        self.chunk = chunk
        self.tail = tail
        self.max_backlog = max_backlog
        self.refused = 0
        self.error: BaseException | None = None
        self._accepted: list[tuple[str, float]] = []  # (id, when accepted), in order
        self._lock = threading.Lock()

    def _text(self, number: int) -> str:
        text = self.texts[number % len(self.texts)]
        return text if number < len(self.texts) else f"{text} (#{number})"

    def _backlogged(self) -> bool:
        if self.tail is None or self.max_backlog is None:
            return False
        accepted = self.accepted()
        return len(accepted) - len(set(accepted).intersection(self.tail.ids())) >= self.max_backlog

    def _run(self) -> None:
        try:
            due = time.monotonic()
            for start in itertools.count(0, self.chunk):
                if self._stop.wait(max(0.0, due - time.monotonic())):
                    return
                chunk = [
                    Message(id=f"{self.prefix}-{n}", text=self._text(n))
                    for n in range(start, start + self.chunk)
                ]
                while True:
                    try:
                        self.client.submit_many(chunk)
                        break
                    except TransientError:
                        self.refused += 1
                        if self._stop.wait(0.2):
                            return
                        due = time.monotonic()
                now = time.monotonic()
                with self._lock:
                    self._accepted += [(m.id, now) for m in chunk]
                due += 1.0 if self._backlogged() else self.interval_s
        except BaseException as exc:  # reported by the test, not lost in the thread
            self.error = exc
            raise

    def accepted(self) -> list[str]:
        """The ids accepted so far, in order (an id accepted twice would be here twice)."""
        with self._lock:
            return [message_id for message_id, _ in self._accepted]

    def accepted_at(self) -> dict[str, float]:
        """When each id accepted so far was accepted (``time.monotonic()``)."""
        with self._lock:
            return dict(self._accepted)


def wait_until(
    condition: Callable[[], bool], timeout_s: float, cluster: Cluster, what: str
) -> float:
    """Poll ``condition`` until it holds; seconds it took. Fails naming ``what``, with the logs."""
    started = time.monotonic()
    while not condition():
        if time.monotonic() - started > timeout_s:
            raise AssertionError(f"not within {timeout_s:g} s: {what}\n{cluster.log_text()}")
        time.sleep(0.1)
    return time.monotonic() - started


def unlimited_policy(min_probability: float = 0.9) -> PolicySpec:
    """The test policy with no LLM budget, so that every routed message is put to the LLM."""
    return default_test_policy(min_probability).model_copy(update={"budget": BudgetSpec()})


class RedisServer:
    """A ``redis-server`` of this test's own, on a free port, without persistence.

    It can be shut down (``SHUTDOWN NOSAVE``) and started again on the same port, so a test
    can take Redis away from a cluster without touching the shared Redis on 6379.
    """

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = int(probe.getsockname()[1])
        self.process: subprocess.Popen[bytes] | None = None
        self.starts = 0

    @property
    def url(self) -> str:
        """The URL of database 0."""
        return f"redis://127.0.0.1:{self.port}/0"

    def client(self) -> redis.Redis:
        """A client with short timeouts and no retries of its own (SHUTDOWN returns at once)."""
        return redis.Redis(
            host="127.0.0.1",
            port=self.port,
            socket_timeout=2,
            socket_connect_timeout=2,
            retry=Retry(NoBackoff(), 0),
        )

    def start(self) -> None:
        """Start the server and wait until it answers PING."""
        command = ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1"]
        command += ["--save", "", "--appendonly", "no", "--dir", str(self.directory)]
        with (self.directory / f"redis-{self.starts}.log").open("wb") as log:
            self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        self.starts += 1
        deadline = time.monotonic() + START_STOP_S
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

    def shutdown(self) -> None:
        """``SHUTDOWN NOSAVE``: everything in memory is gone; wait for the process to exit."""
        with self.client() as admin:
            admin.shutdown(nosave=True)
        if self.process is not None:
            self.process.wait(timeout=START_STOP_S)
            self.process = None

    def stop(self) -> None:
        """Kill the server if it runs."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=START_STOP_S)
        self.process = None
