"""The decision ledger: every accepted message is answered exactly once, where consumers read it.

A decision is delivered by :meth:`DecisionLedger.deliver`, which in one atomic step

1. records it under the message id (the idempotency record: a redelivered or resubmitted
   message id finds its decision and is not worked on again),
2. appends it to the decisions stream (``tiergate:decisions`` by default), which downstream
   consumers read with consumer groups, and
3. wakes whoever waits for that id (the HTTP gateway, ``tiergate.gateway.client``), through a
   short-lived reply list they block on (``BLPOP``; nobody polls).

If the id already has a decision nothing happens, so a task that crashed after delivering and
was redelivered cannot put a second entry in the stream. Messages that cannot be answered at all
(a payload that is not a message, a task that keeps failing) go to the dead-letter list with
their reason; they never vanish.

:class:`RedisDecisionLedger` is the distributed one; :class:`LocalDecisionLedger` keeps the
same contract in one process (embedded mode), without a stream.
"""

from __future__ import annotations

import json
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol, Self

import redis

from tiergate.workers.redis_connection import redis_errors_as_coordination_errors, shared_redis
from tiergate.workers.schemas import Decision
from tiergate.workers.settings import Settings

# KEYS: record, stream, reply, accepted (zset), accepted payloads (hash).
# ARGV: decision JSON, record TTL, stream maxlen, reply TTL, message id.
# Returns 1 when delivered now, 0 when the id already had a decision.
_DELIVER = """
redis.call('ZREM', KEYS[4], ARGV[5])
redis.call('HDEL', KEYS[5], ARGV[5])
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'EX', ARGV[2]) == false then
  return 0
end
redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[3], '*', 'id', ARGV[5], 'decision', ARGV[1])
redis.call('RPUSH', KEYS[3], '1')
redis.call('EXPIRE', KEYS[3], ARGV[4])
return 1
"""

# KEYS: accepted (zset), accepted payloads (hash). ARGV: cutoff time, now, limit.
# Claims accepted messages older than the cutoff by moving their time to now, so that two
# sweepers never republish the same message at once; returns id, payload, id, payload, ...
_CLAIM_OVERDUE = """
local ids = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, ARGV[3])
local out = {}
for _, id in ipairs(ids) do
  redis.call('ZADD', KEYS[1], 'XX', ARGV[2], id)
  local payload = redis.call('HGET', KEYS[2], id)
  if payload then
    table.insert(out, id)
    table.insert(out, payload)
  else
    redis.call('ZREM', KEYS[1], id)
  end
end
return out
"""

_REPLY_TTL_S = 300

# The time in epoch seconds; a ledger takes one so that tests can move it.
Clock = Callable[[], float]


def held_messages(payload: Any) -> list[dict[str, Any]]:
    """What in a dead letter's payload may be the message, most likely first.

    A BERT step's task arguments hold it under ``message``, an LLM step's under
    ``work.message``, and a payload that failed validation may be the message itself.
    """
    if not isinstance(payload, dict):
        return []
    work = payload.get("work")
    candidates = [payload.get("message"), work.get("message") if isinstance(work, dict) else None]
    return [c for c in [*candidates, payload] if isinstance(c, dict)]


class DecisionLedger(Protocol):
    """Where decisions are delivered, looked up by message id, and waited for."""

    def deliver(self, decision: Decision) -> bool:
        """Record, stream and announce ``decision``; False when its id was already answered."""
        ...

    def deliver_many(self, decisions: Sequence[Decision]) -> list[bool]:
        """:meth:`deliver` each decision, in order, in one round trip to the store."""
        ...

    def get_many(self, ids: Sequence[str]) -> list[Decision | None]:
        """The delivered decision of each id, in order (``None`` where there is none yet)."""
        ...

    def wait(self, message_id: str, timeout_s: float) -> Decision | None:
        """Block until ``message_id`` is answered or ``timeout_s`` passes (then ``None``)."""
        ...

    def dead_letter(self, payload: Any, reason: str) -> None:
        """Keep a message that cannot be answered, with the reason, for an operator."""
        ...

    def count_batch(self, size: int) -> None:
        """Count one BERT batch of ``size`` messages (the batch sizes workers really run)."""
        ...

    def accept(self, payloads: Mapping[str, str]) -> None:
        """Remember messages (id -> republish JSON) as accepted until they are answered."""
        ...

    def claim_overdue(self, older_than_s: float, limit: int = 1000) -> list[tuple[str, str]]:
        """Accepted messages unanswered for ``older_than_s``, claimed for a republish."""
        ...

    def forget(self, message_id: str) -> None:
        """Stop tracking an accepted message (it went to the dead letters)."""
        ...

    def batch_sizes(self) -> dict[int, int]:
        """How many BERT batches of each size have run."""
        ...

    def dead_letters(self, limit: int = 100) -> list[dict[str, Any]]:
        """The most recent dead letters, newest first."""
        ...


class RedisDecisionLedger:
    """The ledger in Redis: records, the decisions stream, reply lists and dead letters.

    Keys: ``{prefix}:decision-of:{id}`` (the record, with a TTL: the idempotency window),
    ``{stream}`` (the stream), ``{prefix}:reply:{id}`` (a wake-up list, five minutes) and
    ``{prefix}:dead-letters`` (a list of JSON objects with ``payload``, ``reason`` and ``at``).
    ``clock`` gives the time in epoch seconds (injectable for tests): when a message was
    accepted, when it is overdue, and a dead letter's ``at``.
    """

    def __init__(
        self,
        client: redis.Redis,
        *,
        prefix: str = "tiergate",
        stream: str = "tiergate:decisions",
        record_ttl_s: int = 7 * 24 * 3600,
        stream_maxlen: int = 1_000_000,
        clock: Clock = time.time,
    ) -> None:
        self.client = client
        self.prefix = prefix
        self.stream = stream
        self.record_ttl_s = record_ttl_s
        self.stream_maxlen = stream_maxlen
        self._clock = clock
        self._deliver = client.register_script(_DELIVER)
        self._claim_overdue = client.register_script(_CLAIM_OVERDUE)

    @classmethod
    def from_settings(cls, settings: Settings, client: redis.Redis | None = None) -> Self:
        """The ledger on ``settings.redis_url`` (or ``client``) with the configured names."""
        if client is None:
            if settings.redis_url is None:
                raise ValueError("the Redis ledger needs TIERGATE_REDIS_URL")
            client = shared_redis(settings.redis_url)
        return cls(
            client,
            prefix=settings.cache_prefix,
            stream=settings.decisions_stream,
            record_ttl_s=settings.decision_record_ttl_s,
            stream_maxlen=settings.decisions_stream_maxlen,
        )

    def record_key(self, message_id: str) -> str:
        """The Redis key of a message id's decision record."""
        return f"{self.prefix}:decision-of:{message_id}"

    def reply_key(self, message_id: str) -> str:
        """The Redis list a waiter for ``message_id`` blocks on."""
        return f"{self.prefix}:reply:{message_id}"

    @property
    def dead_letter_key(self) -> str:
        """The Redis list of dead letters."""
        return f"{self.prefix}:dead-letters"

    @property
    def accepted_key(self) -> str:
        """The sorted set of accepted, unanswered message ids, by acceptance time."""
        return f"{self.prefix}:accepted"

    @property
    def accepted_payload_key(self) -> str:
        """The hash of accepted, unanswered messages (id -> task keyword arguments, JSON)."""
        return f"{self.prefix}:accepted-payload"

    def accept(self, payloads: Mapping[str, str]) -> None:
        """Remember messages as accepted until their decision is delivered.

        ``payloads`` maps each message id to the JSON a republish needs. A message lost
        between the broker and a worker (the Redis broker can lose one a worker has popped
        but not yet recorded as unacknowledged when it is killed) is found by
        :meth:`claim_overdue` and published again.
        """
        if not payloads:
            return
        now = self._clock()
        with redis_errors_as_coordination_errors(self.client, "recording accepted messages"):
            pipe = self.client.pipeline(transaction=True)
            mapping: dict[str | bytes, str | bytes] = dict(payloads.items())
            pipe.hset(self.accepted_payload_key, mapping=mapping)  # type: ignore[arg-type]
            pipe.zadd(self.accepted_key, dict.fromkeys(payloads, now))
            pipe.execute()

    def claim_overdue(self, older_than_s: float, limit: int = 1000) -> list[tuple[str, str]]:
        """Accepted messages still unanswered after ``older_than_s``, claimed for a republish."""
        now = self._clock()
        with redis_errors_as_coordination_errors(self.client, "claiming overdue messages"):
            flat = self._claim_overdue(
                keys=[self.accepted_key, self.accepted_payload_key],
                args=[now - older_than_s, now, limit],
            )
        items = [part.decode() if isinstance(part, bytes) else str(part) for part in flat]
        return list(zip(items[::2], items[1::2], strict=True))

    def forget(self, message_id: str) -> None:
        """Stop tracking an accepted message (it went to the dead letters)."""
        with redis_errors_as_coordination_errors(self.client, "forgetting a message"):
            pipe = self.client.pipeline(transaction=True)
            pipe.zrem(self.accepted_key, message_id)
            pipe.hdel(self.accepted_payload_key, message_id)
            pipe.execute()

    def deliver(self, decision: Decision) -> bool:
        """See :meth:`DecisionLedger.deliver`; one Lua script, so it is all or nothing."""
        return self.deliver_many([decision])[0]

    def deliver_many(self, decisions: Sequence[Decision]) -> list[bool]:
        """See :meth:`DecisionLedger.deliver_many`: the script once per decision, pipelined."""
        if not decisions:
            return []
        calls = [
            (
                self.record_key(decision.id),
                self.stream,
                self.reply_key(decision.id),
                self.accepted_key,
                self.accepted_payload_key,
                decision.model_dump_json(),
                self.record_ttl_s,
                self.stream_maxlen,
                _REPLY_TTL_S,
                decision.id,
            )
            for decision in decisions
        ]
        with redis_errors_as_coordination_errors(self.client, "delivering decisions"):
            delivered = self._run_deliveries(calls)
            missed = [
                i
                for i, out in enumerate(delivered)
                if isinstance(out, redis.exceptions.NoScriptError)
            ]
            if missed:
                # Redis lost its scripts (a restart): the calls it refused did not run.
                self.client.script_load(_DELIVER)
                for i, out in zip(
                    missed, self._run_deliveries([calls[i] for i in missed]), strict=True
                ):
                    delivered[i] = out
            for out in delivered:
                if isinstance(out, Exception):
                    raise out
        return [bool(flag) for flag in delivered]

    def _run_deliveries(self, calls: list[tuple[Any, ...]]) -> list[Any]:
        """One ``EVALSHA`` of the delivery script per call, in one round trip.

        Each call's result, or its error, comes back in its place.
        A pipeline of registered scripts would first ask ``SCRIPT EXISTS``: a second round trip.
        """
        pipe = self.client.pipeline(transaction=False)
        for call in calls:
            pipe.evalsha(self._deliver.sha, 5, *call)
        return pipe.execute(raise_on_error=False)

    def get_many(self, ids: Sequence[str]) -> list[Decision | None]:
        """See :meth:`DecisionLedger.get_many`; one ``MGET``."""
        if not ids:
            return []
        with redis_errors_as_coordination_errors(self.client, "reading decisions"):
            raw = self.client.mget([self.record_key(i) for i in ids])
        return [Decision.model_validate_json(r) if r is not None else None for r in raw]

    def wait(self, message_id: str, timeout_s: float) -> Decision | None:
        """See :meth:`DecisionLedger.wait`: check the record, else block on the reply list."""
        deadline = time.monotonic() + timeout_s
        while True:
            found = self.get_many([message_id])[0]
            if found is not None:
                return found
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            # One wake-up is pushed per delivery, so a second waiter on the same id gets none:
            # blocking at most half a second at a time bounds what it can miss.
            with redis_errors_as_coordination_errors(self.client, "waiting for a decision"):
                self.client.blpop([self.reply_key(message_id)], timeout=min(0.5, max(0.01, left)))

    def dead_letter(self, payload: Any, reason: str) -> None:
        """See :meth:`DecisionLedger.dead_letter`."""
        entry = json.dumps({"payload": payload, "reason": reason, "at": self._clock()}, default=str)
        with redis_errors_as_coordination_errors(self.client, "writing a dead letter"):
            self.client.lpush(self.dead_letter_key, entry)

    def dead_letters(self, limit: int = 100) -> list[dict[str, Any]]:
        """See :meth:`DecisionLedger.dead_letters`."""
        return [entry for _, entry in self.dead_letter_entries(limit)]

    def dead_letter_entries(self, limit: int = 100) -> list[tuple[str, dict[str, Any]]]:
        """The most recent dead letters, newest first, each with its stored form.

        The stored form is what :meth:`discard_dead_letter` takes to remove that one entry.
        """
        with redis_errors_as_coordination_errors(self.client, "reading dead letters"):
            raw = self.client.lrange(self.dead_letter_key, 0, limit - 1)
        stored = [e.decode() if isinstance(e, bytes) else str(e) for e in raw]
        return [(entry, json.loads(entry)) for entry in stored]

    def discard_dead_letter(self, stored: str) -> bool:
        """Remove one dead letter, given its stored form; False when it was already gone."""
        with redis_errors_as_coordination_errors(self.client, "removing a dead letter"):
            return bool(self.client.lrem(self.dead_letter_key, 1, stored))

    @property
    def batch_sizes_key(self) -> str:
        """The Redis hash of BERT batch sizes (size -> batches)."""
        return f"{self.prefix}:bert-batch-sizes"

    def count_batch(self, size: int) -> None:
        """See :meth:`DecisionLedger.count_batch`; one ``HINCRBY``."""
        if size > 0:
            with redis_errors_as_coordination_errors(self.client, "counting a batch"):
                self.client.hincrby(self.batch_sizes_key, str(size), 1)

    def batch_sizes(self) -> dict[int, int]:
        """See :meth:`DecisionLedger.batch_sizes`."""
        with redis_errors_as_coordination_errors(self.client, "reading batch sizes"):
            raw: dict[Any, Any] = self.client.hgetall(self.batch_sizes_key)
        return {int(size): int(count) for size, count in raw.items()}


class LocalDecisionLedger:
    """The ledger in one process (embedded mode): the latest ``capacity`` decisions by id.

    There is no stream; ``deliver`` keeps the first decision of an id, as the Redis ledger
    does. ``clock`` gives the time in epoch seconds, as for :class:`RedisDecisionLedger`.
    Thread-safe.
    """

    def __init__(self, capacity: int = 100_000, *, clock: Clock = time.time) -> None:
        self.capacity = capacity
        self._clock = clock
        self._decisions: OrderedDict[str, Decision] = OrderedDict()
        self._dead: list[dict[str, Any]] = []
        self._batches: dict[int, int] = {}
        self._accepted: dict[str, tuple[float, str]] = {}
        self._changed = threading.Condition()

    def deliver(self, decision: Decision) -> bool:
        """See :meth:`DecisionLedger.deliver`."""
        with self._changed:
            self._accepted.pop(decision.id, None)
            if decision.id in self._decisions:
                return False
            self._decisions[decision.id] = decision
            while len(self._decisions) > self.capacity:
                self._decisions.popitem(last=False)
            self._changed.notify_all()
            return True

    def deliver_many(self, decisions: Sequence[Decision]) -> list[bool]:
        """See :meth:`DecisionLedger.deliver_many`."""
        return [self.deliver(decision) for decision in decisions]

    def get_many(self, ids: Sequence[str]) -> list[Decision | None]:
        """See :meth:`DecisionLedger.get_many`."""
        with self._changed:
            return [self._decisions.get(i) for i in ids]

    def wait(self, message_id: str, timeout_s: float) -> Decision | None:
        """See :meth:`DecisionLedger.wait`."""
        with self._changed:
            self._changed.wait_for(lambda: message_id in self._decisions, timeout=timeout_s)
            return self._decisions.get(message_id)

    def dead_letter(self, payload: Any, reason: str) -> None:
        """See :meth:`DecisionLedger.dead_letter`."""
        with self._changed:
            self._dead.insert(0, {"payload": payload, "reason": reason, "at": self._clock()})

    def dead_letters(self, limit: int = 100) -> list[dict[str, Any]]:
        """See :meth:`DecisionLedger.dead_letters`."""
        with self._changed:
            return list(self._dead[:limit])

    def count_batch(self, size: int) -> None:
        """See :meth:`DecisionLedger.count_batch`."""
        if size > 0:
            with self._changed:
                self._batches[size] = self._batches.get(size, 0) + 1

    def batch_sizes(self) -> dict[int, int]:
        """See :meth:`DecisionLedger.batch_sizes`."""
        with self._changed:
            return dict(self._batches)

    def accept(self, payloads: Mapping[str, str]) -> None:
        """See :meth:`DecisionLedger.accept`."""
        now = self._clock()
        with self._changed:
            for message_id, payload in payloads.items():
                self._accepted[message_id] = (now, payload)

    def claim_overdue(self, older_than_s: float, limit: int = 1000) -> list[tuple[str, str]]:
        """See :meth:`DecisionLedger.claim_overdue`."""
        now = self._clock()
        with self._changed:
            due = [
                (message_id, payload)
                for message_id, (since, payload) in self._accepted.items()
                if since <= now - older_than_s
            ][:limit]
            for message_id, payload in due:
                self._accepted[message_id] = (now, payload)
            return due

    def forget(self, message_id: str) -> None:
        """See :meth:`DecisionLedger.forget`."""
        with self._changed:
            self._accepted.pop(message_id, None)


def open_ledger(settings: Settings) -> DecisionLedger:
    """The Redis ledger when ``settings.redis_url`` is set, else an in-process one."""
    if settings.redis_url:
        return RedisDecisionLedger.from_settings(settings)
    return LocalDecisionLedger()
