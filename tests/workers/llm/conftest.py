"""Fixtures of the LLM-tier tests.

A fake provider server, settings pointing at it, a policy factory, and the real local Redis
with a key prefix of the test's own.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis

from tiergate.policies.spec import Generation, LabelSpec, LLMSpec, PolicySpec, ProviderRef
from tiergate.workers.llm.testing import FakeLLMServer
from tiergate.workers.settings import Settings

# The model each provider name stands for in these tests (both have list prices in settings).
MODELS = {"openai": "gpt-4o-mini", "anthropic": "claude-haiku-4-5"}


@pytest.fixture
def server() -> Iterator[FakeLLMServer]:
    """A fake OpenAI/Anthropic server on a free local port, stopped after the test."""
    with FakeLLMServer() as fake:
        yield fake


@pytest.fixture
def make_settings(server: FakeLLMServer) -> Callable[..., Settings]:
    """Settings with both keys set and both endpoints at the fake server, one SDK retry.

    The timeout is far above any local answer; a test that needs one to fire sets its own.
    """

    def make(**overrides: Any) -> Settings:
        values: dict[str, Any] = {
            "openai_api_key": "k",
            "anthropic_api_key": "k",
            "openai_base_url": server.openai_base_url,
            "anthropic_base_url": server.anthropic_base_url,
            "llm_timeout_s": 10.0,
            "llm_max_retries": 1,
            "breaker_failures": 5,
            "breaker_reset_s": 30.0,
        }
        values.update(overrides)
        return Settings(**values)

    return make


def _policy(
    *providers: str,
    multi_label: bool = False,
    generation_labels: tuple[str, ...] = (),
    instructions: str = "",
) -> PolicySpec:
    return PolicySpec(
        name="reviews",
        version="7",
        multi_label=multi_label,
        labels=[
            LabelSpec(name="positive", description="The reviewer liked it."),
            LabelSpec(name="negative", description="The reviewer disliked it."),
            LabelSpec(name="mixed", description="Both praise and criticism."),
        ],
        generation=Generation(labels=list(generation_labels)),
        llm=LLMSpec(
            providers=[ProviderRef(provider=name, model=MODELS[name]) for name in providers],
            instructions=instructions,
        ),
    )


@pytest.fixture
def make_policy() -> Callable[..., PolicySpec]:
    """A review-sentiment policy (positive, negative, mixed) asking the named providers."""
    return _policy


@pytest.fixture
def redis_store() -> Iterator[tuple[redis.Redis, str]]:
    """A client of the local Redis and a fresh key prefix; the prefix's keys are deleted."""
    client = redis.Redis(host="127.0.0.1", port=6379)
    prefix = f"tiergate-test-{uuid.uuid4().hex}"
    try:
        yield client, prefix
    finally:
        keys = list(client.scan_iter(match=f"{prefix}:*"))
        if keys:
            client.delete(*keys)
        client.close()
