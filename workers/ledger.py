"""The decision ledger: every accepted message is answered exactly once, where consumers read it.

A decision is delivered by :meth:`DecisionLedger.deliver`, which in one atomic step

1. records it under the message id (the idempotency record: a redelivered or resubmitted
   message id finds its decision and is not worked on again),
2. appends it to the decisions stream (``tiergate:decisions`` by default), which downstream
   consumers read with consumer groups, and
3. wakes whoever waits for that id (the HTTP gateway, ``tiergate.gateway.client``), through a
   short-lived reply list they block on (``BLPOP``; nobody polls).

If the id already has a decision nothing happens, so a task that crashed after delivering and
was redelivered cannot put a second entry in the stream. The record keeps the SHA-256 of the
message's text beside it, so the same id sent again with another text is told apart from a
redelivery (:attr:`Delivery.ID_REUSED`, :class:`IdReused`) instead of being given the earlier
text's decision. Messages that cannot be answered at all (a payload that is not a message, a
task that keeps failing, an id reused for another text) go to the dead-letter list with their
reason and a :class:`DeadLetterKind`; they never vanish, and each is counted by kind and logged.

:class:`RedisDecisionLedger` is the distributed one; :class:`LocalDecisionLedger` keeps the
same contract in one process (embedded mode), without a stream.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from enum import Enum, StrEnum
from typing import Any, Protocol, Self, TypeVar

import redis
import structlog

from tiergate.workers.redis_connection import redis_errors_as_coordination_errors, shared_redis
from tiergate.workers.schemas import Decision, Message
from tiergate.workers.settings import Settings

log = structlog.get_logger(__name__)

# KEYS: record, stream, reply, accepted (zset), accepted payloads (hash), text hash.
# ARGV: decision JSON, record TTL, stream maxlen, reply TTL, message id, text hash ('' if none).
# Returns 1 when delivered now, 0 when the id already had a decision (for this text, or for a
# text of unknown hash), -1 when it had one for another text.
_DELIVER = """
redis.call('ZREM', KEYS[4], ARGV[5])
redis.call('HDEL', KEYS[5], ARGV[5])
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'EX', ARGV[2]) == false then
  if ARGV[6] ~= '' then
    local known = redis.call('GET', KEYS[6])
    if known and known ~= ARGV[6] then
      return -1
    end
  end
  return 0
end
if ARGV[6] ~= '' then
  redis.call('SET', KEYS[6], ARGV[6], 'EX', ARGV[2])
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
_DEAD_LETTERS_MAXLEN = 100_000

# The time in epoch seconds; a ledger takes one so that tests can move it.
Clock = Callable[[], float]


class Delivery(Enum):
    """What :meth:`DecisionLedger.deliver` did; true only for ``DELIVERED``.

    ``ANSWERED_BEFORE``: the id already had a decision, for the same text (a redelivery or a
    resubmission) or one recorded without its text's hash. ``ID_REUSED``: the id already had a
    decision for another text; the new one is not recorded.
    """

    DELIVERED = "delivered"
    ANSWERED_BEFORE = "answered_before"
    ID_REUSED = "id_reused"

    def __bool__(self) -> bool:
        return self is Delivery.DELIVERED


@dataclass(frozen=True)
class IdReused:
    """A message whose id was answered before for another text (its lookup's answer)."""

    id: str


# What a wait for a message id finds: a decision, a reused id, or nothing yet (None).
_Found = TypeVar("_Found", Decision | None, Decision | IdReused | None)


class DeadLetterKind(StrEnum):
    """Why a message was dead-lettered, as a small fixed set (the metric's label values).

    The dead letter's ``reason`` says it in full; the kind groups reasons for counting.
    """

    NOT_A_MESSAGE = "not_a_message"  # a classify payload that is not a valid message
    WRONG_ARGUMENTS = "wrong_arguments"  # a task without its expected keyword argument
    UNKNOWN_POLICY = "unknown_policy"
    ID_REUSED = "id_reused"  # an id already answered for another text
    NOT_LLM_WORK = "not_llm_work"  # an LLM step payload that is not LLM work
    GAVE_UP = "gave_up"  # transient failures outlasted the retries
    WEBHOOK_GAVE_UP = "webhook_gave_up"
    UNDECODABLE = "undecodable"  # a message body invalid in its content type
    NOT_A_TASK = "not_a_task"  # not a Celery task message
    UNKNOWN_TASK = "unknown_task"  # a task name no worker here serves
    INVALID_TASK = "invalid_task"  # e.g. a content type other than JSON
    UNANSWERED = "unanswered"  # embedded gateway: the cascade failed and nobody waits


def id_reused_reason(message_id: str) -> str:
    """The reason of the dead letter of a message whose id was answered for another text."""
    return f"id {message_id!r} was answered before for another text"


def text_digest(text: str) -> str:
    """The SHA-256 (hex) of a message's text: kept with its decision to tell a reused id."""
    return hashlib.sha256(text.encode("utf-8", errors="surrogatepass")).hexdigest()


def held_messages(payload: Any) -> list[dict[str, Any]]:
    """What in a dead letter's payload may be the message, most likely first.

    A BERT step's task arguments hold it under ``message``, an LLM step's under
    ``work.message``; a task sent with the wrong arguments keeps its ``args`` and ``kwargs``, and
    one no task could take its raw ``body`` (Celery's ``[args, kwargs, embed]`` JSON); a payload
    that failed validation may be the message itself.
    """
    if not isinstance(payload, dict):
        return []
    candidates = list(_task_arguments(payload))
    body = payload.get("body")
    if isinstance(body, str):
        try:
            decoded = json.loads(body)
        except ValueError:
            decoded = None
        if isinstance(decoded, list) and len(decoded) >= 2:
            candidates += _task_arguments({"args": decoded[0], "kwargs": decoded[1]})
    return [c for c in [*candidates, payload] if isinstance(c, dict)]


def _task_arguments(payload: dict[str, Any]) -> Iterator[Any]:
    """The values of task arguments that may be the message: by keyword first, then any."""
    kwargs = payload.get("kwargs")
    kwargs = kwargs if isinstance(kwargs, dict) else {}
    args = payload.get("args")
    args = args if isinstance(args, list) else []
    for source in (payload, kwargs):
        yield source.get("message")
        work = source.get("work")
        yield work.get("message") if isinstance(work, dict) else None
    yield from args
    yield from kwargs.values()


def held_message_id(payload: Any) -> str | None:
    """The id of the message a dead letter's payload holds, valid message or not."""
    for candidate in held_messages(payload):
        found = candidate.get("id")
        if isinstance(found, str) and found:
            return found
    return None


def _log_kept(payload: Any, reason: str, kind: DeadLetterKind) -> None:
    """One warning per dead letter kept, naming its message id: someone has to look at it."""
    log.warning(
        "dead_letter.kept", message_id=held_message_id(payload), kind=kind.value, reason=reason
    )


class DecisionLedger(Protocol):
    """Where decisions are delivered, looked up by message id, and waited for."""

    def deliver(self, decision: Decision, text: str | None = None) -> Delivery:
        """Record, stream and announce ``decision``, made for ``text``, unless its id was answered.

        The text's hash is kept with the record (none when ``text`` is ``None``), so that a later
        delivery or lookup of the same id can tell another text from a redelivery.
        """
        ...

    def deliver_many(
        self, decisions: Sequence[Decision], texts: Sequence[str | None] | None = None
    ) -> list[Delivery]:
        """:meth:`deliver` each decision with its text, in order, in one round trip to the store."""
        ...

    def get_many(self, ids: Sequence[str]) -> list[Decision | None]:
        """The delivered decision of each id, in order (``None`` where there is none yet).

        Where an id has no final decision but a pending one (status ``pending_llm``, its LLM
        answer coming in a batch; see :meth:`RedisDecisionLedger.hold_pending`), that one.
        """
        ...

    def answers_for(self, messages: Sequence[Message]) -> list[Decision | IdReused | None]:
        """Per message, its id's decision; :class:`IdReused` when made for another text.

        A decision recorded without a text hash counts as this text's (idempotent as before).
        A pending decision counts as an answer here too (as in :meth:`get_many`): its message
        is in a batch and must not be worked on again.
        """
        ...

    def wait(self, message_id: str, timeout_s: float) -> Decision | None:
        """Block until ``message_id`` is answered or ``timeout_s`` passes (then ``None``)."""
        ...

    def wait_for(self, message: Message, timeout_s: float) -> Decision | IdReused | None:
        """:meth:`wait` for ``message``'s id, telling a decision for another text (IdReused)."""
        ...

    def dead_letter(self, payload: Any, reason: str, *, kind: DeadLetterKind | str) -> None:
        """Keep a message that cannot be answered, with the reason, for an operator.

        Logs a warning naming the message id and counts it under ``kind`` (a
        :class:`DeadLetterKind` or its value; any other raises ``ValueError``).
        """
        ...

    def dead_letter_counts(self) -> dict[str, int]:
        """How many dead letters were written, by kind, since the store began counting."""
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
    ``{prefix}:text-of:{id}`` (the SHA-256 of its text, with the same TTL), ``{stream}`` (the
    stream), ``{prefix}:reply:{id}`` (a wake-up list, five minutes), ``{prefix}:pending-of:{id}``
    (a batch-mode message's pending decision, see :meth:`hold_pending`),
    ``{prefix}:dead-letters`` (a list of JSON objects with ``payload``, ``reason``, ``kind`` and
    ``at``, newest first, trimmed to ``dead_letters_maxlen``) and
    ``{prefix}:dead-letter-counts`` (a hash: kind -> dead letters written).
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
        dead_letters_maxlen: int = _DEAD_LETTERS_MAXLEN,
        clock: Clock = time.time,
    ) -> None:
        self.client = client
        self.prefix = prefix
        self.stream = stream
        self.record_ttl_s = record_ttl_s
        self.stream_maxlen = stream_maxlen
        self.dead_letters_maxlen = dead_letters_maxlen
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
            dead_letters_maxlen=settings.dead_letters_maxlen,
        )

    def record_key(self, message_id: str) -> str:
        """The Redis key of a message id's decision record."""
        return f"{self.prefix}:decision-of:{message_id}"

    def text_key(self, message_id: str) -> str:
        """The Redis key of the SHA-256 of the text a message id's decision was made for."""
        return f"{self.prefix}:text-of:{message_id}"

    def reply_key(self, message_id: str) -> str:
        """The Redis list a waiter for ``message_id`` blocks on."""
        return f"{self.prefix}:reply:{message_id}"

    def pending_key(self, message_id: str) -> str:
        """The Redis key of a message id's pending decision (its LLM answer due in a batch)."""
        return f"{self.prefix}:pending-of:{message_id}"

    def hold_pending(self, decision: Decision) -> bool:
        """Record ``decision`` (status ``pending_llm``) as its id's answer until the final one.

        It is not delivered: not on the stream, no webhook, not cached. Lookups and waiters
        see it until :meth:`deliver` records the final decision, which lookups then prefer.
        Returns false, recording nothing, when the id already has a final decision.
        """
        with redis_errors_as_coordination_errors(self.client, "recording a pending decision"):
            if self.client.exists(self.record_key(decision.id)):
                return False
            pipe = self.client.pipeline(transaction=True)
            pipe.set(
                self.pending_key(decision.id), decision.model_dump_json(), ex=self.record_ttl_s
            )
            pipe.rpush(self.reply_key(decision.id), "1")
            pipe.expire(self.reply_key(decision.id), _REPLY_TTL_S)
            pipe.execute()
        return True

    @property
    def dead_letter_key(self) -> str:
        """The Redis list of dead letters."""
        return f"{self.prefix}:dead-letters"

    @property
    def dead_letter_counts_key(self) -> str:
        """The Redis hash of dead letters written, by kind."""
        return f"{self.prefix}:dead-letter-counts"

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

    def deliver(self, decision: Decision, text: str | None = None) -> Delivery:
        """See :meth:`DecisionLedger.deliver`; one Lua script, so it is all or nothing."""
        return self.deliver_many([decision], [text])[0]

    def deliver_many(
        self, decisions: Sequence[Decision], texts: Sequence[str | None] | None = None
    ) -> list[Delivery]:
        """See :meth:`DecisionLedger.deliver_many`: the script once per decision, pipelined."""
        if not decisions:
            return []
        digests = _digests(decisions, texts)
        calls = [
            (
                self.record_key(decision.id),
                self.stream,
                self.reply_key(decision.id),
                self.accepted_key,
                self.accepted_payload_key,
                self.text_key(decision.id),
                decision.model_dump_json(),
                self.record_ttl_s,
                self.stream_maxlen,
                _REPLY_TTL_S,
                decision.id,
                digest,
            )
            for decision, digest in zip(decisions, digests, strict=True)
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
        return [_DELIVERIES[int(flag)] for flag in delivered]

    def _run_deliveries(self, calls: list[tuple[Any, ...]]) -> list[Any]:
        """One ``EVALSHA`` of the delivery script per call, in one round trip.

        Each call's result, or its error, comes back in its place.
        A pipeline of registered scripts would first ask ``SCRIPT EXISTS``: a second round trip.
        """
        pipe = self.client.pipeline(transaction=False)
        for call in calls:
            pipe.evalsha(self._deliver.sha, 6, *call)
        return pipe.execute(raise_on_error=False)

    def get_many(self, ids: Sequence[str]) -> list[Decision | None]:
        """See :meth:`DecisionLedger.get_many`; one ``MGET``."""
        if not ids:
            return []
        keys = [self.record_key(i) for i in ids] + [self.pending_key(i) for i in ids]
        with redis_errors_as_coordination_errors(self.client, "reading decisions"):
            raw = self.client.mget(keys)
        final, pending = raw[: len(ids)], raw[len(ids) :]
        return [
            Decision.model_validate_json(r) if r is not None else None
            for r in (f if f is not None else p for f, p in zip(final, pending, strict=True))
        ]

    def answers_for(self, messages: Sequence[Message]) -> list[Decision | IdReused | None]:
        """See :meth:`DecisionLedger.answers_for`; one ``MGET`` of records and text hashes."""
        if not messages:
            return []
        count = len(messages)
        keys = [self.record_key(m.id) for m in messages] + [self.text_key(m.id) for m in messages]
        keys += [self.pending_key(m.id) for m in messages]
        with redis_errors_as_coordination_errors(self.client, "reading decisions"):
            raw = self.client.mget(keys)
        digests = raw[count : 2 * count]
        records = [
            final if final is not None else pending
            for final, pending in zip(raw[:count], raw[2 * count :], strict=True)
        ]
        return [
            _answer_for(message, record, digest)
            for message, record, digest in zip(messages, records, digests, strict=True)
        ]

    def wait(self, message_id: str, timeout_s: float) -> Decision | None:
        """See :meth:`DecisionLedger.wait`: check the record, else block on the reply list."""
        return self._wait(message_id, timeout_s, lambda: self.get_many([message_id])[0])

    def wait_for(self, message: Message, timeout_s: float) -> Decision | IdReused | None:
        """See :meth:`DecisionLedger.wait_for`."""
        return self._wait(message.id, timeout_s, lambda: self.answers_for([message])[0])

    def _wait(self, message_id: str, timeout_s: float, read: Callable[[], _Found]) -> _Found:
        """``read()`` until it finds something, blocking on the id's reply list in between."""
        deadline = time.monotonic() + timeout_s
        while True:
            found = read()
            if found is not None:
                return found
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            # One wake-up is pushed per delivery, so a second waiter on the same id gets none:
            # blocking at most half a second at a time bounds what it can miss.
            with redis_errors_as_coordination_errors(self.client, "waiting for a decision"):
                self.client.blpop([self.reply_key(message_id)], timeout=min(0.5, max(0.01, left)))

    def dead_letter(self, payload: Any, reason: str, *, kind: DeadLetterKind | str) -> None:
        """See :meth:`DecisionLedger.dead_letter`: list, trim and count in one transaction."""
        checked = DeadLetterKind(kind)
        entry = json.dumps(
            {"payload": payload, "reason": reason, "kind": checked.value, "at": self._clock()},
            default=str,
        )
        with redis_errors_as_coordination_errors(self.client, "writing a dead letter"):
            pipe = self.client.pipeline(transaction=True)
            pipe.lpush(self.dead_letter_key, entry)
            pipe.ltrim(self.dead_letter_key, 0, self.dead_letters_maxlen - 1)
            pipe.hincrby(self.dead_letter_counts_key, checked.value, 1)
            pipe.execute()
        _log_kept(payload, reason, checked)

    def dead_letter_counts(self) -> dict[str, int]:
        """See :meth:`DecisionLedger.dead_letter_counts`; one ``HGETALL``."""
        with redis_errors_as_coordination_errors(self.client, "reading dead-letter counts"):
            raw: dict[Any, Any] = self.client.hgetall(self.dead_letter_counts_key)
        return {_text(kind): int(count) for kind, count in raw.items()}

    def dead_letters(self, limit: int = 100) -> list[dict[str, Any]]:
        """See :meth:`DecisionLedger.dead_letters`."""
        return [entry for _, entry in self.dead_letter_entries(limit)]

    def dead_letter_entries(self, limit: int = 100) -> list[tuple[str, dict[str, Any]]]:
        """The most recent dead letters, newest first, each with its stored form.

        The stored form is what :meth:`discard_dead_letter` takes to remove that one entry.
        """
        with redis_errors_as_coordination_errors(self.client, "reading dead letters"):
            raw = self.client.lrange(self.dead_letter_key, 0, limit - 1)
        stored = [_text(e) for e in raw]
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

    There is no stream; ``deliver`` keeps the first decision of an id (with its text's hash),
    as the Redis ledger does, and the newest ``dead_letters_maxlen`` dead letters. ``clock``
    gives the time in epoch seconds, as for :class:`RedisDecisionLedger`. Thread-safe.
    """

    def __init__(
        self,
        capacity: int = 100_000,
        *,
        dead_letters_maxlen: int = _DEAD_LETTERS_MAXLEN,
        clock: Clock = time.time,
    ) -> None:
        self.capacity = capacity
        self.dead_letters_maxlen = dead_letters_maxlen
        self._clock = clock
        # id -> (decision, SHA-256 of its text, or None when delivered without it)
        self._decisions: OrderedDict[str, tuple[Decision, str | None]] = OrderedDict()
        self._dead: list[dict[str, Any]] = []
        self._dead_counts: dict[str, int] = {}
        self._batches: dict[int, int] = {}
        self._accepted: dict[str, tuple[float, str]] = {}
        self._changed = threading.Condition()

    def deliver(self, decision: Decision, text: str | None = None) -> Delivery:
        """See :meth:`DecisionLedger.deliver`."""
        return self.deliver_many([decision], [text])[0]

    def deliver_many(
        self, decisions: Sequence[Decision], texts: Sequence[str | None] | None = None
    ) -> list[Delivery]:
        """See :meth:`DecisionLedger.deliver_many`."""
        digests = _digests(decisions, texts)
        out = []
        with self._changed:
            for decision, digest in zip(decisions, digests, strict=True):
                self._accepted.pop(decision.id, None)
                known = self._decisions.get(decision.id)
                if known is not None:
                    reused = bool(digest) and known[1] is not None and known[1] != digest
                    out.append(Delivery.ID_REUSED if reused else Delivery.ANSWERED_BEFORE)
                    continue
                self._decisions[decision.id] = (decision, digest or None)
                while len(self._decisions) > self.capacity:
                    self._decisions.popitem(last=False)
                out.append(Delivery.DELIVERED)
            self._changed.notify_all()
        return out

    def get_many(self, ids: Sequence[str]) -> list[Decision | None]:
        """See :meth:`DecisionLedger.get_many`."""
        with self._changed:
            found = [self._decisions.get(i) for i in ids]
        return [known[0] if known is not None else None for known in found]

    def answers_for(self, messages: Sequence[Message]) -> list[Decision | IdReused | None]:
        """See :meth:`DecisionLedger.answers_for`."""
        with self._changed:
            return [self._answer_for(message) for message in messages]

    def _answer_for(self, message: Message) -> Decision | IdReused | None:
        known = self._decisions.get(message.id)
        if known is None:
            return None
        decision, digest = known
        return _answer_for(message, decision, digest)

    def wait(self, message_id: str, timeout_s: float) -> Decision | None:
        """See :meth:`DecisionLedger.wait`."""
        with self._changed:
            self._changed.wait_for(lambda: message_id in self._decisions, timeout=timeout_s)
            known = self._decisions.get(message_id)
            return known[0] if known is not None else None

    def wait_for(self, message: Message, timeout_s: float) -> Decision | IdReused | None:
        """See :meth:`DecisionLedger.wait_for`."""
        with self._changed:
            self._changed.wait_for(lambda: message.id in self._decisions, timeout=timeout_s)
            return self._answer_for(message)

    def dead_letter(self, payload: Any, reason: str, *, kind: DeadLetterKind | str) -> None:
        """See :meth:`DecisionLedger.dead_letter`."""
        checked = DeadLetterKind(kind)
        entry = {"payload": payload, "reason": reason, "kind": checked.value, "at": self._clock()}
        with self._changed:
            self._dead.insert(0, entry)
            del self._dead[self.dead_letters_maxlen :]
            self._dead_counts[checked.value] = self._dead_counts.get(checked.value, 0) + 1
        _log_kept(payload, reason, checked)

    def dead_letter_counts(self) -> dict[str, int]:
        """See :meth:`DecisionLedger.dead_letter_counts`."""
        with self._changed:
            return dict(self._dead_counts)

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
    return LocalDecisionLedger(dead_letters_maxlen=settings.dead_letters_maxlen)


# The delivery script's answers: 1 delivered, 0 answered before, -1 answered for another text.
_DELIVERIES = {1: Delivery.DELIVERED, 0: Delivery.ANSWERED_BEFORE, -1: Delivery.ID_REUSED}


def _digests(decisions: Sequence[Decision], texts: Sequence[str | None] | None) -> list[str]:
    """The text hash of each decision's message, ``""`` where its text is not given."""
    if texts is None:
        return [""] * len(decisions)
    if len(texts) != len(decisions):
        raise ValueError(f"{len(decisions)} decisions but {len(texts)} texts")
    return [text_digest(text) if text is not None else "" for text in texts]


def _answer_for(
    message: Message, record: Decision | bytes | str | None, digest: bytes | str | None
) -> Decision | IdReused | None:
    """A recorded decision as the answer for ``message``: IdReused when made for another text."""
    if record is None:
        return None
    if digest is not None and _text(digest) != text_digest(message.text):
        return IdReused(message.id)
    return record if isinstance(record, Decision) else Decision.model_validate_json(record)


def _text(value: Any) -> str:
    """A Redis reply as text."""
    return value.decode() if isinstance(value, bytes) else str(value)
