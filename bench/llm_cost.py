"""LLM cost per escalated message, online without and with prompt caching, at list prices.

Every message goes through the real LLM tier (prompt, official SDK, validation, accounting) to
the fake OpenAI/Anthropic server, which reports cached-token usage by each provider's published
rules (:mod:`tiergate.workers.llm.prompt_cache`). The policy is ``bench/policies/support-desk.yaml``
(or ``--policy``): a support desk with a detailed routing guide, whose static prefix is about
6,000 tokens. The messages are synthetic support tickets of ordinary length.

For each provider (OpenAI ``gpt-4o-mini``, Anthropic ``claude-haiku-4-5``) it runs the messages
online twice, ``llm_concurrency`` at a time as one worker process would, then as batches:

- **online, uncached**: tiergate's prompt caching off and a server that keeps no cache, so
  every input token is billed at the input rate (what tiergate reported before, and what the
  calls cost where no prompt cache serves them);
- **online, cached**: the default (OpenAI ``prompt_cache_key``, Anthropic ``cache_control``)
  against a server that caches as the provider does;
- **batch** (``llm.mode: batch``): the messages as batches of ``llm.max_batch`` (2,000) through
  the provider's batch API (:mod:`tiergate.workers.llm.batch_api`), each answer validated and
  priced as batch mode does (:meth:`~tiergate.workers.llm.tier.LLMTier.batch_result`), with
  prompt caching on (``cost_per_1k_batch``) and off (``cost_per_1k_batch_uncached``: the batch
  discount alone, whether or not the provider also serves a batch from its prompt cache).

Results: dollars per 1,000 escalated messages in each mode, the reductions, and the share of
input tokens billed at the cached rate.
"""

from __future__ import annotations

import random
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from measurement import BenchmarkOptions, machine, note, provenance, write_results
from tiergate.policies.spec import CallMode, PolicySpec, ProviderRef, Task, load_policy
from tiergate.workers.llm.batch_api import batch_api
from tiergate.workers.llm.prompt import SCHEMA_NAME, answer_schema, build_prompt
from tiergate.workers.llm.testing import FakeLLMServer
from tiergate.workers.llm.tier import LLMRequest, LLMTier
from tiergate.workers.logs import configure_logging
from tiergate.workers.schemas import LLMUsage
from tiergate.workers.settings import Settings

POLICY = Path(__file__).resolve().parent / "policies" / "support-desk.yaml"
MODELS = {"openai": "gpt-4o-mini", "anthropic": "claude-haiku-4-5"}
# The targets: cost per escalated message lower by at least this share with caching.
TARGET_REDUCTION = {"openai": 0.40, "anthropic": 0.60}
# ...and lower by at least this share in batch mode, against today's online uncached cost.
TARGET_BATCH_REDUCTION = 0.50
QUICK = {"messages": 200}

_OPENERS = (
    "Hello,",
    "Hi there,",
    "Good morning,",
    "Dear support team,",
    "Hey,",
    "To whom it may concern,",
    "",
)
_PROBLEMS = (
    "my order SO-{n} was supposed to arrive on Tuesday and the tracking has not moved since.",
    "I was charged twice for order SO-{n} and I can only see one parcel.",
    "the headphones I bought last month stopped charging, one earbud is completely dead.",
    "I cannot sign in any more, the verification code never arrives on my phone.",
    "I would like to return the blue phone case from order SO-{n}, it does not fit.",
    "the refund for my cancelled order SO-{n} has still not reached my card after two weeks.",
    "is the 55-inch television coming back in stock before the end of the month?",
    "the technician who was supposed to mount my TV did not come and nobody called me.",
    "please send me a copy of all the personal data you keep about me.",
    "the laptop shows error 0x{n} after the last update and will not start.",
    "my loyalty points from the purchase on the {d}th were never added.",
    "I dropped my tablet and the screen is cracked; I have your accidental damage cover.",
    "my click and collect order is still not ready although the e-mail said it was.",
    "the cloud plan is still charged every month although I returned the phone.",
)
_DETAILS = (
    "I already tried restarting everything twice.",
    "I have attached a photo of the box.",
    "This is the third time I write about this.",
    "The order was a birthday present, so it is quite urgent.",
    "My neighbour says nothing was left with them either.",
    "I bought it in your shop in the city centre.",
    "",
    "",
)
_CLOSINGS = ("Thanks.", "Kind regards,", "Best,", "Please help.", "Thank you in advance.", "")


def tickets(count: int, seed: int = 7) -> list[str]:
    """``count`` synthetic support tickets, all different, one to four sentences long."""
    rng = random.Random(seed)
    texts = []
    for index in range(count):
        problem = rng.choice(_PROBLEMS).format(
            n=rng.randrange(10**6, 10**7), d=rng.randrange(1, 28)
        )
        parts = [rng.choice(_OPENERS), problem, rng.choice(_DETAILS), rng.choice(_CLOSINGS)]
        texts.append(f"{' '.join(part for part in parts if part)} (ticket {index})")
    return texts


@dataclass(frozen=True)
class Run:
    """What one pass over the messages cost, in total."""

    messages: int
    cost_usd: float
    input_tokens: int
    cached_input_tokens: int
    cache_write_tokens: int
    output_tokens: int
    calls: int
    seconds: float

    @classmethod
    def of(cls, usages: Sequence[LLMUsage], seconds: float) -> Run:
        """The totals of ``usages``, one per message."""
        return cls(
            messages=len(usages),
            cost_usd=sum(usage.cost_usd for usage in usages),
            input_tokens=sum(usage.input_tokens for usage in usages),
            cached_input_tokens=sum(usage.cached_input_tokens for usage in usages),
            cache_write_tokens=sum(usage.cache_write_tokens for usage in usages),
            output_tokens=sum(usage.output_tokens for usage in usages),
            calls=sum(usage.attempts for usage in usages),
            seconds=seconds,
        )

    @property
    def cost_per_1k(self) -> float:
        """Dollars per 1,000 messages."""
        return 1000.0 * self.cost_usd / self.messages

    def as_dict(self) -> dict[str, Any]:
        """The totals, as the results file holds them."""
        return {
            "cost_usd": round(self.cost_usd, 6),
            "cost_per_1k": round(self.cost_per_1k, 6),
            "input_tokens": self.input_tokens,
            "cached_input_tokens": self.cached_input_tokens,
            "cache_write_tokens": self.cache_write_tokens,
            "output_tokens": self.output_tokens,
            "calls": self.calls,
            "seconds": round(self.seconds, 2),
        }


def fake_settings(server: FakeLLMServer, *, caching: bool) -> Settings:
    """Settings that send both providers' calls to ``server``, with prompt caching on or off."""
    return Settings(
        openai_api_key="fake-key",
        anthropic_api_key="fake-key",
        openai_base_url=server.openai_base_url,
        anthropic_base_url=server.anthropic_base_url,
        llm_prompt_caching=caching,
    )


def run(spec: PolicySpec, texts: Sequence[str], *, caching: bool) -> Run:
    """Send every text through a fresh LLM tier to a fresh fake server; the totals."""
    with FakeLLMServer(prompt_caching=caching) as server:
        settings = fake_settings(server, caching=caching)
        tier = LLMTier(settings)
        started = time.perf_counter()
        with ThreadPoolExecutor(max_workers=settings.llm_concurrency) as pool:
            usages = list(pool.map(lambda text: tier.answer(LLMRequest(text, spec)).usage, texts))
        seconds = time.perf_counter() - started
        if server.calls != len(texts):
            raise RuntimeError(f"{server.calls} calls for {len(texts)} messages")
    return Run.of(usages, seconds)


def run_batches(spec: PolicySpec, texts: Sequence[str], *, caching: bool) -> Run:
    """Send every text through the provider's batch API, ``llm.max_batch`` at a time."""
    with FakeLLMServer(prompt_caching=caching) as server:
        settings = fake_settings(server, caching=caching)
        tier = LLMTier(settings)
        provider = tier.chain(spec)[0]
        api = batch_api(provider)
        usages: list[LLMUsage] = []
        started = time.perf_counter()
        size = spec.llm.max_batch
        for first in range(0, len(texts), size):
            chunk = [LLMRequest(text, spec) for text in texts[first : first + size]]
            wire = [(f"r{i}", tier.batch_request(request)) for i, request in enumerate(chunk)]
            batch_id = api.submit(wire, f"bench-{first}")
            if not api.status(batch_id).ended:
                raise RuntimeError(f"batch {batch_id} did not end")
            outcomes = api.results(batch_id, SCHEMA_NAME)
            for i, request in enumerate(chunk):
                answer = outcomes[f"r{i}"].answer
                if answer is None:
                    raise RuntimeError(f"request r{i} of batch {batch_id} failed")
                usages.append(tier.batch_result(provider, answer, request).usage)
        seconds = time.perf_counter() - started
        if server.calls != 0:
            raise RuntimeError(f"{server.calls} online calls in batch mode")
    return Run.of(usages, seconds)


def compare(provider: str, spec: PolicySpec, texts: Sequence[str]) -> dict[str, Any]:
    """Both passes for one provider, and the figures the issue asks for."""
    model = MODELS[provider]
    only = spec.with_providers([ProviderRef(provider=provider, model=model)])
    note(f"{provider}/{model}: {len(texts)} messages uncached, cached, then in batches")
    uncached = run(only, texts, caching=False)
    cached = run(only, texts, caching=True)
    batch_only = only.model_copy(
        update={"llm": only.llm.model_copy(update={"mode": CallMode.BATCH})}
    )
    batched = run_batches(batch_only, texts, caching=True)
    batched_uncached = run_batches(batch_only, texts, caching=False)
    reduction = 1.0 - cached.cost_per_1k / uncached.cost_per_1k
    batch_reduction = 1.0 - batched.cost_per_1k / uncached.cost_per_1k
    price = Settings().llm_prices[model]
    return {
        "model": model,
        "prices_usd_per_mtok": price.model_dump(),
        "cost_per_1k_online_uncached": round(uncached.cost_per_1k, 6),
        "cost_per_1k_online_cached": round(cached.cost_per_1k, 6),
        "cost_per_1k_batch": round(batched.cost_per_1k, 6),
        "cost_per_1k_batch_uncached": round(batched_uncached.cost_per_1k, 6),
        "cached_input_token_share": round(cached.cached_input_tokens / cached.input_tokens, 4),
        "cache_write_token_share": round(cached.cache_write_tokens / cached.input_tokens, 4),
        "reduction_with_caching": round(reduction, 4),
        "target_reduction": TARGET_REDUCTION[provider],
        "meets_target": reduction >= TARGET_REDUCTION[provider],
        "reduction_in_batches": round(batch_reduction, 4),
        "reduction_in_batches_uncached": round(
            1.0 - batched_uncached.cost_per_1k / uncached.cost_per_1k, 4
        ),
        "target_reduction_in_batches": TARGET_BATCH_REDUCTION,
        "meets_batch_target": round(batch_reduction, 4) >= TARGET_BATCH_REDUCTION,
        "online_uncached": uncached.as_dict(),
        "online_cached": cached.as_dict(),
        "batch": batched.as_dict(),
        "batch_uncached": batched_uncached.as_dict(),
    }


def static_prefix_chars(spec: PolicySpec) -> int:
    """Characters of the static prefix: the answer schema and the system prompt."""
    system, _ = build_prompt("x", spec, Task.CLASSIFY, ())
    schema = answer_schema(spec, Task.CLASSIFY, ())
    return len(system) + len(str({"name": SCHEMA_NAME, "schema": schema}))


def show(results: dict[str, Any]) -> None:
    """The figures as a table on standard output."""
    table = Table(title=f"LLM cost per 1,000 escalated messages ({results['messages']} messages)")
    columns = ("provider", "model", "online uncached", "online cached", "lower by", "target")
    for column in (*columns, "batch", "lower by (batch)"):
        table.add_column(column, justify="left" if column in {"provider", "model"} else "right")
    table.add_column("cached input share", justify="right")
    for provider, figures in results["providers"].items():
        table.add_row(
            provider,
            figures["model"],
            f"${figures['cost_per_1k_online_uncached']:.4f}",
            f"${figures['cost_per_1k_online_cached']:.4f}",
            f"{figures['reduction_with_caching']:.1%}",
            f">= {figures['target_reduction']:.0%}",
            f"${figures['cost_per_1k_batch']:.4f}",
            f"{figures['reduction_in_batches']:.1%}",
            f"{figures['cached_input_token_share']:.1%}",
        )
    Console().print(table)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark; see the module docstring."""
    options = BenchmarkOptions(
        "llm_cost",
        __doc__.split("\n\n")[0],
        QUICK,
        test_split_default="unused: the messages are synthetic tickets",
        model_dir_help="unused: this benchmark runs the LLM tier only",
    )
    options.parser.add_argument(
        "--messages", type=int, default=2000, help="escalated messages per pass (default 2000)"
    )
    options.parser.add_argument(
        "--policy", type=Path, default=POLICY, help=f"the policy (default {POLICY})"
    )
    args = options.parse(argv)
    configure_logging("WARNING")
    spec = load_policy(args.policy)
    texts = tickets(args.messages)
    machine_info = machine()
    results: dict[str, Any] = {
        "benchmark": "llm_cost",
        "messages": len(texts),
        "policy": {
            "name": spec.name,
            "version": spec.version,
            "labels": len(spec.labels),
            "static_prefix_chars": static_prefix_chars(spec),
        },
        "mean_message_chars": round(sum(map(len, texts)) / len(texts), 1),
        "providers": {provider: compare(provider, spec, texts) for provider in MODELS},
        "cost_per_1k_batch_note": (
            "batch: the messages in batches of llm.max_batch through the provider's batch API, "
            "prompt caching on; batch_uncached: caching off (the batch discount alone)"
        ),
        "machine": machine_info,
        **provenance(args),
    }
    show(results)
    write_results(args.output, results)
    note(f"results in {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
