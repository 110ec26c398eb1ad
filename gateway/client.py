"""The Python producer and consumer client of a distributed tiergate.

:class:`TiergateClient` publishes messages through the broker by task name (it never imports
the model) and reads decisions from the delivery ledger in Redis::

    client = TiergateClient.from_settings(Settings())
    ids = client.submit_many([Message(text="Where is my parcel?")])
    decisions = client.wait_many(ids, timeout_s=10)

    for decision in client.stream(group="billing-consumers", consumer="worker-1"):
        ...  # every decision, once per consumer group, acknowledged after the loop body

Waiting blocks on a per-id reply list in Redis (``BLPOP``), so nothing polls. The stream
reconnects, with backoff, when Redis restarts, and recreates a consumer group the restart lost.
"""

from __future__ import annotations

import contextlib
import json
import socket
import time
from collections.abc import Iterator, Sequence
from typing import Any

import redis
import structlog
from celery import Celery

from tiergate.policies.spec import PolicySpec, load_policy
from tiergate.workers.bert.manifest import read_manifest
from tiergate.workers.cache import RedisDecisionCache
from tiergate.workers.cascade import load_policy_book
from tiergate.workers.errors import ModelError, PoliciesNotAnnouncedError
from tiergate.workers.labels import CollectedExample, Corrections, RedisLabelStore
from tiergate.workers.ledger import IdReused, RedisDecisionLedger
from tiergate.workers.schemas import Decision, Message
from tiergate.workers.served_policies import ServedPolicies
from tiergate.workers.settings import Settings
from tiergate.workers.tasks import CLASSIFY_TASK, create_celery_app

log = structlog.get_logger(__name__)


class TiergateClient:
    """Submit messages to tiergate's workers and read their decisions.

    Needs ``settings.broker_url`` (where tasks go) and ``settings.redis_url`` (where decisions
    are recorded and streamed). Thread-safe.
    """

    def __init__(self, settings: Settings, app: Celery, ledger: RedisDecisionLedger) -> None:
        self.settings = settings
        self.app = app
        self.ledger = ledger
        self.served = ServedPolicies(ledger.client, settings.cache_prefix)

    @classmethod
    def from_settings(cls, settings: Settings) -> TiergateClient:
        """A client over the broker and Redis that ``settings`` name."""
        if settings.redis_url is None:
            raise ValueError("the client reads decisions from Redis: set TIERGATE_REDIS_URL")
        return cls(
            settings, create_celery_app(settings), RedisDecisionLedger.from_settings(settings)
        )

    def submit(self, message: Message) -> str:
        """Publish one message; returns its id."""
        return self.submit_many([message])[0]

    def submit_many(self, messages: Sequence[Message]) -> list[str]:
        """Publish messages (one task each, on one broker connection); returns their ids.

        Each message is first recorded as accepted in Redis, so that one the broker loses is
        found by the workers' sweep and published again.
        """
        self.ledger.accept(
            {m.id: json.dumps({"message": m.model_dump(mode="json")}) for m in messages}
        )
        with self.app.producer_or_acquire() as producer:
            for message in messages:
                self.app.send_task(
                    CLASSIFY_TASK,
                    kwargs={"message": message.model_dump(mode="json")},
                    queue=self.settings.bert_queue,
                    producer=producer,
                )
        return [message.id for message in messages]

    def get_many(self, ids: Sequence[str]) -> list[Decision | None]:
        """The decisions recorded so far for ``ids`` (``None`` where not answered yet)."""
        return self.ledger.get_many(ids)

    def wait(self, message_id: str, timeout_s: float) -> Decision | None:
        """Block until ``message_id`` is answered, or ``None`` after ``timeout_s``."""
        return self.ledger.wait(message_id, timeout_s)

    def wait_many(self, ids: Sequence[str], timeout_s: float) -> list[Decision | None]:
        """Block until every id is answered or the shared ``timeout_s`` passes.

        By id alone: an id answered for another text gives that text's decision. Use
        :meth:`wait_for` to tell.
        """
        deadline = time.monotonic() + timeout_s
        found = self.ledger.get_many(ids)
        for index, message_id in enumerate(ids):
            if found[index] is None:
                found[index] = self.ledger.wait(message_id, max(0.0, deadline - time.monotonic()))
        return found

    def answers_for(self, messages: Sequence[Message]) -> list[Decision | IdReused | None]:
        """Each message's decision so far (``None`` where not answered yet).

        :class:`~tiergate.workers.ledger.IdReused` where its id was answered for another text:
        the workers dead-letter such a message instead of answering it.
        """
        return self.ledger.answers_for(messages)

    def wait_for(
        self, messages: Sequence[Message], timeout_s: float
    ) -> list[Decision | IdReused | None]:
        """:meth:`wait_many` for messages, telling an id answered for another text (IdReused)."""
        deadline = time.monotonic() + timeout_s
        found = self.ledger.answers_for(messages)
        for index, message in enumerate(messages):
            if found[index] is None:
                left = max(0.0, deadline - time.monotonic())
                found[index] = self.ledger.wait_for(message, left)
        return found

    def dead_letter_counts(self) -> dict[str, int]:
        """Dead letters written, by kind (see :class:`~tiergate.workers.ledger.DeadLetterKind`)."""
        return self.ledger.dead_letter_counts()

    def feedback(
        self,
        message_id: str,
        label: str | None = None,
        labels: Sequence[str] | None = None,
        source: str | None = None,
    ) -> CollectedExample:
        """A person's correction of the decision of ``message_id``; the example as now stored.

        Give ``label``, or ``labels`` for a multi-label policy (not both); ``source`` says who
        (an agent's id). Written straight to the label store in Redis, where the workers
        record decisions of policies that collect labels; the cached decision of the text is
        deleted, so the next identical message is decided afresh. Raises
        :class:`~tiergate.workers.errors.UnknownDecisionError` for an id with no collected
        decision and :class:`~tiergate.workers.errors.LabelNotInPolicyError` for labels its
        policy cannot take (both are ``InputError``), ``ValueError`` for both or neither of
        ``label`` and ``labels``.
        """
        if (label is None) == (labels is None):
            raise ValueError("give either label or labels (one of them)")
        given = [label] if label is not None else list(labels or [])
        corrections = Corrections(
            RedisLabelStore(self.ledger.client, self.settings.cache_prefix),
            RedisDecisionCache(self.ledger.client, self.settings.cache_prefix),
        )
        return corrections.correct(message_id, given, source)

    def stream(
        self,
        *,
        group: str,
        consumer: str | None = None,
        block_ms: int = 2000,
        count: int = 100,
        start: str = "0",
        stop_after_idle: bool = False,
        reconnect_timeout_s: float = 60.0,
    ) -> Iterator[Decision]:
        """Every decision on the decisions stream, once per consumer ``group``.

        Creates the group (reading from ``start``: ``"0"`` for the whole stream, ``"$"`` for
        new entries) if needed. An entry is acknowledged after the caller's loop body for it
        returns, so a consumer that crashes gets its unacknowledged entries again. With
        ``stop_after_idle`` the iterator ends when nothing arrives within ``block_ms`` (keep it
        below the Redis client's socket timeout, 5 s by default, or an idle wait times out).

        A Redis restart does not end the iterator. Connection errors and timeouts are retried
        with exponential backoff (0.1 s doubling to at most 5 s) and raised once Redis has been
        unreachable for ``reconnect_timeout_s``; after reconnecting, this consumer's own
        unacknowledged entries are read first (one whose acknowledgement was lost comes again).
        A group that vanished with the restart (``NOGROUP``: Redis kept no data) is created
        again from ``"0"``, so no decision written after the restart is missed.
        """
        client = self.ledger.client
        name = consumer or f"{socket.gethostname()}-{id(self):x}"
        stream = self.ledger.stream
        backoff = _Backoff(reconnect_timeout_s)

        def wait_for_redis(exc: redis.RedisError) -> None:
            """Sleep before the next try; raise ``exc`` once Redis has been gone too long."""
            delay = backoff.next_delay()
            if delay is None:
                raise exc
            log.warning(
                "stream.redis_unavailable",
                stream=stream,
                group=group,
                error=str(exc),
                retry_in_s=delay,
            )
            time.sleep(delay)

        create_from: str | None = start  # (re)create the group from this id before reading
        pending_first = True
        while True:
            # First our own unacknowledged entries (after a crash or reconnect), then new ones.
            read_from = "0" if pending_first else ">"
            try:
                if create_from is not None:
                    _create_group(client, stream, group, create_from)
                    create_from = None
                batches: Any = client.xreadgroup(
                    group,
                    name,
                    {stream: read_from},
                    count=count,
                    block=None if pending_first else block_ms,
                )
            except redis.ResponseError as exc:
                if "NOGROUP" not in str(exc):
                    raise
                log.warning("stream.group_recreated", stream=stream, group=group)
                create_from = "0"
                continue
            except (redis.ConnectionError, redis.TimeoutError) as exc:
                wait_for_redis(exc)
                pending_first = True
                continue
            backoff.reset()
            entries: list[tuple[Any, dict[Any, Any]]] = [
                entry for _, items in batches or [] for entry in items
            ]
            if pending_first and not entries:
                pending_first = False
                continue
            if not entries and stop_after_idle:
                return
            for entry_id, fields in entries:
                raw = fields.get(b"decision") or fields.get("decision")
                if raw is not None:
                    yield Decision.model_validate_json(raw)
                try:
                    client.xack(stream, group, entry_id)
                except (redis.ConnectionError, redis.TimeoutError) as exc:
                    # This entry and the rest of the batch stay pending: read again after.
                    wait_for_redis(exc)
                    pending_first = True
                    break

    def policies(self) -> list[PolicySpec]:
        """The policies the BERT workers serve, the default first.

        What a worker announced when it built its cascade (:class:`ServedPolicies`). Before any
        has, the choice a worker would make with this client's settings:
        ``settings.policy_files``, else the policies that fit the model at
        ``settings.resolved_model_dir`` when this process can read its manifest. Raises
        :class:`~tiergate.workers.errors.PoliciesNotAnnouncedError` when neither is known.
        """
        announced = self.served.read()
        if announced is not None:
            return list(announced.policies)
        if self.settings.policy_files:
            return [load_policy(path) for path in self.settings.policy_files]
        try:
            manifest = read_manifest(self.settings.resolved_model_dir, verify=False)
        except ModelError as exc:
            raise PoliciesNotAnnouncedError(
                "no BERT worker has announced the policies it serves yet, no policy files are "
                f"set (TIERGATE_POLICY_FILES) and the model cannot be read here ({exc})"
            ) from None
        return list(
            load_policy_book(self.settings, manifest.labels, multi_label=manifest.multi_label)
        )

    def ready(self) -> dict[str, bool]:
        """Whether the broker and Redis answer."""
        status = {"redis": False, "broker": False}
        with contextlib.suppress(redis.RedisError):
            status["redis"] = bool(self.ledger.client.ping())
        try:
            with self.app.connection_for_write() as connection:
                connection.ensure_connection(max_retries=1, timeout=2)
                status["broker"] = True
        except Exception as exc:  # noqa: BLE001 -- any broker failure means "not ready"
            log.warning("broker.unreachable", error=str(exc))
        return status

    def queue_depths(self) -> dict[str, int]:
        """Messages waiting per queue (declared passively; missing queues count as 0)."""
        depths: dict[str, int] = {}
        with self.app.connection_for_read() as connection, connection.channel() as channel:
            for queue in (self.settings.bert_queue, self.settings.llm_queue):
                try:
                    _, count, _ = channel.queue_declare(queue=queue, passive=True)
                except Exception:  # noqa: BLE001 -- a queue nobody declared yet is empty
                    count = 0
                depths[queue] = int(count)
        return depths


def _create_group(client: redis.Redis, stream: str, group: str, start: str) -> None:
    """Create consumer ``group`` on ``stream`` (and the stream) from ``start``, unless it exists."""
    try:
        client.xgroup_create(stream, group, id=start, mkstream=True)
    except redis.ResponseError as exc:
        if "BUSYGROUP" not in str(exc):
            raise


class _Backoff:
    """The delays between tries while Redis is unreachable: 0.1 s, doubling, at most 5 s.

    ``next_delay`` returns ``None`` once the outage (from the first delay asked since the last
    ``reset``) has lasted ``limit_s``: time to give up.
    """

    FIRST_S = 0.1
    MAX_S = 5.0

    def __init__(self, limit_s: float) -> None:
        self._limit_s = limit_s
        self._since: float | None = None
        self._delay = self.FIRST_S

    def next_delay(self) -> float | None:
        """Seconds to wait before the next try, or ``None`` when the outage lasted too long."""
        now = time.monotonic()
        if self._since is None:
            self._since = now
        if now - self._since >= self._limit_s:
            return None
        delay = self._delay
        self._delay = min(2 * delay, self.MAX_S)
        return delay

    def reset(self) -> None:
        """Redis answered: the next outage starts from the first delay again."""
        self._since = None
        self._delay = self.FIRST_S
