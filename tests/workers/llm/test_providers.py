import time

import httpx2
import pytest

from tiergate.policies.spec import ProviderRef, Task
from tiergate.workers.errors import PermanentLLMError, ProviderNotConfiguredError, TransientLLMError
from tiergate.workers.llm.prompt import SCHEMA_NAME, answer_schema, build_prompt
from tiergate.workers.llm.provider import (
    MAX_RETRY_WAIT_S,
    PROVIDERS,
    ProviderRequest,
    build_provider,
    no_retry_after_long_waits,
    retry_after_seconds,
)
from tiergate.workers.llm.testing import (
    ANTHROPIC_PATH,
    OPENAI_PATH,
    Fail,
    Refuse,
    Respond,
    RespondRaw,
    Stall,
    Truncate,
)

PATHS = {"openai": OPENAI_PATH, "anthropic": ANTHROPIC_PATH}
MODELS = {"openai": "gpt-4o-mini", "anthropic": "claude-haiku-4-5"}


@pytest.fixture(params=["openai", "anthropic"])
def name(request):
    """Each provider test runs once per provider, through its own SDK."""
    return request.param


@pytest.fixture
def request_for(make_policy):
    """Build the wire request for one text under the review policy."""

    def build(text="A fine film.", repair_of=None):
        spec = make_policy()
        system, user = build_prompt(text, spec, Task.CLASSIFY, ())
        return ProviderRequest(
            system=system,
            user=user,
            schema=answer_schema(spec, Task.CLASSIFY, ()),
            schema_name=SCHEMA_NAME,
            max_output_tokens=64,
            repair_of=repair_of,
        )

    return build


def provider_for(name, settings):
    """The provider ``name`` built from ``settings`` as the tier builds it."""
    return build_provider(ProviderRef(provider=name, model=MODELS[name]), settings)


def test_a_valid_answer_is_parsed_with_usage(name, server, make_settings, request_for):
    """The SDK's request reaches the server in the provider's format and the answer parses."""
    server.script(Respond({"label": "negative"}))
    answer = provider_for(name, make_settings()).complete(request_for())
    assert answer.data == {"label": "negative"}
    assert answer.refusal is None
    assert answer.input_tokens > 0
    assert answer.output_tokens > 0
    assert server.calls_by_path == {PATHS[name]: 1}
    body = server.requests[0].body
    assert body["model"] == MODELS[name]
    if name == "openai":
        assert body["response_format"]["json_schema"]["strict"] is True
        assert body["response_format"]["json_schema"]["name"] == SCHEMA_NAME
        assert body["max_completion_tokens"] == 64
        assert [m["role"] for m in body["messages"]] == ["system", "user"]
    else:
        assert body["tool_choice"] == {"type": "tool", "name": SCHEMA_NAME}
        assert body["tools"][0]["input_schema"]["required"] == ["label"]
        assert body["max_tokens"] == 64
        assert body["system"].startswith("You classify messages")


def test_a_429_with_retry_after_is_retried_after_the_wait(name, server, make_settings, request_for):
    """The SDK waits the Retry-After the server asked for, then succeeds on its retry."""
    server.script(Fail(429, retry_after=1), Respond({"label": "positive"}))
    provider = provider_for(name, make_settings(llm_max_retries=1))
    started = time.monotonic()
    answer = provider.complete(request_for())
    assert time.monotonic() - started >= 1.0
    assert answer.data == {"label": "positive"}
    assert server.calls == 2


def test_a_very_long_retry_after_is_not_slept_through(name, server, make_settings, request_for):
    """A 429 asking for ten minutes fails fast as transient, carrying the wait.

    The tier then moves on to the next provider instead of parking a worker.
    """
    server.script(Fail(429, retry_after=600))
    provider = provider_for(name, make_settings(llm_max_retries=2))
    started = time.monotonic()
    with pytest.raises(TransientLLMError) as caught:
        provider.complete(request_for())
    assert caught.value.retry_after == pytest.approx(600, abs=1)
    assert server.calls == 1
    assert time.monotonic() - started < 30  # the ten minutes were not slept through


def test_a_retry_after_over_a_minute_is_not_retried_by_either_sdk(
    name, server, make_settings, request_for
):
    """Two minutes asked for: one request, no retry, a transient error carrying the wait.

    The OpenAI SDK would sleep through waits up to two minutes; neither provider may.
    """
    server.script(Fail(429, retry_after=120), Fail(429, retry_after=120))
    provider = provider_for(name, make_settings(llm_max_retries=1))
    with pytest.raises(TransientLLMError) as caught:
        provider.complete(request_for())
    assert (caught.value.status_code, caught.value.retry_after) == (429, 120.0)
    assert server.calls_by_path == {PATHS[name]: 1}


@pytest.mark.parametrize(("retry_after", "retried"), [(MAX_RETRY_WAIT_S, True), (61.0, False)])
def test_the_retry_hook_marks_only_waits_over_the_bound(retry_after, retried):
    """A response asking for at most MAX_RETRY_WAIT_S is left for the SDK to retry."""
    response = httpx2.Response(429, headers={"retry-after": f"{retry_after:g}"})
    no_retry_after_long_waits(response)
    assert ("x-should-retry" not in response.headers) is retried


def test_a_500_is_retried_by_the_sdk(name, server, make_settings, request_for):
    """One server error costs one SDK retry and no error."""
    server.script(Fail(500), Respond({"label": "mixed"}))
    answer = provider_for(name, make_settings(llm_max_retries=1)).complete(request_for())
    assert answer.data == {"label": "mixed"}
    assert server.calls == 2


def test_persistent_429_becomes_transient_with_retry_after(
    name, server, make_settings, request_for
):
    """Once retries are spent, a 429 is a TransientLLMError carrying status and Retry-After."""
    server.script(Fail(429, retry_after=7))
    with pytest.raises(TransientLLMError) as caught:
        provider_for(name, make_settings(llm_max_retries=0)).complete(request_for())
    assert caught.value.status_code == 429
    assert caught.value.retry_after == 7.0
    assert caught.value.provider == name


def test_a_timeout_becomes_transient(name, server, make_settings, request_for):
    """A server slower than llm_timeout_s gives TransientLLMError without waiting it out."""
    server.script(Stall(600))
    provider = provider_for(name, make_settings(llm_timeout_s=0.3, llm_max_retries=0))
    started = time.monotonic()
    with pytest.raises(TransientLLMError, match="timed out"):
        provider.complete(request_for())
    assert time.monotonic() - started < 30  # the stall was not waited out


def test_an_unreachable_server_becomes_transient(name, make_settings, request_for):
    """Nothing listening on the endpoint is a transient connection failure."""
    settings = make_settings(
        openai_base_url="http://127.0.0.1:1/v1",
        anthropic_base_url="http://127.0.0.1:1",
        llm_max_retries=0,
    )
    with pytest.raises(TransientLLMError, match="connection failed"):
        provider_for(name, settings).complete(request_for())


@pytest.mark.parametrize("status", [400, 401, 403, 404, 422])
def test_client_errors_are_permanent(name, status, server, make_settings, request_for):
    """4xx other than 408/409/429 are PermanentLLMError and are not retried by the SDK."""
    server.script(Fail(status))
    with pytest.raises(PermanentLLMError) as caught:
        provider_for(name, make_settings(llm_max_retries=2)).complete(request_for())
    assert caught.value.status_code == status
    assert server.calls == 1


def test_malformed_output_gives_no_data(name, server, make_settings, request_for):
    """Output that is not a JSON object comes back as raw text with data None."""
    server.script(RespondRaw("The answer is positive."))
    answer = provider_for(name, make_settings()).complete(request_for())
    assert answer.data is None
    assert answer.raw == "The answer is positive."


def test_an_answer_cut_off_at_the_output_limit_is_reported_as_truncated(
    name, server, make_settings, request_for
):
    """finish_reason length (OpenAI) or stop_reason max_tokens (Anthropic) sets truncated."""
    server.script(Truncate(), Respond({"label": "mixed"}))
    provider = provider_for(name, make_settings())
    cut = provider.complete(request_for())
    assert cut.truncated is True
    assert cut.output_tokens == 64  # the whole output limit was spent
    whole = provider.complete(request_for())
    assert (whole.truncated, whole.data) == (False, {"label": "mixed"})


def test_a_refusal_is_reported(name, server, make_settings, request_for):
    """The provider's refusal comes back as refusal text, with no data."""
    server.script(Refuse("I won't classify this."))
    answer = provider_for(name, make_settings()).complete(request_for())
    assert answer.refusal == "I won't classify this."
    assert answer.data is None


def test_a_repair_request_sends_the_previous_answer_and_the_error(
    name, server, make_settings, request_for
):
    """The repair attempt adds the previous answer as an assistant turn and names the error."""
    request = request_for(repair_of=('{"label": "great"}', "label: 'great' not among the labels"))
    provider_for(name, make_settings()).complete(request)
    turns = server.requests[0].body["messages"]
    assert turns[-2] == {"role": "assistant", "content": '{"label": "great"}'}
    assert turns[-1]["role"] == "user"
    assert "label: 'great' not among the labels" in turns[-1]["content"]


def test_a_missing_api_key_names_the_setting(name, make_settings):
    """Without a key the provider is not built, and the error names the variable to set."""
    settings = make_settings(**{f"{name}_api_key": None})
    with pytest.raises(ProviderNotConfiguredError, match=f"TIERGATE_{name.upper()}_API_KEY"):
        provider_for(name, settings)


def test_a_policy_base_url_overrides_the_setting(name, server, make_settings, request_for):
    """A provider entry's base_url wins over the settings endpoint."""
    settings = make_settings(openai_base_url="http://127.0.0.1:1/v1", anthropic_base_url=None)
    url = server.openai_base_url if name == "openai" else server.anthropic_base_url
    provider = build_provider(ProviderRef(provider=name, model="local", base_url=url), settings)
    provider.complete(request_for())
    assert server.calls == 1


def test_an_unknown_provider_lists_the_known_ones(make_settings):
    """Naming a provider that is not registered fails with the registered names."""
    with pytest.raises(ProviderNotConfiguredError, match="anthropic, openai") as caught:
        build_provider(ProviderRef(provider="mistral", model="m"), make_settings())
    assert sorted(PROVIDERS) == ["anthropic", "openai"]
    assert caught.value.provider == "mistral"


@pytest.mark.parametrize(
    ("headers", "seconds"),
    [
        ({"retry-after": "3"}, 3.0),
        ({"retry-after": "1.5"}, 1.5),
        ({"retry-after-ms": "250", "retry-after": "9"}, 0.25),
        ({"retry-after": "soon"}, None),
        ({}, None),
    ],
)
def test_retry_after_is_read_from_either_header(headers, seconds):
    """Retry-After in seconds, or retry-after-ms, is understood; nonsense is ignored."""
    assert retry_after_seconds(headers) == seconds
