"""Model prices: the published list prices and the exact cost of one call's usage."""

from decimal import Decimal

import pytest
from pydantic import ValidationError

from tiergate.workers.settings import DEFAULT_PRICES, Price, Settings


def test_the_built_in_models_carry_their_published_cache_and_batch_rates():
    """Cached input, cache writes and the batch discount are those of the providers' price lists."""
    rates = {
        model: (p.input_per_mtok, p.cached_input_per_mtok, p.cache_write_per_mtok, p.batch_discount)
        for model, p in DEFAULT_PRICES.items()
    }
    assert rates == {
        "gpt-4o-mini": (0.15, 0.075, None, 0.5),
        "gpt-4.1-mini": (0.40, 0.10, None, 0.5),
        "gpt-4.1-nano": (0.10, 0.025, None, 0.5),
        "claude-haiku-4-5": (1.00, 0.10, 1.25, 0.5),
        "claude-3-5-haiku-latest": (0.80, 0.08, 1.00, 0.5),
    }


def test_cost_is_exact_decimal_arithmetic_rounded_once():
    """Rates are taken as written: 3 tokens at $0.1 are $0.0000003, not a float's near miss."""
    price = Price(input_per_mtok=0.1, output_per_mtok=0.2)
    assert price.exact_cost(3, 0) == Decimal("0.0000003")
    assert price.cost(1, 1) == 0.0000003
    assert price.cost(0, 0) == 0.0


def test_cached_and_written_tokens_are_priced_at_their_rates_and_the_rest_at_the_input_rate():
    """Of 10,000 input tokens, 6,000 read and 3,000 written leave 1,000 at the input rate."""
    price = DEFAULT_PRICES["claude-haiku-4-5"]
    cost = price.cost(10_000, 100, cached_input_tokens=6_000, cache_write_tokens=3_000)
    assert cost == 0.00585  # 1,000 x $1 + 6,000 x $0.10 + 3,000 x $1.25 + 100 x $5 per million


def test_unset_cache_rates_are_the_input_rate():
    """A price without cache rates charges cached and written tokens like any input token."""
    price = Price(input_per_mtok=2.0, output_per_mtok=8.0)
    assert price.cost(1000, 0, cached_input_tokens=400, cache_write_tokens=100) == price.cost(
        1000, 0
    )


def test_the_batch_discount_applies_to_every_rate():
    """A batch call costs the online cost less the model's batch discount."""
    price = DEFAULT_PRICES["gpt-4o-mini"]
    online = price.exact_cost(2000, 50, cached_input_tokens=1024)
    assert price.exact_cost(2000, 50, cached_input_tokens=1024, batch=True) == online / 2
    assert Price(input_per_mtok=1, output_per_mtok=1).cost(10, 0, batch=True) == 0.00001


def test_more_cached_tokens_than_input_never_gives_a_negative_charge():
    """A server reporting more cached than input tokens is charged for the cached ones only."""
    price = DEFAULT_PRICES["gpt-4o-mini"]
    assert price.cost(100, 0, cached_input_tokens=200) == 200 * 0.075 / 1e6


@pytest.mark.parametrize("discount", [-0.1, 1.0])
def test_a_batch_discount_outside_zero_to_one_is_refused(discount):
    """The discount is a share of the price: at least 0 and below 1."""
    with pytest.raises(ValidationError):
        Price(input_per_mtok=1, output_per_mtok=1, batch_discount=discount)


def test_prices_with_cache_rates_are_read_from_the_environment(monkeypatch):
    """TIERGATE_LLM_PRICES takes the cache rates and the batch discount of a model."""
    monkeypatch.setenv(
        "TIERGATE_LLM_PRICES",
        '{"m": {"input_per_mtok": 1, "output_per_mtok": 2, "cached_input_per_mtok": 0.5,'
        ' "batch_discount": 0.5}}',
    )
    price = Settings().llm_prices["m"]
    assert (price.cached_input_per_mtok, price.cache_write_per_mtok, price.batch_discount) == (
        0.5,
        None,
        0.5,
    )
