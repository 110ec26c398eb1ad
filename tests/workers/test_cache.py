import json
import re
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
import unicodedata
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import redis
from hypothesis import given
from hypothesis import strategies as st
from redis.backoff import NoBackoff
from redis.retry import Retry

from tiergate.policies.routing import Reason
from tiergate.workers.cache import (
    DecisionCache,
    Lease,
    RedisDecisionCache,
    SqliteDecisionCache,
    cache_key,
    normalise,
    open_cache,
)
from tiergate.workers.errors import CoordinationError, SingleFlightTimeout
from tiergate.workers.schemas import Decision, LLMUsage, Tier
from tiergate.workers.settings import Settings

KEY_PARTS = ("policy", "policy_version", "model_version", "llm_route", "prompt_version", "task")
BASE_PARTS = {
    "policy": "support",
    "policy_version": "3",
    "model_version": "minilm-rt-1",
    "llm_route": "openai:gpt-4o-mini",
    "prompt_version": "p1",
    "task": "classify",
}
WHITESPACE = " \t\n\r\x0b\x0c\xa0\u2003\u3000\u2028"


def key_of(text: str, **changes: str) -> str:
    """The cache key of ``text`` with the base parts, some of them changed."""
    return cache_key(text, **{**BASE_PARTS, **changes})


def make_decision(label: str = "positive", message_id: str = "m-1") -> Decision:
    """A realistic LLM decision."""
    return Decision(
        id=message_id,
        label=label,
        labels=[label],
        scores={"positive": 0.55, "negative": 0.45},
        tier=Tier.LLM,
        reason=Reason.LOW_MARGIN,
        chunks=1,
        model_version="minilm-rt-1",
        policy="support",
        policy_version="3",
        llm=LLMUsage(
            provider="openai", model="gpt-4o-mini", input_tokens=42, output_tokens=3, cost_usd=2e-5
        ),
        timings_ms={"bert": 3.5, "llm": 412.0},
    )


@pytest.fixture(params=["redis", "sqlite"])
def backend(request: pytest.FixtureRequest) -> str:
    """The name of the backend under test."""
    return str(request.param)


@pytest.fixture
def cache_target(backend: str, redis_prefix: str, tmp_path: Path) -> str:
    """Where the backend keeps its data: a Redis key prefix or a SQLite file."""
    return redis_prefix if backend == "redis" else str(tmp_path / "cache.sqlite3")


def open_backend(backend: str, target: str) -> DecisionCache:
    """A cache of the named backend over ``target``."""
    if backend == "redis":
        return RedisDecisionCache(redis.Redis(host="127.0.0.1", port=6379), prefix=target)
    return SqliteDecisionCache(Path(target))


@pytest.fixture
def cache(backend: str, cache_target: str) -> Iterator[DecisionCache]:
    """The backend under test, closed afterwards."""
    opened = open_backend(backend, cache_target)
    yield opened
    opened.close()


# --- normalise and cache_key


@given(st.text())
def test_composed_and_decomposed_text_share_a_key(text):
    """NFC and NFD spellings of the same text give the same key."""
    nfc, nfd = unicodedata.normalize("NFC", text), unicodedata.normalize("NFD", text)
    assert key_of(nfc) == key_of(nfd)


def test_normalise_composes_accents_and_collapses_whitespace():
    """Normalising composes accents, collapses whitespace runs to one space, and strips."""
    assert normalise("  cafe\u0301 \t\n au\xa0 lait\u3000") == "caf\xe9 au lait"


words = st.lists(
    st.text(min_size=1).filter(lambda word: not any(ch.isspace() for ch in word)), min_size=1
)
gaps = st.text(alphabet=WHITESPACE, min_size=1, max_size=4)


@given(words, st.data())
def test_whitespace_variants_share_a_key(parts, data):
    """Any runs of any whitespace between, before and after the words give the same key."""
    plain = " ".join(parts)
    spaced = data.draw(st.text(alphabet=WHITESPACE, max_size=3))
    for part in parts:
        spaced += part + data.draw(gaps)
    assert key_of(spaced) == key_of(plain)


@pytest.mark.parametrize("part", KEY_PARTS)
@given(text=st.text(min_size=1), old=st.text(), new=st.text())
def test_a_change_in_any_other_part_changes_the_key(part, text, old, new):
    """Changing any one part besides the text gives a different key."""
    if old == new:
        new = old + "x"
    assert key_of(text, **{part: old}) != key_of(text, **{part: new})


@given(st.text(), st.text(min_size=1), st.text())
def test_part_boundaries_are_unambiguous(a, b, c):
    """Moving characters from one part into the next changes the key."""
    assert key_of(a, policy=b + c) != key_of(a + b, policy=c)
    assert key_of("t", policy=a, policy_version=b + c) != key_of(
        "t", policy=a + b, policy_version=c
    )


@given(st.text(min_size=1))
def test_key_is_hex_and_does_not_contain_the_text(text):
    """A key is 64 lowercase hex digits and never carries the text."""
    key = key_of(text)
    assert re.fullmatch(r"[0-9a-f]{64}", key)
    if re.search(r"[^0-9a-f]", normalise(text)):
        assert normalise(text) not in key


def test_different_texts_get_different_keys():
    """Texts that differ after normalisation get different keys."""
    assert key_of("I love it") != key_of("I loved it")
    assert key_of("I love it") != key_of("i love it")  # case can change a label, so it is kept


# --- both backends: storage


def test_put_then_get_many_round_trips_in_order(cache):
    """Stored decisions come back equal, in key order, with None for missing keys."""
    first, second = make_decision("positive", "a"), make_decision("negative", "b")
    cache.put("k1", first, 60)
    cache.put("k2", second, 60)
    assert cache.get_many(["k2", "missing", "k1", "k1"]) == [second, None, first, first]
    assert cache.get_many([]) == []


def test_put_replaces_an_existing_decision(cache):
    """A second put under the same key replaces the first decision."""
    cache.put("k", make_decision("positive"), 60)
    cache.put("k", make_decision("negative"), 60)
    assert cache.get_many(["k"]) == [make_decision("negative")]


def test_forget_deletes_one_decision(cache):
    """Forgetting a key removes its decision only, and says whether there was one."""
    cache.put("k1", make_decision("positive", "a"), 60)
    cache.put("k2", make_decision("negative", "b"), 60)
    assert cache.forget("k1") is True
    assert cache.forget("k1") is False
    assert cache.get_many(["k1", "k2"]) == [None, make_decision("negative", "b")]


def test_ttl_zero_stores_nothing(cache):
    """A ttl of 0 leaves the key empty."""
    cache.put("k", make_decision(), 0)
    assert cache.get_many(["k"]) == [None]


def test_decision_expires_after_its_ttl(cache):
    """A decision put with ttl 2 s is there at once and gone once its ttl has passed."""
    cache.put("k", make_decision(), 2)
    assert cache.get_many(["k"]) == [make_decision()]
    deadline = time.monotonic() + 60
    while cache.get_many(["k"]) != [None]:
        assert time.monotonic() < deadline, "the decision outlived its ttl"
        time.sleep(0.05)


def test_put_many_stores_each_entry_with_a_positive_ttl(cache):
    """put_many stores every entry with a ttl above 0 and skips the others; [] is a no-op."""
    first, second = make_decision("positive", "a"), make_decision("negative", "b")
    cache.put_many([])
    cache.put_many([("k1", first, 60), ("zero", first, 0), ("k2", second, 30), ("neg", first, -5)])
    assert cache.get_many(["k1", "zero", "k2", "neg"]) == [first, None, second, None]
    cache.put_many([("k1", second, 60)])
    assert cache.get_many(["k1"]) == [second]


def test_redis_put_many_sets_each_keys_own_ttl(redis_prefix):
    """Each key put_many writes expires after its own ttl; skipped and empty puts write none."""
    client = redis.Redis(host="127.0.0.1", port=6379)
    cache = RedisDecisionCache(client, prefix=redis_prefix)
    cache.put_many([])
    cache.put_many([("zero", make_decision(), 0)])
    assert list(client.scan_iter(match=f"{redis_prefix}:*")) == []
    cache.put_many([("long", make_decision(), 600), ("short", make_decision(), 20)])
    assert 20 < client.ttl(f"{redis_prefix}:decision:long") <= 600
    assert 0 < client.ttl(f"{redis_prefix}:decision:short") <= 20
    cache.close()


def test_sqlite_purge_counts_every_row_put_many_writes(tmp_path):
    """Expired rows are purged once the rows written pass 1000, even mid-batch."""
    path = tmp_path / "cache.sqlite3"
    cache = SqliteDecisionCache(path)
    connection = sqlite3.connect(path, isolation_level=None)
    connection.execute(
        "INSERT INTO decisions (key, decision, expires_at) VALUES ('expired', '{}', ?)",
        (time.time() - 1,),
    )

    def stored_rows() -> int:
        return connection.execute("SELECT count(*) FROM decisions").fetchone()[0]

    cache.put_many([(f"k{i}", make_decision(), 60) for i in range(999)])
    assert stored_rows() == 1000  # 999 puts: the expired row is still there
    cache.put_many([("k999", make_decision(), 60), ("k1000", make_decision(), 60)])
    assert stored_rows() == 1001
    assert connection.execute("SELECT 1 FROM decisions WHERE key = 'expired'").fetchone() is None
    connection.close()
    cache.close()


def test_redis_keys_carry_the_prefix_and_not_the_text(redis_prefix):
    """Redis keys are prefix:decision:<hash>; the text appears in no key."""
    client = redis.Redis(host="127.0.0.1", port=6379)
    cache = RedisDecisionCache(client, prefix=redis_prefix)
    text = "Where is my parcel? Order 12345"
    key = key_of(text)
    cache.put(key, make_decision(), 60)
    lease = cache.claim(key, 5)
    assert lease is not None
    stored = sorted(k.decode() for k in client.scan_iter(match=f"{redis_prefix}:*"))
    assert stored == [f"{redis_prefix}:decision:{key}", f"{redis_prefix}:lease:{key}"]
    assert 0 < client.ttl(f"{redis_prefix}:decision:{key}") <= 60
    assert not any("parcel" in k for k in stored)
    lease.release()
    cache.close()


def test_redis_cache_reads_decoded_responses(redis_prefix):
    """A client built with decode_responses=True works the same."""
    cache = RedisDecisionCache(
        redis.Redis(host="127.0.0.1", port=6379, decode_responses=True), prefix=redis_prefix
    )
    cache.put("k", make_decision(), 60)
    assert cache.get_many(["k", "other"]) == [make_decision(), None]
    got = cache.wait("other", timeout_s=1)
    assert isinstance(got, Lease)
    got.release()
    assert cache.wait("k", timeout_s=1) == make_decision()
    cache.close()


def test_sqlite_purges_expired_rows_on_open(tmp_path):
    """Expired decisions and leases are deleted when the file is opened again."""
    path = tmp_path / "cache.sqlite3"
    cache = SqliteDecisionCache(path)
    cache.put("old", make_decision(), 1)
    cache.put("fresh", make_decision(), 60)
    assert cache.claim("lease", 0.05) is not None
    cache.close()
    time.sleep(1.05)
    SqliteDecisionCache(path).close()
    connection = sqlite3.connect(path)
    keys = [row[0] for row in connection.execute("SELECT key FROM decisions")]
    leases = connection.execute("SELECT count(*) FROM leases").fetchone()[0]
    connection.close()
    assert keys == ["fresh"]
    assert leases == 0


def test_sqlite_that_cannot_be_opened_raises_coordination_error(tmp_path):
    """A cache path that is a directory fails with CoordinationError naming the path."""
    with pytest.raises(CoordinationError, match=re.escape(str(tmp_path))):
        SqliteDecisionCache(tmp_path)


# --- both backends: leases and single-flight


def test_claim_is_exclusive_until_released(cache):
    """A held lease refuses a second claim; after release the key can be claimed again."""
    lease = cache.claim("k", 5)
    assert lease is not None
    assert lease.key == "k"
    assert cache.claim("k", 5) is None
    lease.release()
    lease.release()  # idempotent
    again = cache.claim("k", 5)
    assert again is not None
    assert again.token != lease.token
    again.release()


def test_release_after_expiry_leaves_the_new_holders_lease(cache):
    """Releasing an expired lease does not delete the lease another worker took since."""
    stale = cache.claim("k", 0.1)
    assert stale is not None
    time.sleep(0.15)
    current = cache.claim("k", 5)
    assert current is not None
    stale.release()
    assert cache.claim("k", 5) is None
    current.release()


def test_wait_returns_a_stored_decision_without_a_lease(cache):
    """Waiting on a cached key returns the decision and takes no lease."""
    cache.put("k", make_decision(), 60)
    assert cache.wait("k", timeout_s=1) == make_decision()
    lease = cache.claim("k", 1)
    assert lease is not None
    lease.release()


def test_fifty_threads_share_one_computation(cache):
    """50 threads waiting on one key: one computes, the other 49 get its decision."""
    decision = make_decision()
    computations = 0
    lock = threading.Lock()
    start = threading.Barrier(50)

    def ask() -> Decision:
        start.wait()
        got = cache.wait("k", timeout_s=10)
        if isinstance(got, Decision):
            return got
        nonlocal computations
        with lock:
            computations += 1
        time.sleep(0.2)
        cache.put("k", decision, 60)
        got.release()
        return decision

    with ThreadPoolExecutor(max_workers=50) as pool:
        results = list(pool.map(lambda _: ask(), range(50)))
    assert computations == 1
    assert results == [decision] * 50


CONTENDER = textwrap.dedent(
    """
    import os, sys, threading, time
    from pathlib import Path
    import redis
    from tiergate.workers.cache import Lease, RedisDecisionCache, SqliteDecisionCache
    from tiergate.workers.schemas import Decision

    backend, target, key, go, counter, decision_json = sys.argv[1:]
    if backend == "redis":
        cache = RedisDecisionCache(redis.Redis(host="127.0.0.1", port=6379), prefix=target)
    else:
        cache = SqliteDecisionCache(Path(target))
    decision = Decision.model_validate_json(decision_json)
    results = []

    def ask():
        got = cache.wait(key, timeout_s=20)
        if isinstance(got, Lease):
            with open(counter, "a") as tally:
                tally.write("x")
            time.sleep(0.2)
            cache.put(key, decision, 60)
            got.release()
            got = decision
        results.append(got.model_dump_json())

    threads = [threading.Thread(target=ask) for _ in range(5)]
    print("ready", flush=True)
    while not os.path.exists(go):
        time.sleep(0.002)
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    cache.close()
    print("\\n".join(results), flush=True)
    """
)


def test_processes_share_one_computation(backend, cache_target, tmp_path):
    """8 processes x 5 threads waiting on one key: exactly one computation in all."""
    decision = make_decision()
    go, counter = tmp_path / "go", tmp_path / "computations"
    counter.touch()
    args = [backend, cache_target, "shared-key", str(go), str(counter), decision.model_dump_json()]
    processes = [
        subprocess.Popen(
            [sys.executable, "-c", CONTENDER, *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(8)
    ]
    try:
        for process in processes:
            assert process.stdout is not None
            assert process.stdout.readline() == "ready\n"
        go.touch()  # every process is up: all 40 threads ask at once
        outputs = [process.communicate(timeout=30) for process in processes]
    finally:
        for process in processes:
            process.kill()
            process.wait()
    assert all(process.returncode == 0 for process in processes), [err for _, err in outputs]
    results = [line for out, _ in outputs for line in out.splitlines()]
    assert len(results) == 40
    assert [Decision.model_validate_json(line) for line in results] == [decision] * 40
    assert counter.read_text() == "x"


def test_waiter_takes_over_from_a_holder_that_died(cache):
    """A lease that is never released expires, and a waiter then gets the lease itself."""
    started = time.monotonic()  # before the claim, so the lease expires 0.3 s or more after it
    dead = cache.claim("k", 0.3)  # the holder is "killed": it never puts or releases
    assert dead is not None
    got = cache.wait("k", timeout_s=60)
    waited = time.monotonic() - started
    assert isinstance(got, Lease)
    assert got.token != dead.token
    assert 0.2 <= waited < 30  # taken once the lease expired, long before the timeout
    got.release()


def test_waiter_takes_over_when_the_holder_releases_without_a_decision(cache):
    """A holder that fails and releases lets a waiter take the lease at once."""
    failed = cache.claim("k", 600)
    assert failed is not None
    threading.Timer(0.1, failed.release).start()
    started = time.monotonic()
    got = cache.wait("k", timeout_s=60)
    assert isinstance(got, Lease)
    assert time.monotonic() - started < 30  # at the release, not at the lease's expiry
    got.release()


def test_waiter_gets_the_decision_the_holder_puts(cache):
    """A waiter returns the holder's decision once it is put and the lease released."""
    holder = cache.claim("k", 30)
    assert holder is not None

    def finish() -> None:
        cache.put("k", make_decision(), 60)
        holder.release()

    threading.Timer(0.1, finish).start()
    assert cache.wait("k", timeout_s=60) == make_decision()


def test_waiter_times_out_before_a_long_lease_expires(cache):
    """A waiter whose timeout is shorter than the holder's lease raises SingleFlightTimeout."""
    holder = cache.claim("k", 600)
    assert holder is not None
    started = time.monotonic()
    with pytest.raises(SingleFlightTimeout, match="k"):
        cache.wait("k", timeout_s=0.2)
    assert 0.2 <= time.monotonic() - started < 30  # at its timeout, not at the lease's expiry
    holder.release()


def lease_seconds_left(backend: str, target: str, key: str) -> float:
    """How long the stored lease on ``key`` has left, read from the store itself."""
    if backend == "redis":
        with redis.Redis(host="127.0.0.1", port=6379) as client:
            return int(client.pttl(f"{target}:lease:{key}")) / 1000
    connection = sqlite3.connect(target)
    try:
        (expires_at,) = connection.execute(
            "SELECT expires_at FROM leases WHERE key = ?", (key,)
        ).fetchone()
    finally:
        connection.close()
    return float(expires_at) - time.time()


def test_wait_takes_the_lease_for_lease_s(cache, backend, cache_target):
    """The lease_s given to wait sets how long the lease it takes lasts (not timeout_s)."""
    got = cache.wait("k", timeout_s=600, lease_s=120)
    assert isinstance(got, Lease)
    assert cache.claim("k", 5) is None
    assert 60 < lease_seconds_left(backend, cache_target, "k") <= 120
    got.release()


def test_wait_refuses_a_non_positive_lease(cache):
    """A lease of zero seconds is a caller bug and raises ValueError."""
    with pytest.raises(ValueError, match="lease_s"):
        cache.wait("k", timeout_s=1, lease_s=0)


# --- Redis down, and open_cache


@pytest.fixture
def unreachable_cache() -> Iterator[RedisDecisionCache]:
    """A Redis cache pointed at a closed port, failing fast (no retries)."""
    client = redis.Redis(
        host="127.0.0.1", port=1, socket_connect_timeout=1, retry=Retry(NoBackoff(), 0)
    )
    cache = RedisDecisionCache(client, prefix="unused")
    yield cache
    cache.close()


@pytest.mark.parametrize(
    "operation",
    [
        lambda cache: cache.get_many(["k"]),
        lambda cache: cache.put("k", make_decision(), 60),
        lambda cache: cache.claim("k", 1),
        lambda cache: cache.wait("k", timeout_s=1),
    ],
    ids=["get_many", "put", "claim", "wait"],
)
def test_redis_down_raises_coordination_error(unreachable_cache, operation):
    """Every cache operation against a closed port raises CoordinationError naming Redis."""
    with pytest.raises(CoordinationError, match=r"Redis at 127\.0\.0\.1:1 is unreachable"):
        operation(unreachable_cache)


def test_open_cache_uses_redis_when_a_url_is_set(redis_prefix, tmp_path):
    """With redis_url set, open_cache stores decisions in Redis under the cache prefix."""
    settings = Settings(
        redis_url="redis://127.0.0.1:6379/0", cache_prefix=redis_prefix, data_dir=tmp_path
    )
    cache = open_cache(settings)
    assert isinstance(cache, RedisDecisionCache)
    cache.put("k", make_decision(), 60)
    client = redis.Redis(host="127.0.0.1", port=6379)
    stored = client.get(f"{redis_prefix}:decision:k")
    assert stored is not None
    assert json.loads(stored)["label"] == "positive"
    client.close()
    cache.close()


def test_open_cache_falls_back_to_sqlite_and_creates_its_directory(tmp_path):
    """Without redis_url, open_cache opens SQLite at the cache path, creating parent dirs."""
    path = tmp_path / "deep" / "er" / "cache.sqlite3"
    cache = open_cache(Settings(cache_path=path, data_dir=tmp_path))
    assert isinstance(cache, SqliteDecisionCache)
    cache.put("k", make_decision(), 60)
    cache.close()
    reopened = open_cache(Settings(cache_path=path, data_dir=tmp_path))
    assert reopened.get_many(["k"]) == [make_decision()]
    reopened.close()
