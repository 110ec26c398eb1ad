"""Prometheus metrics of the HTTP gateway, in a registry of its own per app.

Counted as they happen: HTTP requests (by route template, method and status) and their
latency; decisions (by policy, tier and reason), LLM fallbacks (by why), cache lookups and
hits (the hit ratio is ``hits / lookups``), LLM tokens, the input tokens of those served from
or written to the provider's prompt cache, and dollars by mode (online or batch; fresh answers
only, not cached decisions), per-step latency from each decision's ``timings_ms``, and
micro-batch sizes.

Read on each scrape: the LLM budget left per policy, the depth of each work queue and the dead
letters written by kind (counted where they are written, in Redis for a distributed deployment,
so every gateway reports the whole deployment's count), through callables the app passes in. A
failing source (Redis down) drops its series from that scrape instead of failing it.

Each :class:`GatewayMetrics` owns a :class:`~prometheus_client.CollectorRegistry`, not the
process-global one, so a process (or a test session) can build many apps.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass

import structlog
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
)
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric

from tiergate.workers.schemas import Decision

log = structlog.get_logger(__name__)

# Steps a decision may report in ``timings_ms``; anything else is not exported (bounded labels).
DECISION_STEPS = ("queued", "cache", "bert", "llm", "total")
_LATENCY_BUCKETS_S = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
)  # fmt: skip
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


@dataclass(frozen=True)
class BudgetReading:
    """What is left of one policy's LLM budget: ``None`` for a limit the policy does not set."""

    policy: str
    calls_left: int | None
    usd_left: float | None


BudgetSource = Callable[[], Iterable[BudgetReading]]
QueueDepthSource = Callable[[], Mapping[str, int]]
DeadLetterSource = Callable[[], Mapping[str, int]]


class _DeadLetterCounter:
    """A collector that reads the dead letters written, by kind, on every scrape."""

    def __init__(self, source: DeadLetterSource) -> None:
        self._source = source

    def describe(self) -> Iterator[Metric]:
        yield self._family()

    def collect(self) -> Iterator[Metric]:
        family = self._family()
        try:
            counts = dict(self._source())
        except Exception as exc:  # noqa: BLE001 -- a scrape must not fail with its source
            log.warning("metrics.dead_letters_unavailable", error_type=type(exc).__name__)
            counts = {}
        for kind, count in sorted(counts.items()):
            family.add_metric([kind], float(count))
        yield family

    @staticmethod
    def _family() -> CounterMetricFamily:
        return CounterMetricFamily(
            "tiergate_dead_letters",
            "Messages dead-lettered, by kind of reason (counted where they are kept: in Redis, "
            "the whole deployment's).",
            labels=["reason"],
        )


class _ScrapeTimeGauges:
    """A collector that asks its sources for budgets and queue depths on every scrape."""

    def __init__(self, budgets: BudgetSource | None, queues: QueueDepthSource | None) -> None:
        self._budgets = budgets
        self._queues = queues

    def describe(self) -> Iterator[Metric]:
        # Describing without collecting keeps registration from touching Redis or the broker.
        yield from self._families()

    def collect(self) -> Iterator[Metric]:
        calls, usd, depth = self._families()
        if self._budgets is not None:
            try:
                readings = list(self._budgets())
            except Exception as exc:  # noqa: BLE001 -- a scrape must not fail with its source
                log.warning("metrics.budget_unavailable", error_type=type(exc).__name__)
                readings = []
            for reading in readings:
                if reading.calls_left is not None:
                    calls.add_metric([reading.policy], float(reading.calls_left))
                if reading.usd_left is not None:
                    usd.add_metric([reading.policy], reading.usd_left)
        if self._queues is not None:
            try:
                depths = dict(self._queues())
            except Exception as exc:  # noqa: BLE001 -- same as above
                log.warning("metrics.queue_depth_unavailable", error_type=type(exc).__name__)
                depths = {}
            for queue, size in sorted(depths.items()):
                depth.add_metric([queue], float(size))
        yield from (calls, usd, depth)

    @staticmethod
    def _families() -> tuple[GaugeMetricFamily, GaugeMetricFamily, GaugeMetricFamily]:
        return (
            GaugeMetricFamily(
                "tiergate_budget_calls_left",
                "LLM calls the policy may still make this minute.",
                labels=["policy"],
            ),
            GaugeMetricFamily(
                "tiergate_budget_usd_left",
                "US dollars the policy may still spend on the LLM today.",
                labels=["policy"],
            ),
            GaugeMetricFamily(
                "tiergate_queue_depth",
                "Messages waiting in each work queue.",
                labels=["queue"],
            ),
        )


class GatewayMetrics:
    """The gateway's metrics: ``observe_*`` as things happen, ``render`` to scrape.

    The sources given to :meth:`watch` are read on every scrape, from the thread that
    renders. Thread-safe.
    """

    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        registry = self.registry
        self.requests = Counter(
            "tiergate_http_requests",
            "HTTP requests answered, by route template, method and status.",
            ["route", "method", "status"],
            registry=registry,
        )
        self.request_seconds = Histogram(
            "tiergate_http_request_duration_seconds",
            "Time from a request's arrival to its response, by route template.",
            ["route", "method"],
            buckets=_LATENCY_BUCKETS_S,
            registry=registry,
        )
        self.decisions = Counter(
            "tiergate_decisions",
            "Decisions made or returned by this gateway, by policy, tier and routing reason.",
            ["policy", "tier", "reason"],
            registry=registry,
        )
        self.llm_skipped = Counter(
            "tiergate_llm_skipped",
            "Decisions the policy sent to the LLM that the BERT tier answered, by why.",
            ["policy", "why"],
            registry=registry,
        )
        self.cache_lookups = Counter(
            "tiergate_cache_lookups",
            "Decisions looked up in the decision cache, by policy.",
            ["policy"],
            registry=registry,
        )
        self.cache_hits = Counter(
            "tiergate_cache_hits",
            "Decisions served from the decision cache, by policy.",
            ["policy"],
            registry=registry,
        )
        self.llm_tokens = Counter(
            "tiergate_llm_tokens",
            "LLM tokens of fresh (not cached) LLM answers, by provider, model and direction.",
            ["provider", "model", "direction"],
            registry=registry,
        )
        self.llm_prompt_cache_tokens = Counter(
            "tiergate_llm_prompt_cache_tokens",
            "Input tokens of fresh LLM answers read from (use=read) or written to (use=write) "
            "the provider's prompt cache; part of tiergate_llm_tokens{direction=input}.",
            ["provider", "model", "use"],
            registry=registry,
        )
        self.llm_calls = Counter(
            "tiergate_llm_calls",
            "LLM calls made for fresh LLM answers (failed ones and repairs included), by "
            "provider, model and mode (online, or batch: one request of a provider batch).",
            ["provider", "model", "mode"],
            registry=registry,
        )
        self.llm_cost = Counter(
            "tiergate_llm_cost_usd",
            "US dollars spent on fresh LLM answers, by provider, model and mode (online, batch).",
            ["provider", "model", "mode"],
            registry=registry,
        )
        self.step_seconds = Histogram(
            "tiergate_decision_step_seconds",
            "Time a decision spent per step (cache, bert, llm) and in total.",
            ["step"],
            buckets=_LATENCY_BUCKETS_S,
            registry=registry,
        )
        self.batch_size = Histogram(
            "tiergate_batch_size",
            "Messages per micro-batch run by the embedded cascade.",
            buckets=_BATCH_BUCKETS,
            registry=registry,
        )

    def watch(
        self,
        *,
        budget_remaining: BudgetSource | None = None,
        queue_depths: QueueDepthSource | None = None,
        dead_letters: DeadLetterSource | None = None,
    ) -> None:
        """Read budgets, queue depths and dead-letter counts on every scrape (call once)."""
        self.registry.register(_ScrapeTimeGauges(budget_remaining, queue_depths))
        if dead_letters is not None:
            self.registry.register(_DeadLetterCounter(dead_letters))

    def observe_request(self, route: str, method: str, status: int, seconds: float) -> None:
        """Count one answered request; ``route`` is its template (``/v1/messages/{id}``)."""
        self.requests.labels(route, method, str(status)).inc()
        self.request_seconds.labels(route, method).observe(seconds)

    def observe_decisions(self, decisions: Iterable[Decision]) -> None:
        """Count decisions: tier and reason, cache use, LLM usage and step latencies."""
        for decision in decisions:
            policy = decision.policy
            self.decisions.labels(policy, decision.tier.value, decision.reason.value).inc()
            if decision.llm_skipped is not None:
                self.llm_skipped.labels(policy, decision.llm_skipped.value).inc()
            # The cascade reports a "cache" step only when it has a cache to look in.
            if decision.cached or "cache" in decision.timings_ms:
                self.cache_lookups.labels(policy).inc()
            if decision.cached:
                self.cache_hits.labels(policy).inc()
            usage = decision.llm
            if usage is not None and not decision.cached:
                self.llm_tokens.labels(usage.provider, usage.model, "input").inc(usage.input_tokens)
                self.llm_tokens.labels(usage.provider, usage.model, "output").inc(
                    usage.output_tokens
                )
                cache_tokens = self.llm_prompt_cache_tokens
                cache_tokens.labels(usage.provider, usage.model, "read").inc(
                    usage.cached_input_tokens
                )
                cache_tokens.labels(usage.provider, usage.model, "write").inc(
                    usage.cache_write_tokens
                )
                self.llm_calls.labels(usage.provider, usage.model, usage.mode.value).inc(
                    usage.attempts
                )
                self.llm_cost.labels(usage.provider, usage.model, usage.mode.value).inc(
                    usage.cost_usd
                )
            for step in DECISION_STEPS:
                milliseconds = decision.timings_ms.get(step)
                if milliseconds is not None:
                    self.step_seconds.labels(step).observe(milliseconds / 1000.0)

    def observe_batch(self, size: int) -> None:
        """Record the number of messages in one micro-batch."""
        self.batch_size.observe(size)

    def render(self) -> bytes:
        """The metrics in Prometheus text format (reads the scrape-time sources)."""
        return generate_latest(self.registry)
