"""The gateway's Prometheus metrics of LLM cost: prompt-cache tokens and dollars by mode."""

from prometheus_client.parser import text_string_to_metric_families

from tiergate.gateway.http.metrics import GatewayMetrics
from tiergate.policies.routing import Reason
from tiergate.workers.schemas import Decision, LLMMode, LLMUsage, Tier


def decision(usage, *, cached=False):
    """An LLM decision that cost ``usage``."""
    return Decision(
        id="m",
        label="a",
        labels=["a"],
        scores={"a": 1.0},
        tier=Tier.LLM,
        reason=Reason.LOW_CONFIDENCE,
        chunks=1,
        model_version="v",
        policy="p",
        llm=usage,
        cached=cached,
    )


def samples(metrics):
    """Every sample of the rendered metrics as ``{(name, sorted labels): value}``."""
    found = {}
    for family in text_string_to_metric_families(metrics.render().decode()):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


def test_cached_and_written_input_tokens_and_cost_by_mode_are_counted():
    """Cache reads and writes are counted per model, calls and dollars per mode; cache hits not."""
    metrics = GatewayMetrics()
    online = LLMUsage(
        provider="anthropic",
        model="claude-haiku-4-5",
        input_tokens=5040,
        cached_input_tokens=5000,
        cache_write_tokens=0,
        output_tokens=12,
        cost_usd=0.0006,
    )
    batch = online.model_copy(
        update={"cached_input_tokens": 0, "cache_write_tokens": 5000, "mode": LLMMode.BATCH}
    )
    metrics.observe_decisions([decision(online), decision(batch), decision(online, cached=True)])
    got = samples(metrics)
    model = (("model", "claude-haiku-4-5"), ("provider", "anthropic"))

    def labelled(name, **labels):
        return got[(name, tuple(sorted((*model, *labels.items()))))]

    assert labelled("tiergate_llm_prompt_cache_tokens_total", use="read") == 5000
    assert labelled("tiergate_llm_prompt_cache_tokens_total", use="write") == 5000
    assert labelled("tiergate_llm_tokens_total", direction="input") == 2 * 5040
    assert labelled("tiergate_llm_cost_usd_total", mode="online") == 0.0006
    assert labelled("tiergate_llm_cost_usd_total", mode="batch") == 0.0006
    assert labelled("tiergate_llm_calls_total", mode="online") == 1
    assert labelled("tiergate_llm_calls_total", mode="batch") == 1
