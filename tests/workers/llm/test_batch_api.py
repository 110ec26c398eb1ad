"""The providers' batch APIs through the official SDKs, against the fake server's batch endpoints.

Each outcome a real batch can have: every request answered, some failed, the batch expired with
part of it run, the batch cancelled; and a batch found again by its tag after a crash.
"""

import pytest

from tiergate.policies.spec import LabelSpec, LLMSpec, PolicySpec, ProviderRef
from tiergate.workers.llm.batch_api import batch_api
from tiergate.workers.llm.prompt import SCHEMA_NAME
from tiergate.workers.llm.provider import build_provider
from tiergate.workers.llm.testing import FakeLLMServer
from tiergate.workers.llm.testing_batches import BatchPlan
from tiergate.workers.llm.tier import LLMRequest, LLMTier
from tiergate.workers.schemas import LLMMode
from tiergate.workers.settings import Price, Settings

MODELS = {"openai": "gpt-4o-mini", "anthropic": "claude-haiku-4-5"}
PROVIDERS = ["openai", "anthropic"]
PRICE = Price(input_per_mtok=1.0, output_per_mtok=4.0, batch_discount=0.5)


def spec_for(provider: str) -> PolicySpec:
    """A two-label batch-mode policy asking ``provider``."""
    return PolicySpec(
        name="batchy",
        version="1",
        labels=[LabelSpec(name="positive"), LabelSpec(name="negative")],
        llm=LLMSpec(
            providers=[ProviderRef(provider=provider, model=MODELS[provider])], mode="batch"
        ),
    )


def settings_for(server: FakeLLMServer) -> Settings:
    """Settings reaching ``server`` with both SDKs, one price for both models, no retries."""
    return Settings(
        openai_api_key="k",
        openai_base_url=server.openai_base_url,
        anthropic_api_key="k",
        anthropic_base_url=server.anthropic_base_url,
        llm_max_retries=0,
        llm_prices=dict.fromkeys(MODELS.values(), PRICE),
    )


def send(server: FakeLLMServer, provider: str, count: int, tag: str = "t-1"):
    """Submit ``count`` requests (custom ids ``r0``..) through ``provider``'s batch API."""
    settings = settings_for(server)
    spec = spec_for(provider)
    tier = LLMTier(settings)
    api = batch_api(build_provider(spec.llm.providers[0], settings))
    requests = [
        (f"r{i}", tier.batch_request(LLMRequest(text=f"message {i}", spec=spec)))
        for i in range(count)
    ]
    return api, api.submit(requests, tag), tier, spec


@pytest.mark.parametrize("provider", PROVIDERS)
def test_a_completed_batch_answers_every_request(provider):
    """Every request of a completed batch has a valid answer, priced at the batch discount."""
    with FakeLLMServer() as server:
        api, batch_id, tier, spec = send(server, provider, 3)
        assert api.status(batch_id).ended
        outcomes = api.results(batch_id, SCHEMA_NAME)
        assert sorted(outcomes) == ["r0", "r1", "r2"]
        answer = outcomes["r0"].answer
        assert answer is not None
        result = tier.batch_result(
            tier.chain(spec)[0], answer, LLMRequest(text="message 0", spec=spec)
        )
        assert result.label == "positive"
        assert result.usage.mode is LLMMode.BATCH
        online = PRICE.cost(answer.input_tokens, answer.output_tokens)
        assert result.usage.cost_usd == pytest.approx(online / 2)
        assert server.calls == 0, "no online call was made"
        assert len(server.batches.submitted) == 1


@pytest.mark.parametrize("provider", PROVIDERS)
def test_a_partly_failed_batch_reports_the_failed_requests_as_errored(provider):
    """Requests the provider failed come back errored; the others are answered."""
    with FakeLLMServer() as server:
        server.batches.plan(BatchPlan(errored=frozenset({1})))
        api, batch_id, _, _ = send(server, provider, 3)
        outcomes = api.results(batch_id, SCHEMA_NAME)
        assert outcomes["r1"].failure == "errored"
        assert outcomes["r1"].answer is None
        assert outcomes["r0"].answer is not None
        assert outcomes["r2"].answer is not None


@pytest.mark.parametrize("provider", PROVIDERS)
def test_an_expired_batch_reports_its_unrun_requests_as_expired(provider):
    """A batch that ran out of time answers what it ran; the rest come back expired."""
    with FakeLLMServer() as server:
        server.batches.plan(BatchPlan(expire_after=1))
        api, batch_id, _, _ = send(server, provider, 3)
        status = api.status(batch_id)
        assert status.ended
        outcomes = api.results(batch_id, SCHEMA_NAME)
        assert outcomes["r0"].answer is not None
        assert [outcomes[c].failure for c in ("r1", "r2")] == ["expired", "expired"]


@pytest.mark.parametrize("provider", PROVIDERS)
def test_a_cancelled_batch_ends_with_its_requests_canceled(provider):
    """A held batch stays in progress; cancelled, it ends with nothing answered."""
    with FakeLLMServer() as server:
        server.batches.plan(BatchPlan(hold=True))
        api, batch_id, _, _ = send(server, provider, 2)
        assert not api.status(batch_id).ended
        api.cancel(batch_id)
        assert api.status(batch_id).ended
        outcomes = api.results(batch_id, SCHEMA_NAME)
        assert {o.failure for o in outcomes.values()} == {"canceled"}


@pytest.mark.parametrize("provider", PROVIDERS)
def test_a_batch_in_progress_is_not_ended_until_it_is_released(provider):
    """A held batch reads as in progress, and ends once released."""
    with FakeLLMServer() as server:
        server.batches.plan(BatchPlan(hold=True))
        api, batch_id, _, _ = send(server, provider, 1)
        assert api.status(batch_id).status == "in_progress"
        server.batches.release()
        assert api.status(batch_id).ended


@pytest.mark.parametrize("provider", PROVIDERS)
def test_a_sent_batch_is_found_again_by_its_tag(provider):
    """A caller that lost the id of a batch it sent finds it at the provider."""
    with FakeLLMServer() as server:
        api, batch_id, _, _ = send(server, provider, 2, tag="tgb-lost")
        assert api.find("tgb-lost", created_after=0.0, count=2) == batch_id
        if provider == "openai":  # OpenAI keeps the tag; Anthropic is matched by time and size
            assert api.find("tgb-other", created_after=0.0, count=2) is None
        assert api.find("tgb-lost", created_after=0.0, count=5) is None or provider == "openai"
