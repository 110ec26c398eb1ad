"""Prompt caching and the exact accounting of cached tokens.

A static prefix per policy version, marked and keyed for each provider; the fake server's
caches answering by each provider's published rules; costs from every usage shape.
"""

import pytest

from tiergate.policies.spec import LabelSpec, LLMSpec, PolicySpec, ProviderRef, Task
from tiergate.workers.llm.prompt import PROMPT_VERSION, build_prompt
from tiergate.workers.llm.prompt_cache import (
    CACHE_LIFETIME_S,
    anthropic_min_cacheable_tokens,
    prompt_cache_key,
)
from tiergate.workers.llm.testing import FakeLLMServer, PromptCacheSimulation, Respond
from tiergate.workers.llm.tier import LLMRequest, LLMTier

MODELS = {"openai": "gpt-4o-mini", "anthropic": "claude-haiku-4-5"}


def policy(provider, *, chars, version="1", model=None):
    """A policy of six labels with about ``chars`` characters of system prompt.

    Its descriptions and instructions are filler; it asks ``provider``, with its model in
    :data:`MODELS` unless ``model`` is given.
    """
    sentence = "Tickets about this subject name it plainly and ask for help with it. "
    filler = sentence * (chars // len(sentence) + 1)
    described = min(2000, chars // 7)  # the longest a description may be
    return PolicySpec(
        name="desk",
        version=version,
        labels=[LabelSpec(name=f"team_{i}", description=filler[:described]) for i in range(6)],
        llm=LLMSpec(
            providers=[ProviderRef(provider=provider, model=model or MODELS[provider])],
            instructions=filler[: min(8000, chars - 6 * described)],
        ),
    )


@pytest.fixture(params=["openai", "anthropic"])
def name(request):
    """Each test runs once per provider, through its own SDK."""
    return request.param


def static_part(name, body):
    """Everything of a request body but the message's user turn."""
    rest = {key: value for key, value in body.items() if key != "messages"}
    return rest, body["messages"][:-1]


def test_the_prefix_is_byte_identical_across_messages(name, server, make_settings):
    """Two messages send the same schema, system prompt and cache marks; only the turn differs."""
    tier = LLMTier(make_settings())
    spec = policy(name, chars=20_000)
    tier.answer(LLMRequest("My parcel never arrived.", spec))
    tier.answer(LLMRequest("I was charged twice for one order, please look.", spec))
    first, second = (request.body for request in server.requests)
    assert static_part(name, first) == static_part(name, second)
    assert first["messages"][-1] != second["messages"][-1]
    system_one, _ = build_prompt("a", spec, Task.CLASSIFY, ())
    system_two, _ = build_prompt("something else entirely", spec, Task.CLASSIFY, ())
    assert system_one == system_two


def test_a_new_policy_version_changes_the_prefix_and_the_cache_key(server, make_settings):
    """Version 1 and 2 of a policy send different system prompts and prompt_cache_keys."""
    tier = LLMTier(make_settings())
    for version in ("1", "2"):
        tier.answer(
            LLMRequest("Where is my parcel?", policy("openai", chars=6000, version=version))
        )
    one, two = (request.body for request in server.requests)
    assert one["messages"][0] != two["messages"][0]
    assert "(version '1')" in one["messages"][0]["content"]
    assert one["prompt_cache_key"] == prompt_cache_key("desk", "1", PROMPT_VERSION)
    assert two["prompt_cache_key"] == prompt_cache_key("desk", "2", PROMPT_VERSION)
    assert one["prompt_cache_key"] != two["prompt_cache_key"]


def test_caching_turned_off_sends_no_key_and_no_marks(name, server, make_settings):
    """Caching off: no prompt_cache_key, no cache_control; only OpenAI's automatic cache serves."""
    tier = LLMTier(make_settings(llm_prompt_caching=False))
    spec = policy(name, chars=20_000)
    usages = [tier.answer(LLMRequest("Where is my parcel?", spec)).usage for _ in range(2)]
    body = server.requests[0].body
    assert "prompt_cache_key" not in body
    if name == "anthropic":
        assert isinstance(body["system"], str)
        assert all(u.cached_input_tokens == u.cache_write_tokens == 0 for u in usages)
    else:  # OpenAI caches a repeated long prefix whatever the request says
        assert usages[1].cached_input_tokens >= 1024


def test_anthropic_marks_the_system_prompt_only_when_the_prefix_may_be_cached(
    server, make_settings
):
    """A prefix far below the model's minimum goes as plain text; a long one ends in a mark."""
    tier = LLMTier(make_settings())
    tier.answer(LLMRequest("Hello", policy("anthropic", chars=2000)))
    tier.answer(LLMRequest("Hello", policy("anthropic", chars=20_000)))
    short, long = (request.body for request in server.requests)
    assert isinstance(short["system"], str)
    assert long["system"][-1]["cache_control"] == {"type": "ephemeral"}
    assert [block["type"] for block in long["system"]] == ["text"]


def test_openai_serves_a_long_repeated_prefix_from_the_cache_in_128_token_steps(
    server, make_settings
):
    """The second call of a long prompt has cached tokens (>= 1,024, a multiple of 128)."""
    tier = LLMTier(make_settings())
    spec = policy("openai", chars=12_000)
    first = tier.answer(LLMRequest("My parcel never arrived.", spec)).usage
    second = tier.answer(LLMRequest("The invoice shows the wrong address.", spec)).usage
    assert first.cached_input_tokens == 0
    assert second.cached_input_tokens >= 1024
    assert second.cached_input_tokens % 128 == 0
    assert second.cached_input_tokens <= second.input_tokens
    assert second.cache_write_tokens == 0
    assert second.cost_usd < first.cost_usd


def test_openai_caches_nothing_under_1024_tokens(server, make_settings):
    """A repeated prompt under 1,024 tokens is never served from the cache."""
    tier = LLMTier(make_settings())
    spec = policy("openai", chars=2000)
    usages = [tier.answer(LLMRequest("Hello there", spec)).usage for _ in range(2)]
    assert [usage.cached_input_tokens for usage in usages] == [0, 0]
    assert usages[1].input_tokens < 1024


@pytest.mark.parametrize(
    ("model", "cached"),
    [("claude-3-5-haiku-latest", True), ("claude-haiku-4-5", False)],
)
def test_anthropic_caches_a_marked_prefix_only_above_the_models_minimum(
    server, make_settings, model, cached
):
    """A ~3,000-token prefix is cached by Haiku 3.5 (2,048 minimum), not Haiku 4.5 (4,096)."""
    tier = LLMTier(make_settings())
    spec = policy("anthropic", chars=12_000, model=model)
    first = tier.answer(LLMRequest("My parcel never arrived.", spec)).usage
    second = tier.answer(LLMRequest("The invoice shows the wrong address.", spec)).usage
    assert isinstance(server.requests[0].body["system"], list)  # marked either way
    if cached:
        assert first.cache_write_tokens >= anthropic_min_cacheable_tokens(model)
        assert (first.cached_input_tokens, second.cache_write_tokens) == (0, 0)
        assert second.cached_input_tokens == first.cache_write_tokens
        assert second.cost_usd < first.cost_usd
    else:
        assert (first.cache_write_tokens, first.cached_input_tokens) == (0, 0)
        assert (second.cache_write_tokens, second.cached_input_tokens) == (0, 0)


def test_a_long_prefix_is_written_once_then_read_by_haiku_4_5(server, make_settings):
    """Over 4,096 tokens, Haiku 4.5's first call writes the prefix and the next ones read it."""
    tier = LLMTier(make_settings())
    spec = policy("anthropic", chars=20_000)
    usages = [tier.answer(LLMRequest(f"Ticket number {i}", spec)).usage for i in range(3)]
    assert usages[0].cache_write_tokens >= 4096
    assert [usage.cached_input_tokens for usage in usages[1:]] == [usages[0].cache_write_tokens] * 2
    assert all(usage.cache_write_tokens == 0 for usage in usages[1:])


def test_a_cached_prefix_expires_after_its_lifetime_without_use():
    """The simulated cache forgets a prefix unused for longer than the cache lifetime."""
    now = [0.0]
    cache = PromptCacheSimulation(clock=lambda: now[0])
    body = {"model": "gpt-4o-mini", "prompt_cache_key": "k"}
    text = "x" * 4 * 1500
    assert cache.openai(body, text).read == 0
    now[0] += CACHE_LIFETIME_S - 1
    assert cache.openai(body, text).read == 1408  # 1,024 + 3 x 128 of the 1,500 tokens
    now[0] += CACHE_LIFETIME_S + 1
    assert cache.openai(body, text).read == 0


def test_a_server_without_prompt_caching_reports_no_cached_tokens(make_settings):
    """FakeLLMServer(prompt_caching=False) serves every token uncached, as without a cache."""
    with FakeLLMServer(prompt_caching=False) as plain:
        settings = make_settings(
            openai_base_url=plain.openai_base_url, anthropic_base_url=plain.anthropic_base_url
        )
        tier = LLMTier(settings)
        for provider in ("openai", "anthropic"):
            spec = policy(provider, chars=20_000)
            usages = [tier.answer(LLMRequest("Hello", spec)).usage for _ in range(2)]
            assert all(u.cached_input_tokens == u.cache_write_tokens == 0 for u in usages)


# --------------------------------------------------------------------------- exact accounting


@pytest.mark.parametrize(
    ("provider", "usage", "tokens", "expected"),
    [
        pytest.param(
            "openai",
            {"prompt_tokens": 2000, "completion_tokens": 10},
            (2000, 0, 0, 10),
            (2000 * 0.15 + 10 * 0.60) / 1e6,
            id="openai-uncached",
        ),
        pytest.param(
            "openai",
            {
                "prompt_tokens": 2000,
                "completion_tokens": 10,
                "prompt_tokens_details": {"cached_tokens": 1920},
            },
            (2000, 1920, 0, 10),
            0.000162,  # 80 x $0.15 + 1,920 x $0.075 + 10 x $0.60 per million
            id="openai-cached_tokens",
        ),
        pytest.param(
            "anthropic",
            {
                "input_tokens": 40,
                "cache_creation_input_tokens": 5000,
                "cache_read_input_tokens": 0,
                "output_tokens": 12,
            },
            (5040, 0, 5000, 12),
            0.00635,  # 40 x $1 + 5,000 x $1.25 + 12 x $5 per million
            id="anthropic-cache_creation_input_tokens",
        ),
        pytest.param(
            "anthropic",
            {
                "input_tokens": 40,
                "cache_creation_input_tokens": 0,
                "cache_read_input_tokens": 5000,
                "output_tokens": 12,
            },
            (5040, 5000, 0, 12),
            0.0006,  # 40 x $1 + 5,000 x $0.10 + 12 x $5 per million
            id="anthropic-cache_read_input_tokens",
        ),
        pytest.param(
            "anthropic",
            {
                "input_tokens": 40,
                "cache_creation_input_tokens": 200,
                "cache_read_input_tokens": 5000,
                "output_tokens": 12,
            },
            (5240, 5000, 200, 12),
            0.00085,  # 40 x $1 + 200 x $1.25 + 5,000 x $0.10 + 12 x $5 per million
            id="anthropic-read-and-write",
        ),
    ],
)
def test_the_cost_of_each_usage_shape_is_the_hand_computed_one(
    server, make_settings, provider, usage, tokens, expected
):
    """Each provider's usage shape is read and priced exactly at the model's list prices."""
    server.script(Respond({"label": "team_0"}, usage=usage))
    result = LLMTier(make_settings()).answer(LLMRequest("Hi", policy(provider, chars=500)))
    got = result.usage
    assert (
        got.input_tokens,
        got.cached_input_tokens,
        got.cache_write_tokens,
        got.output_tokens,
    ) == tokens
    assert got.cost_usd == expected


def test_a_repaired_answer_costs_the_exact_sum_of_both_calls(server, make_settings):
    """Two calls' costs add up exactly (decimal sum, one rounding), cached tokens included."""
    shape = {
        "prompt_tokens": 1111,
        "completion_tokens": 7,
        "prompt_tokens_details": {"cached_tokens": 1024},
    }
    server.script(
        Respond({"label": "not-a-label"}, usage=shape), Respond({"label": "team_1"}, usage=shape)
    )
    result = LLMTier(make_settings()).answer(LLMRequest("Hi", policy("openai", chars=500)))
    # Per call: 87 x $0.15 + 1,024 x $0.075 + 7 x $0.60 per million = $0.00009405.
    assert result.usage.cost_usd == 0.0001881
    assert (result.usage.attempts, result.usage.cached_input_tokens) == (2, 2048)
