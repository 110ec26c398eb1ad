"""The decision cache, and single-flight for messages that go to the LLM.

A decision is stored under a key derived from the normalised text and everything else that
could change the answer (:func:`cache_key`), so a repeated message never costs a second LLM
call. Two backends share one protocol, :class:`DecisionCache`: Redis for workers that run on
several machines, and a SQLite file for running without Redis (the CLI, an embedded gateway).

Single-flight: when several workers meet the same uncached message at once, only one of them
calls the LLM. :meth:`DecisionCache.wait` hands that worker a :class:`Lease` and makes the others
wait for its decision::

    got = cache.wait(key, timeout_s=settings.single_flight_timeout_s)
    if isinstance(got, Decision):
        return got
    try:
        decision = call_the_llm()
        cache.put(key, decision, ttl_seconds)  # put first, then release: see Lease
    finally:
        got.release()

Waiters poll with short sleeps that grow from 2 ms to 50 ms rather than subscribing to
notifications: keyspace notifications need a server setting we cannot assume, pub/sub needs a
connection per waiter and a subscribe-then-check dance, and BLPOP needs the holder to know how
many waiters to wake. Waiting only happens for concurrent duplicates of LLM-bound messages, and
50 ms is small beside an LLM call, so polling costs little and has no failure modes of its own.
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import threading
import time
import unicodedata
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import redis

from tiergate.workers.errors import CoordinationError, SingleFlightTimeout
from tiergate.workers.redis_connection import redis_errors_as_coordination_errors, shared_redis
from tiergate.workers.schemas import Decision
from tiergate.workers.settings import Settings

# Bumped when the key derivation changes, so old entries are never read under the new meaning.
_KEY_SCHEME = "tiergate-decision-v1"

# Waiters poll from this delay, doubling up to the cap (seconds).
_FIRST_POLL_S = 0.002
_MAX_POLL_S = 0.05


def normalise(text: str) -> str:
    """The form of ``text`` that the cache key is computed from.

    Unicode NFC (so composed and decomposed accents are equal), every run of whitespace
    (any Unicode whitespace, including newlines and no-break spaces) collapsed to one ASCII
    space, and leading and trailing whitespace removed. Case and punctuation are kept: they can
    change a label.
    """
    return " ".join(unicodedata.normalize("NFC", text).split())


def cache_key(
    text: str,
    *,
    policy: str,
    policy_version: str,
    model_version: str,
    llm_route: str,
    prompt_version: str,
    task: str,
) -> str:
    """The cache key of one message: 64 lowercase hex digits.

    A SHA-256 over the normalised text and every other part that can change the decision,
    encoded as a JSON list so no two different tuples of parts share an encoding (``("ab",
    "c")`` and ``("a", "bc")`` differ). The key never contains the text, so keys can be logged
    and listed without leaking messages.
    """
    parts = [
        _KEY_SCHEME,
        normalise(text),
        policy,
        policy_version,
        model_version,
        llm_route,
        prompt_version,
        task,
    ]
    # ASCII-only JSON: any str encodes, lone surrogates included.
    encoded = json.dumps(parts, separators=(",", ":")).encode("ascii")
    return hashlib.sha256(encoded).hexdigest()


@dataclass(eq=False)
class Lease:
    """The right to compute the decision for one key, held by exactly one worker at a time.

    The holder computes the decision, stores it with :meth:`DecisionCache.put`, and then calls
    :meth:`release`, in that order, so a waiter never sees "no lease and no decision" unless the
    holder failed. The lease also expires on its own after the ``lease_s`` it was taken with, so
    a holder that dies (SIGKILL, a lost machine) frees it for a waiter to take over.
    ``release_with`` is the backend's compare-and-delete, called with the key and the token.
    """

    key: str
    token: str
    release_with: Callable[[str, str], None] = field(repr=False)
    _released: bool = field(default=False, init=False, repr=False)

    def release(self) -> None:
        """Give the lease back; idempotent.

        Deletes the lease only if it still carries our token: if it expired and another worker
        took it over, that worker's lease is left alone.
        """
        if self._released:
            return
        self.release_with(self.key, self.token)
        self._released = True


class DecisionCache(Protocol):
    """Decisions stored by cache key, plus the single-flight lease per key.

    Every method may raise :class:`~tiergate.workers.errors.CoordinationError` when the store behind
    it fails; the cascade treats that as transient. Decisions come back exactly as they were put
    (the cascade marks them ``cached`` and gives them the asking message's id).
    """

    def get_many(self, keys: Sequence[str]) -> list[Decision | None]:
        """The decision stored under each key, in order (``None`` where missing or expired).

        One round trip to the store for the whole batch.
        """
        ...

    def put(self, key: str, decision: Decision, ttl_seconds: int) -> None:
        """Store ``decision`` under ``key`` for ``ttl_seconds``; a ttl of 0 stores nothing."""
        ...

    def put_many(self, entries: Sequence[tuple[str, Decision, int]]) -> None:
        """:meth:`put` each ``(key, decision, ttl_seconds)``, in one round trip to the store."""
        ...

    def forget(self, key: str) -> bool:
        """Delete the decision stored under ``key`` (a person corrected it); whether one was."""
        ...

    def claim(self, key: str, lease_s: float) -> Lease | None:
        """Take the single-flight lease on ``key`` for ``lease_s`` seconds.

        Returns ``None`` when another holder has a lease that has not expired.
        """
        ...

    def wait(self, key: str, timeout_s: float, lease_s: float | None = None) -> Decision | Lease:
        """The decision for ``key``, or the lease to compute it, waiting up to ``timeout_s``.

        Returns the stored decision if there is one; else takes the lease (for ``lease_s``
        seconds, default ``timeout_s``) and returns it, and the caller must compute, put and
        release. Otherwise another worker holds the lease: waits until its decision appears
        (returned), or its lease disappears without a decision (the holder failed or died, so
        the lease is taken and returned), or ``timeout_s`` passes, which raises
        :class:`~tiergate.workers.errors.SingleFlightTimeout`.
        """
        ...

    def close(self) -> None:
        """Release the connections to the store; the cache is unusable afterwards."""
        ...


def _new_token() -> str:
    return uuid.uuid4().hex


def _poll_until(
    key: str, timeout_s: float, step: Callable[[], Decision | Lease | None]
) -> Decision | Lease:
    """Run ``step`` until it returns something, sleeping between tries, or time out."""
    deadline = time.monotonic() + timeout_s
    delay = _FIRST_POLL_S
    while True:
        outcome = step()
        if outcome is not None:
            return outcome
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise SingleFlightTimeout(
                f"no decision for cache key {key} after {timeout_s:g} s: another worker holds "
                "the single-flight lease and has not finished"
            )
        time.sleep(min(delay, remaining))
        delay = min(delay * 2, _MAX_POLL_S)


def _lease_ms(lease_s: float) -> int:
    if lease_s <= 0:
        raise ValueError(f"lease_s must be positive, not {lease_s}")
    return max(1, round(lease_s * 1000))


# KEYS: decision, lease. ARGV: token, lease in ms.
# Returns {1, decision} when stored, {2} when we took the lease, {0} when another holder has it.
# One script so that "no decision" and "lease taken" are checked and acted on atomically:
# a holder that puts and releases in between cannot make us compute the decision twice.
_WAIT_STEP = """
local decision = redis.call('GET', KEYS[1])
if decision then return {1, decision} end
if redis.call('SET', KEYS[2], ARGV[1], 'NX', 'PX', ARGV[2]) then return {2} end
return {0}
"""

# KEYS: lease. ARGV: token. Deletes the lease only if it is still ours.
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


class RedisDecisionCache:
    """The decision cache and single-flight leases in Redis, shared by every worker.

    Decisions live at ``{prefix}:decision:{key}`` as the decision's JSON with a Redis expiry
    (``SET EX``); leases at ``{prefix}:lease:{key}`` as a random token set with ``SET NX PX`` and
    released by a compare-and-delete script. Works with clients built with or without
    ``decode_responses``. Connection failures and timeouts raise
    :class:`~tiergate.workers.errors.CoordinationError`.
    """

    def __init__(self, client: redis.Redis, prefix: str = "tiergate") -> None:
        self._client = client
        self._prefix = prefix
        self._wait_step = client.register_script(_WAIT_STEP)
        self._release = client.register_script(_RELEASE)

    def _decision_key(self, key: str) -> str:
        return f"{self._prefix}:decision:{key}"

    def _lease_key(self, key: str) -> str:
        return f"{self._prefix}:lease:{key}"

    def get_many(self, keys: Sequence[str]) -> list[Decision | None]:
        """See :meth:`DecisionCache.get_many` (one ``MGET``)."""
        if not keys:
            return []
        with redis_errors_as_coordination_errors(self._client, "reading the decision cache"):
            raw = self._client.mget([self._decision_key(key) for key in keys])
        return [None if value is None else Decision.model_validate_json(value) for value in raw]

    def put(self, key: str, decision: Decision, ttl_seconds: int) -> None:
        """See :meth:`DecisionCache.put` (``SET EX``)."""
        self.put_many([(key, decision, ttl_seconds)])

    def put_many(self, entries: Sequence[tuple[str, Decision, int]]) -> None:
        """See :meth:`DecisionCache.put_many` (pipelined ``SET EX``)."""
        kept = [(key, decision, ttl) for key, decision, ttl in entries if ttl > 0]
        if not kept:
            return
        with redis_errors_as_coordination_errors(self._client, "writing the decision cache"):
            pipe = self._client.pipeline(transaction=False)
            for key, decision, ttl in kept:
                pipe.set(self._decision_key(key), decision.model_dump_json(), ex=ttl)
            pipe.execute()

    def forget(self, key: str) -> bool:
        """See :meth:`DecisionCache.forget` (``DEL``)."""
        with redis_errors_as_coordination_errors(self._client, "deleting a cached decision"):
            return bool(self._client.delete(self._decision_key(key)))

    def claim(self, key: str, lease_s: float) -> Lease | None:
        """See :meth:`DecisionCache.claim` (``SET NX PX`` with a random token)."""
        token = _new_token()
        with redis_errors_as_coordination_errors(self._client, "taking a single-flight lease"):
            taken = self._client.set(self._lease_key(key), token, nx=True, px=_lease_ms(lease_s))
        return Lease(key, token, self._release_lease) if taken else None

    def wait(self, key: str, timeout_s: float, lease_s: float | None = None) -> Decision | Lease:
        """See :meth:`DecisionCache.wait` (one script call per poll)."""
        lease_ms = _lease_ms(timeout_s if lease_s is None else lease_s)
        keys = [self._decision_key(key), self._lease_key(key)]

        def step() -> Decision | Lease | None:
            token = _new_token()
            with redis_errors_as_coordination_errors(self._client, "waiting on single-flight"):
                outcome = self._wait_step(keys=keys, args=[token, lease_ms])
            if outcome[0] == 1:
                return Decision.model_validate_json(outcome[1])
            if outcome[0] == 2:
                return Lease(key, token, self._release_lease)
            return None

        return _poll_until(key, timeout_s, step)

    def _release_lease(self, key: str, token: str) -> None:
        with redis_errors_as_coordination_errors(self._client, "releasing a single-flight lease"):
            self._release(keys=[self._lease_key(key)], args=[token])

    def close(self) -> None:
        """See :meth:`DecisionCache.close` (closes the client's connection pool)."""
        self._client.close()


# --- SQLite

_SCHEMA = """
CREATE TABLE IF NOT EXISTS decisions (
    key TEXT PRIMARY KEY,
    decision TEXT NOT NULL,
    expires_at REAL NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS leases (
    key TEXT PRIMARY KEY,
    token TEXT NOT NULL,
    expires_at REAL NOT NULL
) WITHOUT ROWID;
"""

# Older SQLite builds allow at most 999 bound parameters per statement.
_MAX_KEYS_PER_SELECT = 900

# Expired rows are deleted on open and after this many puts by one cache object.
_PUTS_BETWEEN_PURGES = 1000

# How long a statement waits for another process's write lock before failing.
_BUSY_TIMEOUT_S = 30.0


class SqliteDecisionCache:
    """The decision cache and single-flight leases in one SQLite file, for running without Redis.

    Safe from several threads (a connection per thread) and several processes on one machine
    (SQLite's own file locking, in WAL mode so readers do not block the writer). Expiry times
    are wall-clock (``time.time()``) so that every process agrees on them. Leases are rows with
    an expiry, taken by one conditional upsert, so claiming is atomic without an explicit
    transaction. Expired rows are ignored on read and purged on open and every
    1000 puts. A cache object created before a fork opens fresh connections in the child.
    SQLite failures (a locked or unwritable file) raise
    :class:`~tiergate.workers.errors.CoordinationError`.
    """

    def __init__(self, path: Path) -> None:
        self._path = Path(path)
        self._path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._local = threading.local()
        self._connections: list[sqlite3.Connection] = []
        self._pid = os.getpid()
        self._puts = 0
        with self._errors("opening the decision cache"):
            connection = self._connection()
            connection.execute("PRAGMA journal_mode=WAL")
            connection.executescript(_SCHEMA)
            self._purge(connection)

    @contextmanager
    def _errors(self, doing: str) -> Iterator[None]:
        try:
            yield
        except sqlite3.Error as exc:
            raise CoordinationError(
                f"{doing}: SQLite cache at {self._path} failed ({exc})"
            ) from exc

    def _connection(self) -> sqlite3.Connection:
        if os.getpid() != self._pid:
            # A forked child must not use the parent's connections; it forgets them unclosed.
            with self._lock:
                self._pid = os.getpid()
                self._connections = []
                self._local = threading.local()
        connection: sqlite3.Connection | None = getattr(self._local, "connection", None)
        if connection is None:
            # Autocommit (isolation_level=None): every statement here is atomic on its own.
            # check_same_thread=False only so that close() may close every thread's connection.
            connection = sqlite3.connect(
                self._path, timeout=_BUSY_TIMEOUT_S, isolation_level=None, check_same_thread=False
            )
            connection.execute("PRAGMA synchronous=NORMAL")
            self._local.connection = connection
            with self._lock:
                self._connections.append(connection)
        return connection

    def _purge(self, connection: sqlite3.Connection) -> None:
        now = time.time()
        connection.execute("DELETE FROM decisions WHERE expires_at <= ?", (now,))
        connection.execute("DELETE FROM leases WHERE expires_at <= ?", (now,))

    def get_many(self, keys: Sequence[str]) -> list[Decision | None]:
        """See :meth:`DecisionCache.get_many` (one ``SELECT`` per 900 keys)."""
        found: dict[str, str] = {}
        now = time.time()
        with self._errors("reading the decision cache"):
            connection = self._connection()
            for start in range(0, len(keys), _MAX_KEYS_PER_SELECT):
                batch = list(keys[start : start + _MAX_KEYS_PER_SELECT])
                marks = ",".join("?" * len(batch))
                # Only "?" placeholders are interpolated; the keys are bound parameters.
                query = (
                    f"SELECT key, decision FROM decisions WHERE key IN ({marks}) AND expires_at > ?"  # noqa: S608
                )
                rows = connection.execute(query, [*batch, now]).fetchall()
                found.update(rows)
        return [
            None if key not in found else Decision.model_validate_json(found[key]) for key in keys
        ]

    def put(self, key: str, decision: Decision, ttl_seconds: int) -> None:
        """See :meth:`DecisionCache.put`."""
        self.put_many([(key, decision, ttl_seconds)])

    def put_many(self, entries: Sequence[tuple[str, Decision, int]]) -> None:
        """See :meth:`DecisionCache.put_many` (one ``executemany``)."""
        now = time.time()
        rows = [(key, d.model_dump_json(), now + ttl) for key, d, ttl in entries if ttl > 0]
        if not rows:
            return
        with self._errors("writing the decision cache"):
            connection = self._connection()
            connection.executemany(
                "INSERT OR REPLACE INTO decisions (key, decision, expires_at) VALUES (?, ?, ?)",
                rows,
            )
            with self._lock:
                before, self._puts = self._puts, self._puts + len(rows)
                purge = before // _PUTS_BETWEEN_PURGES != self._puts // _PUTS_BETWEEN_PURGES
            if purge:
                self._purge(connection)

    def forget(self, key: str) -> bool:
        """See :meth:`DecisionCache.forget`."""
        with self._errors("deleting a cached decision"):
            cursor = self._connection().execute(
                "DELETE FROM decisions WHERE key = ? AND expires_at > ?", (key, time.time())
            )
        return cursor.rowcount > 0

    def claim(self, key: str, lease_s: float) -> Lease | None:
        """See :meth:`DecisionCache.claim` (an upsert that only replaces an expired lease)."""
        lease_ms = _lease_ms(lease_s)
        token = _new_token()
        now = time.time()
        with self._errors("taking a single-flight lease"):
            cursor = self._connection().execute(
                "INSERT INTO leases (key, token, expires_at) VALUES (?, ?, ?) "
                "ON CONFLICT (key) DO UPDATE SET token = excluded.token, "
                "expires_at = excluded.expires_at WHERE leases.expires_at <= ?",
                (key, token, now + lease_ms / 1000, now),
            )
        return Lease(key, token, self._release_lease) if cursor.rowcount == 1 else None

    def wait(self, key: str, timeout_s: float, lease_s: float | None = None) -> Decision | Lease:
        """See :meth:`DecisionCache.wait` (a read per poll; a write only to take the lease)."""
        lease = timeout_s if lease_s is None else lease_s
        _lease_ms(lease)  # fail on a bad lease before waiting

        def step() -> Decision | Lease | None:
            now = time.time()
            with self._errors("waiting on single-flight"):
                row = self._connection().execute(
                    "SELECT (SELECT decision FROM decisions WHERE key = ? AND expires_at > ?), "
                    "(SELECT 1 FROM leases WHERE key = ? AND expires_at > ?)",
                    (key, now, key, now),
                )
                decision, held = row.fetchone()
            if decision is not None:
                return Decision.model_validate_json(decision)
            if held:
                return None
            taken = self.claim(key, lease)
            if taken is None:
                return None
            # The holder may have put and released between our read and our claim: its
            # decision is then already stored, and computing it again would be wasted.
            stored = self.get_many([key])[0]
            if stored is not None:
                taken.release()
                return stored
            return taken

        return _poll_until(key, timeout_s, step)

    def _release_lease(self, key: str, token: str) -> None:
        with self._errors("releasing a single-flight lease"):
            self._connection().execute(
                "DELETE FROM leases WHERE key = ? AND token = ?", (key, token)
            )

    def close(self) -> None:
        """See :meth:`DecisionCache.close` (closes every thread's connection)."""
        with self._lock:
            connections, self._connections = self._connections, []
            self._local = threading.local()
        for connection in connections:
            connection.close()


def open_cache(settings: Settings) -> DecisionCache:
    """The decision cache that ``settings`` ask for.

    Redis at ``settings.redis_url`` (keys under ``settings.cache_prefix``) when it is set, else
    the SQLite file at ``settings.resolved_cache_path`` (its parent directories are created).
    Opening Redis does not connect; the first call does, and fails with
    :class:`~tiergate.workers.errors.CoordinationError` if Redis is unreachable.
    """
    if settings.redis_url:
        return RedisDecisionCache(shared_redis(settings.redis_url), settings.cache_prefix)
    return SqliteDecisionCache(settings.resolved_cache_path)
