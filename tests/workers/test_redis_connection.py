"""One Redis client per process: the stores share its pool; failures read as CoordinationError."""

from __future__ import annotations

import pytest

from tiergate.workers.budget import open_budget_ledger
from tiergate.workers.cache import open_cache
from tiergate.workers.errors import CoordinationError
from tiergate.workers.ledger import RedisDecisionLedger
from tiergate.workers.redis_connection import (
    probe_redis,
    redis_errors_as_coordination_errors,
    shared_redis,
)
from tiergate.workers.settings import Settings


def test_every_store_of_a_process_talks_through_one_client(redis_prefix, tmp_path):
    """Cache, budgets and ledger built from the same settings share one connection pool."""
    settings = Settings(
        redis_url="redis://127.0.0.1:6379/0", cache_prefix=redis_prefix, data_dir=tmp_path
    )
    cache = open_cache(settings)
    budget = open_budget_ledger(settings)
    ledger = RedisDecisionLedger.from_settings(settings)
    client = shared_redis("redis://127.0.0.1:6379/0")
    assert cache._client is client
    assert budget._client is client
    assert ledger.client is client
    assert shared_redis("redis://127.0.0.1:6379/1") is not client


def test_a_probe_gives_up_on_an_unreachable_redis_instead_of_hanging():
    """The probe client has its own short timeouts; the stores' client has none of its own."""
    probe = probe_redis("redis://127.0.0.1:6379/0", 2.0)
    assert probe.connection_pool.connection_kwargs["socket_timeout"] == 2.0
    assert probe is not shared_redis("redis://127.0.0.1:6379/0")
    assert probe is probe_redis("redis://127.0.0.1:6379/0", 2.0)


def test_a_refused_connection_names_what_was_done_and_where():
    """Redis that does not answer becomes a CoordinationError naming the action and address."""
    client = probe_redis("redis://127.0.0.1:1/0", 2.0)
    with (
        pytest.raises(CoordinationError, match=r"^reading a thing: Redis at 127\.0\.0\.1:1 "),
        redis_errors_as_coordination_errors(client, "reading a thing"),
    ):
        client.get("key")
