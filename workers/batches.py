"""Batch mode: LLM work of ``llm.mode: batch`` policies, sent through the providers' batch APIs.

The LLM step hands such work to :func:`hold_for_batch`: the caller gets the BERT answer at once
(status ``pending_llm``, held in the ledger, not delivered) and the work waits in Redis, one
collection per policy. :class:`BatchRunner`, a loop in each LLM worker, sends a policy's
waiting work as one batch once ``llm.max_batch`` items wait or the oldest has waited
``llm.max_wait_s``, polls the batches it sent, validates each answer exactly as an online
answer is validated, and delivers each message's final decision once (stream, webhook, cache),
with ``llm.mode = batch`` and batch pricing. Requests that errored, expired or were cancelled
are asked again online or in the next batch (``llm.on_batch_error``).

Every step is recorded in Redis (:class:`BatchStore`), so a worker killed anywhere loses
nothing and sends nothing twice:

1. *claim*: one script moves the waiting items into a new batch record (state ``claimed``);
2. *prepare*: budgets are reserved at batch prices and the record says which request (custom
   id) answers which messages (state ``submitting``), before the provider is called;
3. *submit*: the provider's batch id is recorded (state ``submitted``). A record left in
   ``submitting`` by a dead worker is first looked up at the provider by its tag
   (:meth:`~tiergate.workers.llm.batch_api.BatchAPI.find`) and only sent when not found;
4. *deliver*: once the batch ended, each request's answer is settled against its budget
   reservation once (a Redis flag per request) and delivered through the ledger (which
   delivers an id once); then the record is deleted.

A batch is worked on by one worker at a time (a lease that expires when its holder dies), and
at most one batch per provider model is between steps 2 and 3 at a time (a lock), which is
what makes the lookup by tag sound where the provider keeps no tag (Anthropic).
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import asdict
from enum import StrEnum
from functools import partial
from typing import Any

import redis
import structlog
from pydantic import BaseModel, Field

from tiergate.policies.spec import CallMode, OnBatchError, PolicySpec
from tiergate.workers.budget import Reservation
from tiergate.workers.cascade import Cascade, LLMWork
from tiergate.workers.errors import (
    InvalidAnswerError,
    PermanentLLMError,
    RefusalError,
    TransientError,
)
from tiergate.workers.ledger import Delivery, RedisDecisionLedger
from tiergate.workers.llm.batch_api import BatchAPI, RequestOutcome, batch_api
from tiergate.workers.llm.prompt import SCHEMA_NAME
from tiergate.workers.llm.tier import LLMRequest
from tiergate.workers.redis_connection import redis_errors_as_coordination_errors
from tiergate.workers.schemas import Decision, Status
from tiergate.workers.settings import Settings

log = structlog.get_logger(__name__)

# Times a request may fail in a batch before ``next_batch`` gives up and asks it online.
MAX_BATCH_TRIES = 3

# Seconds a batch is looked up by tag before the lookup window: clocks of workers and provider.
_CLOCK_SKEW_S = 300.0

# KEYS: claimed (hash), work (hash), waiting (zset), groups (set).
# ARGV: message id, entry JSON, now, group, batch id it leaves ('' when new).
# Returns 1 when queued, 0 when the id already waits or is in a batch.
_ENQUEUE = """
if ARGV[5] ~= '' and redis.call('HGET', KEYS[1], ARGV[1]) == ARGV[5] then
  redis.call('HDEL', KEYS[1], ARGV[1])
end
if redis.call('HEXISTS', KEYS[1], ARGV[1]) == 1 or redis.call('HEXISTS', KEYS[2], ARGV[1]) == 1 then
  return 0
end
redis.call('HSET', KEYS[2], ARGV[1], ARGV[2])
redis.call('ZADD', KEYS[3], ARGV[3], ARGV[1])
redis.call('SADD', KEYS[4], ARGV[4])
return 1
"""

# KEYS: waiting (zset), work (hash), claimed (hash), items of the new batch (hash),
# outstanding (zset), the new batch's record.
# ARGV: now, max batch, max wait (s), batch id, record JSON.
# Moves up to max batch of the oldest waiting items into the new batch when enough wait or the
# oldest waited long enough; returns their ids (none: nothing is due).
_CLAIM = """
local n = redis.call('ZCARD', KEYS[1])
if n == 0 then return {} end
local oldest = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
if n < tonumber(ARGV[2]) and tonumber(ARGV[1]) - tonumber(oldest[2]) < tonumber(ARGV[3]) then
  return {}
end
local ids = redis.call('ZRANGE', KEYS[1], 0, tonumber(ARGV[2]) - 1)
local out = {}
for _, id in ipairs(ids) do
  local entry = redis.call('HGET', KEYS[2], id)
  redis.call('ZREM', KEYS[1], id)
  redis.call('HDEL', KEYS[2], id)
  if entry then
    redis.call('HSET', KEYS[4], id, entry)
    redis.call('HSET', KEYS[3], id, ARGV[4])
    table.insert(out, id)
  end
end
if #out > 0 then
  redis.call('SET', KEYS[6], ARGV[5])
  redis.call('ZADD', KEYS[5], ARGV[1], ARGV[4])
end
return out
"""

# KEYS: claimed (hash), items (hash), outstanding (zset), record, settled (hash), lease.
# ARGV: batch id. Forgets a finished batch: its records, and its claim on each message.
_FINISH = """
for _, id in ipairs(redis.call('HKEYS', KEYS[2])) do
  if redis.call('HGET', KEYS[1], id) == ARGV[1] then
    redis.call('HDEL', KEYS[1], id)
  end
end
redis.call('DEL', KEYS[2], KEYS[4], KEYS[5], KEYS[6])
redis.call('ZREM', KEYS[3], ARGV[1])
return 1
"""

# KEYS: lock. ARGV: token. Deletes the lock only if it is still ours.
_UNLOCK = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""


class BatchState(StrEnum):
    """Where a batch is: items claimed, being sent (maybe sent), or sent (id recorded)."""

    CLAIMED = "claimed"
    SUBMITTING = "submitting"
    SUBMITTED = "submitted"


class BatchRecord(BaseModel):
    """A batch as Redis records it (see the module docstring for the states).

    ``requests`` maps each custom id to the message ids it answers (the first one was asked;
    the others share its cache key). ``reservations`` holds each request's budget reservation.
    ``status`` is the provider's last reported status.
    """

    id: str
    policy: str
    state: BatchState
    created_at: float
    provider: str | None = None
    model: str | None = None
    submitting_at: float | None = None
    submitted_at: float | None = None
    provider_batch_id: str | None = None
    requests: dict[str, list[str]] = Field(default_factory=dict)
    reservations: dict[str, dict[str, Any]] = Field(default_factory=dict)
    status: str | None = None

    def age_s(self, now: float) -> float:
        """Seconds since its items were claimed."""
        return max(0.0, now - self.created_at)


class WaitingItem(BaseModel):
    """One message's LLM work waiting for (or in) a batch, and how often its batches failed."""

    work: LLMWork
    failures: int = 0


class BatchStore:
    """Batch mode's records in Redis, under ``{prefix}:llm-batch:``.

    Keys: ``waiting:{policy}`` (sorted set of message ids by enqueue time), ``work`` (hash: id
    -> :class:`WaitingItem` JSON), ``groups`` (policies with waiting work), ``claimed`` (hash:
    id -> the batch holding it), ``batch:{id}`` (:class:`BatchRecord` JSON), ``items:{id}``
    (hash: the batch's items), ``settled:{id}`` (requests settled), ``outstanding`` (sorted
    set of batch ids by claim time), ``lease:{id}``, ``submit-lock:{provider}/{model}`` and
    ``provider-ids`` (provider batch ids recorded). ``clock`` gives epoch seconds.
    """

    def __init__(
        self, client: redis.Redis, prefix: str, clock: Callable[[], float] = time.time
    ) -> None:
        self.client = client
        self.base = f"{prefix}:llm-batch"
        self._clock = clock
        self._enqueue = client.register_script(_ENQUEUE)
        self._claim = client.register_script(_CLAIM)
        self._finish = client.register_script(_FINISH)
        self._unlock = client.register_script(_UNLOCK)

    @classmethod
    def from_settings(cls, settings: Settings, client: redis.Redis | None = None) -> BatchStore:
        """The store on the ledger's Redis (``client``, else ``settings.redis_url``)."""
        if client is None:
            if settings.redis_url is None:
                raise ValueError("batch mode needs Redis: set TIERGATE_REDIS_URL")
            from tiergate.workers.redis_connection import shared_redis  # noqa: PLC0415

            client = shared_redis(settings.redis_url)
        return cls(client, settings.cache_prefix)

    def _key(self, *parts: str) -> str:
        return ":".join([self.base, *parts])

    def enqueue(self, item: WaitingItem, *, leaving: str = "") -> bool:
        """Queue ``item`` for its policy's next batch; false when its id already waits.

        Also false when it is in a batch. ``leaving``: the batch it leaves (a retry in the
        next batch), whose claim on it is dropped first.
        """
        work = item.work
        with redis_errors_as_coordination_errors(self.client, "queueing work for a batch"):
            queued = self._enqueue(
                keys=[
                    self._key("claimed"),
                    self._key("work"),
                    self._key("waiting", work.policy),
                    self._key("groups"),
                ],
                args=[work.message.id, item.model_dump_json(), self._clock(), work.policy, leaving],
            )
        return bool(queued)

    def claim(self, spec: PolicySpec) -> BatchRecord | None:
        """A new batch of ``spec``'s waiting items, if a batch is due; else ``None``."""
        record = BatchRecord(
            id=f"tgb-{uuid.uuid4().hex}",
            policy=spec.name,
            state=BatchState.CLAIMED,
            created_at=self._clock(),
        )
        with redis_errors_as_coordination_errors(self.client, "claiming a batch"):
            ids = self._claim(
                keys=[
                    self._key("waiting", spec.name),
                    self._key("work"),
                    self._key("claimed"),
                    self._key("items", record.id),
                    self._key("outstanding"),
                    self._key("batch", record.id),
                ],
                args=[
                    record.created_at,
                    spec.llm.max_batch,
                    spec.llm.max_wait_s,
                    record.id,
                    record.model_dump_json(),
                ],
            )
        return record if ids else None

    def items(self, batch_id: str) -> dict[str, WaitingItem]:
        """The batch's items by message id."""
        with redis_errors_as_coordination_errors(self.client, "reading a batch"):
            raw = self.client.hgetall(self._key("items", batch_id))
        return {_text(mid): WaitingItem.model_validate_json(entry) for mid, entry in raw.items()}

    def save(self, record: BatchRecord) -> None:
        """Record ``record`` (its provider batch id, when set, is remembered as known)."""
        with redis_errors_as_coordination_errors(self.client, "recording a batch"):
            pipe = self.client.pipeline(transaction=True)
            pipe.set(self._key("batch", record.id), record.model_dump_json())
            if record.provider_batch_id is not None:
                pipe.sadd(self._key("provider-ids"), record.provider_batch_id)
            pipe.execute()

    def load(self, batch_id: str) -> BatchRecord | None:
        """The record of ``batch_id`` (``None`` once finished)."""
        with redis_errors_as_coordination_errors(self.client, "reading a batch"):
            raw = self.client.get(self._key("batch", batch_id))
        return BatchRecord.model_validate_json(raw) if raw is not None else None

    def outstanding(self) -> list[BatchRecord]:
        """Every batch not finished yet, oldest first."""
        with redis_errors_as_coordination_errors(self.client, "listing batches"):
            ids = [_text(i) for i in self.client.zrange(self._key("outstanding"), 0, -1)]
        return [record for i in ids if (record := self.load(i)) is not None]

    def waiting(self) -> dict[str, tuple[int, float | None]]:
        """Per policy with waiting work: how many items wait, and since when the oldest."""
        with redis_errors_as_coordination_errors(self.client, "listing waiting work"):
            groups = sorted(_text(g) for g in self.client.smembers(self._key("groups")))
            found: dict[str, tuple[int, float | None]] = {}
            for group in groups:
                key = self._key("waiting", group)
                oldest = self.client.zrange(key, 0, 0, withscores=True)
                found[group] = (
                    int(self.client.zcard(key)),
                    float(oldest[0][1]) if oldest else None,
                )
        return found

    def settle_once(self, batch_id: str, custom_id: str) -> bool:
        """True the first time a request of the batch is settled, false ever after."""
        with redis_errors_as_coordination_errors(self.client, "settling a batch request"):
            return bool(self.client.hsetnx(self._key("settled", batch_id), custom_id, "1"))

    def finish(self, batch_id: str) -> None:
        """Forget a batch whose every message was answered, retried or queued again."""
        with redis_errors_as_coordination_errors(self.client, "finishing a batch"):
            self._finish(
                keys=[
                    self._key("claimed"),
                    self._key("items", batch_id),
                    self._key("outstanding"),
                    self._key("batch", batch_id),
                    self._key("settled", batch_id),
                    self._key("lease", batch_id),
                ],
                args=[batch_id],
            )

    def known_provider_id(self, provider_batch_id: str) -> bool:
        """Whether a provider batch id was recorded for some batch."""
        with redis_errors_as_coordination_errors(self.client, "reading batch ids"):
            return bool(self.client.sismember(self._key("provider-ids"), provider_batch_id))

    def lock(self, name: str, ttl_s: float) -> str | None:
        """Take lock ``name`` (``lease:{batch}`` or ``submit-lock:{model}``); its token or None."""
        token = uuid.uuid4().hex
        with redis_errors_as_coordination_errors(self.client, "taking a batch lock"):
            taken = self.client.set(self._key(name), token, nx=True, px=int(ttl_s * 1000))
        return token if taken else None

    def renew(self, name: str, token: str, ttl_s: float) -> bool:
        """Extend lock ``name`` if it is still ours."""
        with redis_errors_as_coordination_errors(self.client, "renewing a batch lock"):
            if _text(self.client.get(self._key(name)) or b"") != token:
                return False
            return bool(self.client.pexpire(self._key(name), int(ttl_s * 1000)))

    def unlock(self, name: str, token: str) -> None:
        """Give lock ``name`` back if it is still ours."""
        with redis_errors_as_coordination_errors(self.client, "releasing a batch lock"):
            self._unlock(keys=[self._key(name)], args=[token])


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def hold_for_batch(
    cascade: Cascade, ledger: RedisDecisionLedger, store: BatchStore, work: LLMWork
) -> Decision | None:
    """The LLM step of a batch-mode policy's work: a cached answer, or queue it for a batch.

    Returns the cached decision (the caller delivers it) when the message's cache key has
    one. Otherwise the work joins its policy's waiting collection (once, whatever the
    redeliveries), the BERT answer is held as the id's pending decision, and the message is
    no longer tracked as accepted: the batch records keep it from now on.
    """
    cached = cascade.cached_answer(work)
    if cached is not None:
        return cached
    store.enqueue(WaitingItem(work=work))
    ledger.hold_pending(cascade.pending(work))
    ledger.forget(work.message.id)
    log.info("batch.queued", message_id=work.message.id, policy=work.policy)
    return None


class BatchRunner:
    """Sends, polls and answers the batches of batch-mode policies; one per LLM worker.

    :meth:`run_once` does one round: a batch for each policy that has one due, then one step
    for every outstanding batch (recover, send, poll, deliver). :meth:`start` runs rounds in a
    daemon thread every ``settings.llm_batch_poll_s`` seconds. ``on_delivered`` is called with
    each decision delivered now (the worker queues its webhook).
    """

    def __init__(
        self,
        cascade: Cascade,
        ledger: RedisDecisionLedger,
        store: BatchStore,
        settings: Settings,
        on_delivered: Callable[[Decision], None] = lambda _: None,
    ) -> None:
        self.cascade = cascade
        self.ledger = ledger
        self.store = store
        self.settings = settings
        self.on_delivered = on_delivered
        # Long enough for the slowest provider call the SDK may make (all its retries).
        self.lease_s = max(60.0, 4 * settings.llm_timeout_s * (settings.llm_max_retries + 1))
        self._stop = threading.Event()

    def start(self) -> None:
        """Run rounds in the background until :meth:`stop`."""
        threading.Thread(target=self._run, name="tiergate-llm-batches", daemon=True).start()

    def stop(self) -> None:
        """Stop after the current round."""
        self._stop.set()

    def _run(self) -> None:
        while not self._stop.wait(self.settings.llm_batch_poll_s):
            try:
                self.run_once()
            except Exception as exc:  # noqa: BLE001 -- a failed round is tried again next time
                log.warning("batch.round_failed", error=str(exc))

    def run_once(self) -> None:
        """One round: claim due batches, then advance every outstanding one."""
        for spec in self.cascade.policies:
            if spec.llm.mode is CallMode.BATCH:
                while self.store.claim(spec) is not None:
                    pass  # claimed ones are sent below, with the others outstanding
        for record in self.store.outstanding():
            lease = f"lease:{record.id}"
            token = self.store.lock(lease, self.lease_s)
            if token is None:
                continue  # another worker is on it
            try:
                current = self.store.load(record.id)
                if current is not None:
                    self._advance(current, partial(self.store.renew, lease, token, self.lease_s))
            except TransientError as exc:
                log.warning("batch.step_failed", batch=record.id, error=str(exc))
            except Exception as exc:  # one broken batch must not stall the others
                log.exception("batch.step_failed", batch=record.id, error=repr(exc))
            finally:
                self.store.unlock(lease, token)

    def _advance(self, record: BatchRecord, renew: Callable[[], bool]) -> None:
        """One step of ``record``'s life (see the module docstring)."""
        spec = self.cascade.policies.get(record.policy)
        if record.state is BatchState.CLAIMED:
            record = self._prepare(record, spec, renew)
            if not record.requests:
                self.store.finish(record.id)
                return
            self._submit(record, spec, recovering=False)
        elif record.state is BatchState.SUBMITTING:
            self._submit(record, spec, recovering=True)
        else:
            self._poll(record, spec, renew)

    # ---------------------------------------------------------------------------- prepare

    def _prepare(
        self, record: BatchRecord, spec: PolicySpec, renew: Callable[[], bool]
    ) -> BatchRecord:
        """Reserve budgets and name each request, then record it all before any call."""
        llm = self.cascade.llm
        provider = llm.batch_provider(spec) if llm is not None else None
        items = self.store.items(record.id)
        finals = _finals(self.ledger, list(items))
        by_key: dict[str, list[str]] = {}
        for mid, item in items.items():
            if mid not in finals:
                by_key.setdefault(item.work.key, []).append(mid)
        requests: dict[str, list[str]] = {}
        reservations: dict[str, dict[str, Any]] = {}
        for number, mids in enumerate(by_key.values()):
            first = items[mids[0]].work
            if llm is None or provider is None:  # no usable provider: the BERT answer says so
                self._answer_online(record, [items[m] for m in mids])
                continue
            reservation = None
            if self.cascade.budget is not None:
                estimate = llm.estimate_cost(spec, first.message.text, batch=True)
                reservation = self.cascade.budget.reserve(spec.name, spec.budget, estimate)
                if reservation is None:
                    self._budget_spent(record, spec, [items[m] for m in mids])
                    continue
                reservations[f"r{number}"] = asdict(reservation)
            requests[f"r{number}"] = mids
            renew()
        updated = record.model_copy(
            update={
                "state": BatchState.SUBMITTING,
                "submitting_at": time.time(),
                "provider": provider.name if provider is not None else None,
                "model": provider.model if provider is not None else None,
                "requests": requests,
                "reservations": reservations,
            }
        )
        self.store.save(updated)
        return updated

    def _budget_spent(
        self, record: BatchRecord, spec: PolicySpec, items: list[WaitingItem]
    ) -> None:
        """The policy's budget fallback for items whose reservation was refused."""
        fallback = self.cascade.budget_fallback(items[0].work)
        log.info("budget.exhausted", policy=spec.name, message_id=items[0].work.message.id)
        if fallback.status is Status.DEFERRED:
            for item in items:  # tried again in a later batch
                self.store.enqueue(item, leaving=record.id)
            return
        self._deliver(fallback, [item.work for item in items])

    # ----------------------------------------------------------------------------- submit

    def _submit(self, record: BatchRecord, spec: PolicySpec, *, recovering: bool) -> None:
        """Send the batch (after looking for it at the provider when recovering); record its id."""
        api = self._api(spec)
        lock = f"submit-lock:{api.name}/{api.model}"
        token = self.store.lock(lock, self.lease_s)
        if token is None:
            return  # another batch for this model is being sent; next round
        try:
            items = self.store.items(record.id)
            count = len(record.requests)
            found = None
            if recovering:
                since = (record.submitting_at or record.created_at) - _CLOCK_SKEW_S
                found = api.find(record.id, since, count)
                if found is not None and self.store.known_provider_id(found):
                    found = None
            if found is None:
                wire = [
                    (custom_id, self._wire(items[mids[0]].work, spec))
                    for custom_id, mids in record.requests.items()
                ]
                try:
                    found = api.submit(wire, record.id)
                except PermanentLLMError as exc:
                    log.warning("batch.refused", batch=record.id, error=str(exc))
                    self._fail_all(record, spec, items, str(exc))
                    return
                log.info("batch.submitted", batch=record.id, provider_batch=found, requests=count)
            else:
                log.warning("batch.recovered", batch=record.id, provider_batch=found)
            self.store.save(
                record.model_copy(
                    update={
                        "state": BatchState.SUBMITTED,
                        "submitted_at": time.time(),
                        "provider_batch_id": found,
                    }
                )
            )
        finally:
            self.store.unlock(lock, token)

    def _wire(self, work: LLMWork, spec: PolicySpec) -> Any:
        assert self.cascade.llm is not None
        return self.cascade.llm.batch_request(_request(work, spec))

    def _api(self, spec: PolicySpec) -> BatchAPI:
        llm = self.cascade.llm
        provider = llm.batch_provider(spec) if llm is not None else None
        if provider is None:
            raise PermanentLLMError("llm", f"policy {spec.name!r} has no usable provider")
        return batch_api(provider)

    # ------------------------------------------------------------------------------- poll

    def _poll(self, record: BatchRecord, spec: PolicySpec, renew: Callable[[], bool]) -> None:
        """Check the batch; once it ended, deliver every answer and forget it."""
        assert record.provider_batch_id is not None
        api = self._api(spec)
        status = api.status(record.provider_batch_id)
        if not status.ended:
            if status.status != record.status:
                self.store.save(record.model_copy(update={"status": status.status}))
            return
        outcomes = api.results(record.provider_batch_id, SCHEMA_NAME)
        items = self.store.items(record.id)
        log.info(
            "batch.ended",
            batch=record.id,
            status=status.status,
            answered=sum(1 for o in outcomes.values() if o.answer is not None),
            requests=len(record.requests),
        )
        for custom_id, mids in record.requests.items():
            outcome = outcomes.get(custom_id) or RequestOutcome(failure="missing")
            self._answer(record, spec, custom_id, [items[m] for m in mids if m in items], outcome)
            renew()
        self.store.finish(record.id)

    def _answer(
        self,
        record: BatchRecord,
        spec: PolicySpec,
        custom_id: str,
        items: list[WaitingItem],
        outcome: RequestOutcome,
    ) -> None:
        """Deliver one request's answer to its messages, or retry it; settle its budget once."""
        if not items:
            return
        first = items[0].work
        decision: Decision | None = None
        cost = 0.0  # providers charge nothing for a failed batch request
        problem = outcome.failure or ""
        if outcome.answer is not None:
            assert self.cascade.llm is not None
            provider = self.cascade.llm.batch_provider(spec)
            assert provider is not None
            try:
                result = self.cascade.llm.batch_result(
                    provider, outcome.answer, _request(first, spec)
                )
                decision, cost = self.cascade.batch_answer(first, result), result.usage.cost_usd
            except RefusalError as exc:
                decision = self.cascade.batch_answer(first, exc)
                cost = exc.usage.cost_usd if exc.usage is not None else 0.0
            except InvalidAnswerError as exc:
                problem = str(exc)
                cost = exc.usage.cost_usd if exc.usage is not None else 0.0
        self._settle(record, custom_id, cost)
        if decision is not None:
            self._deliver(decision, [item.work for item in items])
            return
        log.warning(
            "batch.request_failed",
            batch=record.id,
            message_id=first.message.id,
            failure=problem,
            detail=outcome.detail[:200],
        )
        self._retry(record, spec, items)

    def _settle(self, record: BatchRecord, custom_id: str, cost: float) -> None:
        reserved = record.reservations.get(custom_id)
        budget = self.cascade.budget
        if (
            reserved is not None
            and budget is not None
            and self.store.settle_once(record.id, custom_id)
        ):
            budget.settle(Reservation(**reserved), cost)

    def _retry(self, record: BatchRecord, spec: PolicySpec, items: list[WaitingItem]) -> None:
        """A failed request: asked online now, or queued for the next batch (bounded)."""
        if spec.llm.on_batch_error is OnBatchError.NEXT_BATCH:
            again = [
                item.model_copy(update={"failures": item.failures + 1})
                for item in items
                if item.failures + 1 < MAX_BATCH_TRIES
            ]
            if len(again) == len(items):
                for item in again:
                    self.store.enqueue(item, leaving=record.id)
                return
        open_items = [i for i in items if not _finals(self.ledger, [i.work.message.id])]
        if open_items:
            self._answer_online(record, open_items)

    def _answer_online(self, record: BatchRecord, items: list[WaitingItem]) -> None:
        """Ask online for the first item and give its answer to all; a deferral waits instead.

        The online path is the cascade's own (single-flight, budget at online prices). When
        the budget is spent and the policy defers, the items wait for a later batch.
        """
        decision = self.cascade.answer(items[0].work)
        if decision.status is Status.DEFERRED:
            for item in items:
                self.store.enqueue(item, leaving=record.id)
            return
        self._deliver(decision, [item.work for item in items])

    def _fail_all(
        self, record: BatchRecord, spec: PolicySpec, items: dict[str, WaitingItem], error: str
    ) -> None:
        """The provider refused the whole batch: every request is retried as the policy says."""
        for custom_id, mids in record.requests.items():
            self._settle(record, custom_id, 0.0)
            log.warning("batch.request_failed", batch=record.id, failure=error[:200])
            self._retry(record, spec, [items[m] for m in mids if m in items])
        self.store.finish(record.id)

    # ---------------------------------------------------------------------------- deliver

    def _deliver(self, decision: Decision, works: Sequence[LLMWork]) -> None:
        """Deliver ``decision`` to each work's message (the first pays; the others reuse it)."""
        for index, work in enumerate(works):
            update: dict[str, Any] = {
                "id": work.message.id,
                "metadata": dict(work.message.metadata),
            }
            if index > 0 and decision.llm is not None:
                update["llm"] = decision.llm.unpaid()
            mine = decision.model_copy(update=update)
            if self.ledger.deliver(mine, text=work.message.text) is Delivery.DELIVERED:
                self.on_delivered(mine)


def _request(work: LLMWork, spec: PolicySpec) -> LLMRequest:
    return LLMRequest(text=work.message.text, spec=spec, task=work.message.task, labels=work.labels)


def _finals(ledger: RedisDecisionLedger, ids: list[str]) -> set[str]:
    """The ids among ``ids`` that have a final decision (not just a pending one)."""
    found = ledger.get_many(ids)
    return {
        mid
        for mid, decision in zip(ids, found, strict=True)
        if decision is not None and decision.status is not Status.PENDING_LLM
    }


def outstanding_json(store: BatchStore, now: float | None = None) -> list[dict[str, Any]]:
    """The outstanding batches as JSON objects (for ``tiergate batches list``)."""
    at = time.time() if now is None else now
    return [
        {
            "id": record.id,
            "policy": record.policy,
            "state": record.state.value,
            "provider": record.provider,
            "model": record.model,
            "provider_batch_id": record.provider_batch_id,
            "provider_status": record.status,
            "requests": len(record.requests),
            "messages": sum(len(mids) for mids in record.requests.values()),
            "age_s": round(record.age_s(at), 1),
        }
        for record in store.outstanding()
    ]


__all__ = [
    "MAX_BATCH_TRIES",
    "BatchRecord",
    "BatchRunner",
    "BatchState",
    "BatchStore",
    "WaitingItem",
    "hold_for_batch",
    "outstanding_json",
]
