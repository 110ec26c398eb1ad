"""Benchmark: what the cascade buys (accuracy against LLM share and cost), and what the cache does.

Everything runs on the default model's held-out test split (real Rotten Tomatoes snippets that
training never saw; every message by default) with the shipped default policy, in four parts:

1. **The trade-off** (the headline figures). The BERT tier scores every message (in batches of
   ``--batch-size``, as part 2 sends them); a *simulated* LLM answers every message with the
   gold label 95% of the time (:func:`tiergate.policies.evaluate.simulate_llm`) and each call is
   priced at the list price of the policy's first model on that message's real prompt (prompt
   characters / 4 input tokens, 20 output tokens: the estimate ``tiergate eval`` uses).
   :func:`tiergate.policies.evaluate.evaluate_cascade` then gives BERT-only and LLM-only accuracy,
   the policy's operating point, the accuracy-versus-share curve, the smallest share of messages
   sent to the LLM within one accuracy point of LLM-only (``matched_accuracy_llm_share``) and the
   money saved there against sending everything (``cost_saving_vs_llm_only``). The simulation is
   random, so seeds 1..5 are rerun and their spread is reported.
2. **The real cascade against that math.** :class:`tiergate.workers.cascade.Cascade` with the real
   BERT tier and the real LLM tier (the OpenAI provider, through the official SDK, talking HTTP to a
   local :class:`~tiergate.workers.llm.testing.FakeLLMServer` whose answerer is
   :class:`~tiergate.workers.llm.testing.SimulatedLLM` at the same 95%), no cache, decides every
   message in batches of 64. Its LLM share must equal the operating point's (same scores, same
   policy); its accuracy agrees only within noise, because ``SimulatedLLM`` draws its wrong answers
   from a hash of the text and ``simulate_llm`` from a seeded RNG. To close that gap exactly, the
   operating point is recomputed with the LLM answers the real cascade received. Messages per second
   are measured with an LLM that answers at once, so they show tiergate's own overhead (BERT,
   routing, prompt, SDK, HTTP), not a real LLM's latency.
3. **Cache hits against real Redis.** One message is decided (a miss), then the same text is
   sent 500 times, each as a new message id, one ``decide([message])`` at a time: the latency of
   a hit through the whole cascade, and of the bare ``get_many([key])`` for reference.
4. **A burst of identical messages.** 100 threads, released together by a barrier, each send
   the same LLM-bound message (new ids) to one cascade backed by Redis, against an LLM that takes
   0.2 s: single-flight must make exactly one upstream call. Then the same across 4 processes
   of 25 threads (spawned, each with its own cascade on the same Redis prefix): still one call.
   The benchmark exits with status 1 if either burst makes more than one call.

Why the figures are fair:

* one model, one policy and one labelled set for every part, and part 1 scores in the batches
  part 2 uses (the int8 model's dynamic quantization scales depend on the batch, so scores can
  move slightly with batch composition);
* the LLM is a simulation and says so everywhere (``"simulated": true``); its accuracy (95%) is
  a stated assumption, not a measurement, and the spread over seeds shows how much the headline
  depends on the draw;
* costs are list prices of a named model on the real prompts, and the real cascade's summed
  cost (tokens as the fake server counts them) is reported beside them;
* Redis is the real server on 127.0.0.1; every run uses fresh random key prefixes and deletes
  its keys afterwards; timings are medians and percentiles over hundreds of calls, after a
  warm-up, with nothing else interleaved.

``--model-dir`` and ``--test-split`` point it at another model and its held-out split (the
policy is the one the model's labels select, or ``TIERGATE_POLICY_FILES``; it must send some
messages to an OpenAI model). ``--quick`` checks that every part works in under a minute (300
messages, two seeds, 50 cache hits, a burst of 20 from one process and from 2 x 10 threads),
writes the same JSON and plot to a temporary folder, and measures nothing worth publishing.

Run ``tiergate model build-default`` first; ``make bench-cascade`` does both.
"""

from __future__ import annotations

import argparse
import gc
import json
import multiprocessing
import queue
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import redis
from pydantic import SecretStr
from rich.console import Console
from rich.table import Table

from measurement import (
    BenchmarkOptions,
    HeldOut,
    Spread,
    accuracy,
    batches,
    fail,
    key_prefixes,
    machine,
    model_and_split,
    note,
    percentiles_ms,
    provenance,
    read_test_split,
    write_results,
)
from tiergate.gateway.report import evaluation_table, write_evaluation
from tiergate.policies.evaluate import Answer, Evaluation, evaluate_cascade, simulate_llm
from tiergate.policies.routing import Target, decide
from tiergate.policies.spec import PolicySpec, Task
from tiergate.workers.bert.classifier import BertClassifier
from tiergate.workers.bert.manifest import RECORDED_PACKAGES, package_versions
from tiergate.workers.cache import DecisionCache, Lease, RedisDecisionCache, normalise
from tiergate.workers.cascade import Cascade, open_cascade, policy_book_for
from tiergate.workers.llm.prompt import build_prompt
from tiergate.workers.llm.testing import FakeLLMServer, SimulatedLLM, message_of
from tiergate.workers.logs import configure_logging
from tiergate.workers.schemas import Decision, Message, Prediction, Tier
from tiergate.workers.settings import Settings

if TYPE_CHECKING:
    from multiprocessing.queues import Queue
    from multiprocessing.synchronize import Barrier

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
# The estimate `tiergate eval` prices a call with: prompt characters per token, answer tokens.
CHARS_PER_TOKEN = 4
ANSWER_TOKENS = 20
# How long a burst may take before the benchmark gives up on it (seconds).
BURST_TIMEOUT_S = 120.0
# What --quick changes: every part runs, in under a minute.
QUICK = {
    "limit": 300,
    "spread_seeds": 2,
    "cache_hits": 50,
    "burst": 20,
    "burst_processes": 2,
}

out = Console()


@dataclass(frozen=True)
class CallPrice:
    """What one LLM call costs on each message: the policy's first model at its list price."""

    provider: str
    model: str
    input_per_mtok: float
    output_per_mtok: float
    per_message: list[float]

    @property
    def mean(self) -> float:
        """The mean cost of one call, in USD."""
        return statistics.fmean(self.per_message) if self.per_message else 0.0


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """The command-line options."""
    options = BenchmarkOptions("cascade", __doc__.split("\n\n")[0], QUICK)
    parser = options.parser
    parser.add_argument(
        "--limit", type=int, help="use N test messages, spread evenly over the split"
    )
    parser.add_argument(
        "--plot", type=Path, help="the curve as a PNG (default: the JSON's path, ending .png)"
    )
    parser.add_argument(
        "--redis-url",
        help=f"Redis for parts 3 and 4 (default: Settings().redis_url, else {DEFAULT_REDIS_URL})",
    )
    parser.add_argument(
        "--llm-accuracy", type=float, default=0.95, help="the simulated LLM's accuracy (0.95)"
    )
    parser.add_argument("--seed", type=int, default=13, help="seed of the simulated LLM (13)")
    parser.add_argument(
        "--spread-seeds", type=int, default=5, help="rerun part 1 with seeds 1..N (5)"
    )
    parser.add_argument(
        "--batch-size", type=int, default=64, help="messages per decide() call in part 2 (64)"
    )
    parser.add_argument(
        "--cache-hits", type=int, default=500, help="timed cache hits in part 3 (500)"
    )
    parser.add_argument(
        "--burst", type=int, default=100, help="concurrent identical messages in part 4 (100)"
    )
    parser.add_argument(
        "--burst-processes", type=int, default=4, help="processes sharing the burst (4)"
    )
    parser.add_argument(
        "--burst-latency-s", type=float, default=0.2, help="the burst LLM's latency (0.2 s)"
    )
    args = options.parse(argv)
    for option in (
        "limit",
        "spread_seeds",
        "batch_size",
        "cache_hits",
        "burst",
        "burst_processes",
    ):
        value = getattr(args, option)
        if value is not None and value < 1:
            parser.error(f"--{option.replace('_', '-')} must be at least 1")
    if not 0.0 <= args.llm_accuracy <= 1.0:
        parser.error("--llm-accuracy must lie in [0, 1]")
    if args.burst % args.burst_processes:
        parser.error("--burst must be a multiple of --burst-processes")
    if args.plot is None:
        args.plot = args.output.with_suffix(".png")
    elif args.quick:
        options.refuse_results_dir(args.plot)
    return args


# ---------------------------------------------------------------------------------- part 1


def price_calls(settings: Settings, spec: PolicySpec, texts: Sequence[str]) -> CallPrice:
    """Each message's classification call priced at the list price of the policy's first model.

    The same estimate as ``tiergate eval`` (``tiergate.gateway.cli.tuning._typical_call_cost``),
    kept per message instead of averaged over a sample: prompt characters / 4 input tokens and a
    20-token answer. Fails when the policy names no model or the model has no price.
    """
    if not spec.llm.providers:
        fail(f"policy {spec.name!r} names no LLM provider to price")
    first = spec.llm.providers[0]
    price = settings.llm_prices.get(first.model)
    if price is None:
        fail(f"model {first.model!r} has no price in Settings().llm_prices")
    per_message = []
    for text in texts:
        system, user = build_prompt(text, spec, Task.CLASSIFY, ())
        per_message.append(price.cost((len(system) + len(user)) // CHARS_PER_TOKEN, ANSWER_TOKENS))
    return CallPrice(
        provider=first.provider,
        model=first.model,
        input_per_mtok=price.input_per_mtok,
        output_per_mtok=price.output_per_mtok,
        per_message=per_message,
    )


def score_in_batches(
    classifier: BertClassifier, texts: Sequence[str], batch_size: int
) -> tuple[list[Prediction], float]:
    """Predictions for ``texts`` scored ``batch_size`` at a time, and the seconds it took."""
    predictions: list[Prediction] = []
    gc.collect()
    started = time.perf_counter()
    for part in batches(len(texts), batch_size):
        predictions += classifier.predict(texts[part])
    return predictions, time.perf_counter() - started


def seed_spread(
    predictions: Sequence[Prediction],
    split: HeldOut,
    spec: PolicySpec,
    costs: Sequence[float],
    accuracy_of_llm: float,
    seeds: Sequence[int],
) -> dict[str, Any]:
    """Part 1 again with each of ``seeds``: the spread of the figures the simulation moves."""

    def spread(values: Sequence[float]) -> dict[str, float]:
        return Spread.of(values).as_dict(4)

    runs: list[Evaluation] = []
    for seed in seeds:
        answers = simulate_llm(split.labels, spec.label_names, accuracy_of_llm, seed)
        runs.append(evaluate_cascade(predictions, split.labels, answers, costs, spec))
    return {
        "seeds": list(seeds),
        "matched_accuracy_llm_share": spread([e.matched_accuracy_llm_share for e in runs]),
        "cost_saving_vs_llm_only": spread([e.cost_saving_vs_llm_only or 0.0 for e in runs]),
        "llm_only_accuracy": spread([e.llm_only.accuracy for e in runs]),
        "operating_point_accuracy": spread([e.operating_point.accuracy for e in runs]),
        "per_seed": [
            {
                "seed": seed,
                "matched_accuracy_llm_share": round(e.matched_accuracy_llm_share, 5),
                "cost_saving_vs_llm_only": round(e.cost_saving_vs_llm_only or 0.0, 5),
                "llm_only_accuracy": round(e.llm_only.accuracy, 5),
                "operating_point_accuracy": round(e.operating_point.accuracy, 5),
            }
            for seed, e in zip(seeds, runs, strict=True)
        ],
    }


# ---------------------------------------------------------------------------------- the LLM


def simulated_llm_settings(settings: Settings, server: FakeLLMServer) -> Settings:
    """``settings`` with the OpenAI provider pointed at ``server`` and no other provider usable.

    The Anthropic key is cleared so that nothing can leave the machine for a real API, whatever
    the environment holds.
    """
    return settings.model_copy(
        update={
            "openai_api_key": SecretStr("simulated"),
            "openai_base_url": server.openai_base_url,
            "anthropic_api_key": None,
            "redis_url": None,
        }
    )


def simulated_cascade(
    settings: Settings, classifier: BertClassifier, cache: DecisionCache | None
) -> Cascade:
    """The cascade :func:`open_cascade` builds on ``settings``' simulated LLM, over ``cache``.

    Without a budget: it is not what is measured, and the policy's cap on calls per minute
    would turn routed messages into BERT fallbacks, moving part 2's LLM share off the math's.
    """
    cascade = open_cascade(settings, classifier, use_cache=False)
    cascade.cache = cache
    cascade.budget = None
    spec = cascade.policies.default
    if cascade.llm is None or not cascade.llm.configured(spec):
        fail(f"policy {spec.name!r} has no OpenAI provider to point at the fake server")
    return cascade


# ---------------------------------------------------------------------------------- part 2


def end_to_end(
    settings: Settings,
    classifier: BertClassifier,
    split: HeldOut,
    part1: tuple[list[Prediction], Evaluation, CallPrice],
    args: argparse.Namespace,
) -> dict[str, Any]:
    """Part 2: the real cascade on every message; its share, accuracy and cost beside part 1."""
    predictions, evaluation, price = part1
    gold_by_text = dict(zip(split.texts, split.labels, strict=True))
    answerer = SimulatedLLM(gold_by_text, accuracy=args.llm_accuracy, seed=args.seed)
    messages = [Message(id=i, text=t) for i, t in zip(split.ids, split.texts, strict=True)]
    with FakeLLMServer(answerer) as server:
        cascade = simulated_cascade(simulated_llm_settings(settings, server), classifier, None)
        spec = cascade.policies.default
        decisions: list[Decision] = []
        gc.collect()
        started = time.perf_counter()
        for part in batches(len(messages), args.batch_size):
            decisions += cascade.decide(messages[part])
        seconds = time.perf_counter() - started
        requests = server.requests
    n = len(decisions)
    by_llm = [d.tier is Tier.LLM for d in decisions]
    routed = [d.tier is Tier.LLM or d.llm_skipped is not None for d in decisions]
    expected = [decide(p, spec).target is Target.LLM for p in predictions]
    llm_labels = [d.label for d, sent in zip(decisions, by_llm, strict=True) if sent]
    llm_gold = [g for g, sent in zip(split.labels, by_llm, strict=True) if sent]
    # The operating point recomputed with the answers this cascade got from the LLM: if the real
    # cascade does what the math says, the accuracies are equal, not merely close.
    received: list[Answer] = [
        d.label if sent and d.label is not None else gold
        for d, gold, sent in zip(decisions, split.labels, by_llm, strict=True)
    ]
    replayed = evaluate_cascade(predictions, split.labels, received, price.per_message, spec)
    unknown = sum(normalise(message_of(request.body)) not in answerer.gold for request in requests)
    call_ms = [d.timings_ms["llm"] for d in decisions if "llm" in d.timings_ms]
    stalled = sum(ms >= 1000 for ms in call_ms)
    measured_cost = sum(d.llm.cost_usd for d in decisions if d.llm is not None)
    measured_accuracy = accuracy([d.label for d in decisions], split.labels)
    point = evaluation.operating_point
    return {
        "what": "tiergate.workers.cascade.Cascade: BertClassifier + LLMTier "
        "(OpenAI SDK -> FakeLLMServer with SimulatedLLM), no cache, no budget",
        "simulated": True,
        "batch_size": args.batch_size,
        "messages": n,
        "llm_share": round(sum(by_llm) / n, 5),
        "accuracy": round(measured_accuracy, 5),
        "cost_usd": round(measured_cost, 6),
        "cost_per_1000": round(1000 * measured_cost / n, 6),
        "msgs_per_s": round(n / seconds, 2),
        "seconds": round(seconds, 3),
        "upstream_calls": len(requests),
        # Each LLM call's time as the cascade saw it: a call that waited for a TCP connection
        # the server could not accept at once shows here as a second or more.
        "llm_call": percentiles_ms([ms / 1000 for ms in call_ms]) if call_ms else None,
        "llm_calls_over_1s": stalled,
        "llm_skipped": sum(d.llm_skipped is not None for d in decisions),
        "routing_disagreements_with_part1": sum(
            r != e for r, e in zip(routed, expected, strict=True)
        ),
        "llm_requests_with_unknown_text": unknown,
        "simulated_llm_accuracy_on_routed": round(accuracy(llm_labels, llm_gold), 5)
        if llm_gold
        else None,
        "operating_point_accuracy_with_these_llm_answers": round(
            replayed.operating_point.accuracy, 5
        ),
        "vs_operating_point": {
            "llm_share": round(point.llm_share, 5),
            "accuracy": round(point.accuracy, 5),
            "cost_per_1000": round(point.cost_per_1000, 6),
            "llm_share_gap_points": round(100 * (sum(by_llm) / n - point.llm_share), 3),
            "accuracy_gap_points": round(100 * (measured_accuracy - point.accuracy), 3),
        },
        "notes": (
            "LLM share must match the operating point exactly (same scores, same policy). "
            "Accuracy agrees only within noise: SimulatedLLM picks its wrong answers by a hash "
            "of the text, simulate_llm by a seeded RNG; with the answers this cascade received, "
            "the operating point's accuracy is the measured one. Cost differs from part 1 "
            "because the fake server counts the answer's real tokens (about 5), part 1 "
            "estimates 20. msgs/s is with an LLM that answers at once."
        )
        + (
            f" {stalled} LLM calls took over 1 s: they waited on the fake server's listen "
            "backlog (5 connections, the socketserver default; the kernel retries a dropped "
            "connection after 1 s), which then bounds msgs/s, not tiergate."
            if stalled
            else ""
        ),
    }


# ---------------------------------------------------------------------------------- part 3


def cache_hits(
    settings: Settings,
    classifier: BertClassifier,
    client: redis.Redis,
    prefix: str,
    text: str,
    count: int,
) -> dict[str, Any]:
    """Part 3: ``count`` single-message hits through the cascade, then bare ``get_many`` calls."""
    cache = RedisDecisionCache(client, prefix)
    with FakeLLMServer() as server:
        cascade = simulated_cascade(simulated_llm_settings(settings, server), classifier, cache)
        first = cascade.decide([Message(id="miss", text=text)])[0]
        if first.cached:
            fail("the first decision of a fresh prefix came from the cache")
        messages = [Message(id=f"hit-{i}", text=text) for i in range(count)]
        hit_seconds = []
        gc.collect()
        for message in messages:
            started = time.perf_counter()
            decision = cascade.decide([message])[0]
            hit_seconds.append(time.perf_counter() - started)
            if not decision.cached:
                fail(f"message {message.id} was not answered from the cache")
        key = cascade.cache_key(messages[0], cascade.policies.default)
        get_seconds = []
        for _ in range(count):
            started = time.perf_counter()
            cache.get_many([key])
            get_seconds.append(time.perf_counter() - started)
    hits = percentiles_ms(hit_seconds)
    return {
        "what": "cascade.decide([message]) answered from RedisDecisionCache, one at a time",
        "hits": count,
        "first_decision_tier": first.tier.value,
        "decide_hit": hits,
        "get_many_one_key": percentiles_ms(get_seconds),
    }


# ---------------------------------------------------------------------------------- part 4


@dataclass
class ObservedCache:
    """A :class:`~tiergate.workers.cache.DecisionCache` that counts what the cascade got from it.

    Delegates every call to ``inner``; counts lookups answered by ``get_many`` (``hits``) and the
    outcomes of single-flight ``wait``: a decision another worker stored while this one waited
    (``waited_for_decision``) or the lease to compute it (``leases``). Thread-safe.
    """

    inner: DecisionCache
    hits: int = 0
    waited_for_decision: int = 0
    leases: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def get_many(self, keys: Sequence[str]) -> list[Decision | None]:
        """See :meth:`DecisionCache.get_many`; counts the hits."""
        found = self.inner.get_many(keys)
        with self._lock:
            self.hits += sum(decision is not None for decision in found)
        return found

    def put(self, key: str, decision: Decision, ttl_seconds: int) -> None:
        """See :meth:`DecisionCache.put`."""
        self.inner.put(key, decision, ttl_seconds)

    def put_many(self, entries: Sequence[tuple[str, Decision, int]]) -> None:
        """See :meth:`DecisionCache.put_many`."""
        self.inner.put_many(entries)

    def forget(self, key: str) -> bool:
        """See :meth:`DecisionCache.forget`."""
        return self.inner.forget(key)

    def claim(self, key: str, lease_s: float) -> Lease | None:
        """See :meth:`DecisionCache.claim`."""
        return self.inner.claim(key, lease_s)

    def wait(self, key: str, timeout_s: float, lease_s: float | None = None) -> Decision | Lease:
        """See :meth:`DecisionCache.wait`; counts whether it gave a decision or the lease."""
        outcome = self.inner.wait(key, timeout_s, lease_s)
        with self._lock:
            if isinstance(outcome, Decision):
                self.waited_for_decision += 1
            else:
                self.leases += 1
        return outcome

    def close(self) -> None:
        """See :meth:`DecisionCache.close`."""
        self.inner.close()

    def counts(self) -> dict[str, int]:
        """The counters, as JSON."""
        with self._lock:
            return {
                "answered_by_lookup": self.hits,
                "answered_by_waiting_on_single_flight": self.waited_for_decision,
                "single_flight_leases": self.leases,
            }


@dataclass(frozen=True)
class BurstOrder:
    """What one process of the cross-process burst does (pickled to the spawned process)."""

    settings: Settings
    model_dir: Path
    redis_url: str
    prefix: str
    text: str
    threads: int
    process_index: int


def threaded_burst(
    cascade: Cascade, text: str, threads: int, id_prefix: str, start: Callable[[], object]
) -> tuple[list[Decision], float, float]:
    """``threads`` threads each decide one message with ``text`` at once.

    The threads meet at a barrier whose action calls ``start`` (the cross-process barrier, or
    nothing) and stamps the start time. Returns the decisions and the ``time.time()`` at which
    the threads were released and at which the last one finished.
    """
    messages = [Message(id=f"{id_prefix}-{i}", text=text) for i in range(threads)]
    released: list[float] = []

    def release() -> None:
        start()
        released.append(time.time())

    barrier = threading.Barrier(threads, action=release, timeout=BURST_TIMEOUT_S)

    def one(message: Message) -> Decision:
        barrier.wait()
        return cascade.decide([message])[0]

    with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="burst") as pool:
        decisions = list(pool.map(one, messages, timeout=BURST_TIMEOUT_S))
    return decisions, released[0], time.time()


def burst_summary(decisions: Sequence[Decision], counts: dict[str, int]) -> dict[str, Any]:
    """What came back from a burst: how many decisions, by which tier, from where."""
    return {
        "decisions": len(decisions),
        "answered_by_llm_call": sum(d.tier is Tier.LLM and not d.cached for d in decisions),
        "answered_from_cache": sum(d.cached for d in decisions),
        "llm_skipped": sum(d.llm_skipped is not None for d in decisions),
        "distinct_labels": sorted({str(d.label) for d in decisions}),
        **counts,
    }


def burst_process(order: BurstOrder, go: Barrier, results: Queue[dict[str, Any]]) -> None:
    """One spawned process of the cross-process burst: its own cascade, ``order.threads`` threads.

    Loads the model and warms everything up, waits at ``go`` for the other processes, sends the
    burst, and puts its decisions' summary and timings on ``results`` (or ``{"error": ...}``).
    """
    try:
        configure_logging("WARNING")
        classifier = BertClassifier.from_settings(order.settings, order.model_dir)
        classifier.warmup()
        client = redis.Redis.from_url(order.redis_url)
        cache = ObservedCache(RedisDecisionCache(client, order.prefix))
        cascade = simulated_cascade(order.settings, classifier, cache)
        cache.inner.get_many(["warm-up"])  # open the connection before the burst
        decisions, released, finished = threaded_burst(
            cascade,
            order.text,
            order.threads,
            f"p{order.process_index}",
            lambda: go.wait(BURST_TIMEOUT_S),
        )
        results.put(
            {
                "process": order.process_index,
                "released": released,
                "finished": finished,
                **burst_summary(decisions, cache.counts()),
            }
        )
    except BaseException as exc:  # noqa: BLE001 -- the parent reports whatever went wrong
        results.put({"process": order.process_index, "error": f"{type(exc).__name__}: {exc}"})


def bursts(
    settings: Settings,
    classifier: BertClassifier,
    redis_url: str,
    new_prefix: Callable[[str], str],
    text: str,
    args: argparse.Namespace,
    model_dir: Path,
) -> dict[str, Any]:
    """Part 4: the burst in one process's threads, then across spawned processes."""
    client = redis.Redis.from_url(redis_url)
    with FakeLLMServer(latency_s=args.burst_latency_s) as server:
        llm_settings = simulated_llm_settings(settings, server)
        cache = ObservedCache(RedisDecisionCache(client, new_prefix("burst")))
        cascade = simulated_cascade(llm_settings, classifier, cache)
        cache.inner.get_many(["warm-up"])
        before = server.calls
        decisions, released, finished = threaded_burst(cascade, text, args.burst, "t", lambda: None)
        threads = {
            "threads": args.burst,
            "upstream_calls": server.calls - before,
            "wall_s": round(finished - released, 3),
            **burst_summary(decisions, cache.counts()),
        }

        context = multiprocessing.get_context("spawn")
        go = context.Barrier(args.burst_processes)
        results: Queue[dict[str, Any]] = context.Queue()
        prefix = new_prefix("burst-processes")
        per_process = args.burst // args.burst_processes
        processes = [
            context.Process(
                target=burst_process,
                args=(
                    BurstOrder(llm_settings, model_dir, redis_url, prefix, text, per_process, i),
                    go,
                    results,
                ),
                name=f"burst-{i}",
            )
            for i in range(args.burst_processes)
        ]
        before = server.calls
        for process in processes:
            process.start()
        try:
            reports = [results.get(timeout=BURST_TIMEOUT_S) for _ in processes]
        except queue.Empty:
            fail(f"the cross-process burst did not finish within {BURST_TIMEOUT_S:g} s")
        finally:
            for process in processes:
                process.join(timeout=30)
        calls = server.calls - before
    errors = [report["error"] for report in reports if "error" in report]
    if errors:
        fail("a burst process failed: " + "; ".join(errors))
    summed = {
        name: sum(report[name] for report in reports)
        for name in (
            "decisions",
            "answered_by_llm_call",
            "answered_from_cache",
            "llm_skipped",
            "answered_by_lookup",
            "answered_by_waiting_on_single_flight",
            "single_flight_leases",
        )
    }
    across = {
        "processes": args.burst_processes,
        "threads_per_process": per_process,
        "upstream_calls": calls,
        "wall_s": round(
            max(r["finished"] for r in reports) - min(r["released"] for r in reports), 3
        ),
        **summed,
        "distinct_labels": sorted({label for r in reports for label in r["distinct_labels"]}),
    }
    return {
        "what": "identical LLM-bound messages, new ids, released together; RedisDecisionCache "
        "single-flight; FakeLLMServer",
        "llm_latency_s": args.burst_latency_s,
        "threads": threads,
        "processes": across,
    }


# ---------------------------------------------------------------------------------- main


def burst_text(predictions: Sequence[Prediction], spec: PolicySpec, split: HeldOut) -> str:
    """The least confident test message that the policy sends to the LLM."""
    routed = [i for i, p in enumerate(predictions) if decide(p, spec).target is Target.LLM]
    if not routed:
        fail(f"policy {spec.name!r} sends no test message to the LLM; nothing to burst")
    return split.texts[min(routed, key=lambda i: predictions[i].top_probability)]


def hit_text(predictions: Sequence[Prediction], spec: PolicySpec, split: HeldOut) -> str:
    """The shortest test message the BERT tier answers (a hit costs the same whoever decided)."""
    kept = [i for i, p in enumerate(predictions) if decide(p, spec).target is Target.BERT]
    return split.texts[min(kept or range(len(split.texts)), key=lambda i: len(split.texts[i]))]


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark, print the tables and write the JSON and PNG; return the exit status."""
    args = parse_args(argv)
    configure_logging("WARNING")
    settings = Settings()
    model_dir, test_path = model_and_split(args, settings)
    redis_url = args.redis_url or settings.redis_url or DEFAULT_REDIS_URL
    client = redis.Redis.from_url(redis_url)
    try:
        machine_info = machine(client)  # before the benchmark adds its own load
    except redis.RedisError as exc:
        fail(f"Redis at {redis_url} does not answer ({exc}); parts 3 and 4 need it")
    split = read_test_split(test_path, args.limit)

    classifier = BertClassifier.from_settings(settings, model_dir)
    classifier.warmup()
    spec = policy_book_for(settings, classifier).default
    unknown_gold = set(split.labels) - set(spec.label_names)
    if unknown_gold:
        fail(f"{test_path} has labels the policy lacks: {sorted(unknown_gold)}")
    note(
        f"{len(split.texts)} messages from {test_path} · model {classifier.model_version} · "
        f"policy {spec.name} v{spec.version} · simulated LLM at {args.llm_accuracy:.0%}"
    )

    # Part 1: the trade-off.
    predictions, scoring_s = score_in_batches(classifier, split.texts, args.batch_size)
    price = price_calls(settings, spec, split.texts)
    answers = simulate_llm(split.labels, spec.label_names, args.llm_accuracy, args.seed)
    evaluation = evaluate_cascade(predictions, split.labels, answers, price.per_message, spec)
    title = f"tiergate cascade: {spec.name} v{spec.version}, {evaluation.n} held-out messages"
    with tempfile.TemporaryDirectory(prefix="tiergate-bench-") as scratch:
        evaluation_path = Path(scratch) / "evaluation.json"
        write_evaluation(evaluation, evaluation_path, args.plot, title=title, simulated=True)
        document = json.loads(evaluation_path.read_text(encoding="utf-8"))
    spreads = seed_spread(
        predictions,
        split,
        spec,
        price.per_message,
        args.llm_accuracy,
        range(1, args.spread_seeds + 1),
    )
    note("part 1 done: trade-off evaluated")

    # Part 2: the real cascade against the math.
    measured = end_to_end(settings, classifier, split, (predictions, evaluation, price), args)
    measured["bert_only_msgs_per_s"] = round(len(split.texts) / scoring_s, 2)
    note(f"part 2 done: {measured['msgs_per_s']:.0f} msg/s through the real cascade")

    # Parts 3 and 4: the cache and single-flight against real Redis.
    with key_prefixes("cascade", [redis_url]) as new_prefix:
        cache = cache_hits(
            settings,
            classifier,
            client,
            new_prefix("hits"),
            hit_text(predictions, spec, split),
            args.cache_hits,
        )
        note("part 3 done: cache hits timed")
        burst = bursts(
            settings,
            classifier,
            redis_url,
            new_prefix,
            burst_text(predictions, spec, split),
            args,
            model_dir,
        )
    client.close()

    matched = evaluation.matched_point
    results: dict[str, Any] = {
        "bert_only_accuracy": round(evaluation.bert_only.accuracy, 5),
        "llm_only_accuracy": round(evaluation.llm_only.accuracy, 5),
        "matched_accuracy_llm_share": round(evaluation.matched_accuracy_llm_share, 5),
        "cost_saving_vs_llm_only": round(evaluation.cost_saving_vs_llm_only or 0.0, 5),
        "operating_point": {
            "llm_share": round(evaluation.operating_point.llm_share, 5),
            "accuracy": round(evaluation.operating_point.accuracy, 5),
            "cost_per_1000": round(evaluation.operating_point.cost_per_1000, 6),
        },
        "matched_point": {
            "llm_share": round(matched.llm_share, 5),
            "accuracy": round(matched.accuracy, 5),
            "cost_per_1000": round(matched.cost_per_1000, 6),
        },
        "cache_hit_p50_ms": cache["decide_hit"]["p50_ms"],
        "burst_upstream_calls": burst["threads"]["upstream_calls"],
        "burst_upstream_calls_across_processes": burst["processes"]["upstream_calls"],
        "n": evaluation.n,
        "simulated": True,
        "simulated_llm": {
            "accuracy": args.llm_accuracy,
            "seed": args.seed,
            "how": "tiergate.policies.evaluate.simulate_llm: the gold label with probability "
            "'accuracy', else a uniformly drawn other label",
        },
        "llm_cost": {
            "provider": price.provider,
            "model": price.model,
            "input_per_mtok": price.input_per_mtok,
            "output_per_mtok": price.output_per_mtok,
            "mean_cost_per_call_usd": round(price.mean, 8),
            "how": f"each message's real prompt, {CHARS_PER_TOKEN} characters a token, plus "
            f"{ANSWER_TOKENS} answer tokens, at the list price",
            "simulated": True,
        },
        "policy": {"name": spec.name, "version": spec.version},
        "operating_routes": dict(evaluation.operating_routes),
        "seed_spread": spreads,
        "end_to_end": measured,
        "cache": cache,
        "burst": burst,
        "evaluation": {key: value for key, value in document.items() if key != "curve"},
        "plot": str(args.plot),
        "test_split": str(test_path),
        "model_dir": str(model_dir),
        "model_version": classifier.model_version,
        "intra_op_threads": settings.intra_op_threads,
        "machine": machine_info,
        "versions": package_versions((*RECORDED_PACKAGES, "openai", "redis", "numpy")),
        **provenance(args),
        "curve": document["curve"],
    }
    write_results(args.output, results)
    out.print(evaluation_table(evaluation))
    out.print(results_table(results))
    out.print(f"results written to {args.output} and {args.plot}", highlight=False, soft_wrap=True)
    broken = [
        f"{name} is {results[name]}, not 1"
        for name in ("burst_upstream_calls", "burst_upstream_calls_across_processes")
        if results[name] != 1
    ]
    if broken:
        fail("single-flight failed: " + "; ".join(broken))
    return 0


def results_table(results: dict[str, Any]) -> Table:
    """The headline figures of all four parts."""
    spreads, e2e, cache = results["seed_spread"], results["end_to_end"], results["cache"]
    threads, across = results["burst"]["threads"], results["burst"]["processes"]
    point, vs = results["operating_point"], e2e["vs_operating_point"]

    def pct(share: float) -> str:
        return f"{100 * share:.1f}%"

    def pct_range(figure: dict[str, float]) -> str:
        return f"{pct(figure['median'])} ({pct(figure['min'])}-{pct(figure['max'])})"

    table = Table(
        title=f"cascade on {results['n']} held-out messages, simulated LLM at "
        f"{results['simulated_llm']['accuracy']:.0%} ({results['llm_cost']['model']} prices)",
        header_style="bold",
    )
    table.add_column("measure")
    table.add_column("value", justify="right")
    table.add_column(f"seeds {spreads['seeds'][0]}-{spreads['seeds'][-1]}: median (min-max)")
    table.add_row("BERT-only accuracy", pct(results["bert_only_accuracy"]), "")
    table.add_row(
        "LLM-only accuracy (sim.)",
        pct(results["llm_only_accuracy"]),
        pct_range(spreads["llm_only_accuracy"]),
    )
    table.add_row(
        "LLM share, 1 pt of LLM-only",
        pct(results["matched_accuracy_llm_share"]),
        pct_range(spreads["matched_accuracy_llm_share"]),
    )
    table.add_row(
        "cost saving there",
        pct(results["cost_saving_vs_llm_only"]),
        pct_range(spreads["cost_saving_vs_llm_only"]),
    )
    table.add_row(
        "policy: share / accuracy",
        f"{pct(point['llm_share'])} / {pct(point['accuracy'])}",
        pct_range(spreads["operating_point_accuracy"]),
    )
    table.add_row(
        "real: share / accuracy",
        f"{pct(e2e['llm_share'])} / {pct(e2e['accuracy'])}",
        f"gap {vs['llm_share_gap_points']:+.2f} / {vs['accuracy_gap_points']:+.2f} pt",
    )
    table.add_row(
        "real: msg/s, instant LLM",
        f"{e2e['msgs_per_s']:.0f}",
        f"BERT alone {e2e['bert_only_msgs_per_s']:.0f}; {e2e['llm_calls_over_1s']} LLM calls > 1 s",
    )
    hit, get = cache["decide_hit"], cache["get_many_one_key"]
    table.add_row(
        "cache hit p50 / p99 ms",
        f"{hit['p50_ms']:.2f} / {hit['p99_ms']:.2f}",
        f"bare get_many p50 {get['p50_ms']:.2f}",
    )
    table.add_row(
        f"burst {threads['threads']} threads: calls",
        str(threads["upstream_calls"]),
        f"{threads['decisions']} decisions in {threads['wall_s']:.2f} s, "
        f"{threads['answered_by_waiting_on_single_flight']} waited",
    )
    table.add_row(
        f"burst {across['processes']}x{across['threads_per_process']} procs: calls",
        str(across["upstream_calls"]),
        f"{across['decisions']} decisions in {across['wall_s']:.2f} s, "
        f"{across['answered_by_waiting_on_single_flight']} waited",
    )
    return table


if __name__ == "__main__":
    sys.exit(main())
