"""The LLM tier: one message in, a validated label (and generated text) out.

:meth:`LLMTier.answer` redacts personal data, builds the prompt, and walks the policy's
provider chain: a provider whose circuit breaker is open is skipped; a transient failure
(after the SDK's own retries) counts against its breaker and moves on to the next provider;
an answer is validated, and an invalid one gets exactly one repair attempt on the same
provider (an answer cut off at the output limit is asked again with twice the room, up to
4,096 tokens). Invalid answers and refusals do not move on to the next provider: the message
itself may be what the models stumble on, and the caller has the BERT answer to fall back to.
Every call is paid for: a result, or the error raised, carries the usage of all calls made.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from decimal import Decimal

import structlog

from tiergate.policies.spec import PolicySpec, ProviderRef, Task
from tiergate.workers.errors import (
    BreakerOpenError,
    CoordinationError,
    InvalidAnswerError,
    PermanentLLMError,
    ProviderNotConfiguredError,
    RefusalError,
    TransientLLMError,
)
from tiergate.workers.llm.breaker import BreakerStore, CircuitBreaker, LocalBreakerStore
from tiergate.workers.llm.prompt import (
    PROMPT_VERSION,
    SCHEMA_NAME,
    Answer,
    answer_schema,
    build_prompt,
    parse_answer,
)
from tiergate.workers.llm.prompt_cache import prompt_cache_key
from tiergate.workers.llm.provider import Provider, ProviderAnswer, ProviderRequest, build_provider
from tiergate.workers.llm.redact import Redactor
from tiergate.workers.schemas import LLMMode, LLMUsage
from tiergate.workers.settings import Price, Settings

log = structlog.get_logger(__name__)

# Characters per token assumed for budget estimates: below the ~4 of English text, so the
# estimate errs on the expensive side.
_CHARS_PER_TOKEN = 3

# The most output tokens the repair of a truncated answer asks for (it asks for twice the
# policy's limit, but never less than that limit).
MAX_REPAIR_OUTPUT_TOKENS = 4096


@dataclass(frozen=True)
class LLMRequest:
    """One message for the LLM tier.

    ``task`` says whether generated text is wanted; ``labels`` are the borderline labels of a
    multi-label message (the LLM decides only those; empty means all labels).
    """

    text: str
    spec: PolicySpec
    task: Task = Task.CLASSIFY
    labels: tuple[str, ...] = ()


@dataclass(frozen=True)
class LLMResult:
    """The LLM tier's validated answer.

    Single-label policies: ``label`` and ``labels == [label]``. Multi-label policies:
    ``label`` is ``None`` and ``labels`` are the asked labels that apply. ``text`` is the
    generated text with personal data restored (``None`` when none was asked for). ``usage``
    sums tokens, dollars and HTTP calls over every attempt; its provider and model are the
    ones that answered.
    """

    label: str | None
    labels: list[str]
    text: str | None
    usage: LLMUsage


class _Spend:
    """Tokens, dollars and calls accumulated over the attempts for one message.

    Dollars are summed as exact decimals and rounded to a float once, in :meth:`usage`.
    """

    def __init__(self) -> None:
        self.input_tokens = 0
        self.cached_input_tokens = 0
        self.cache_write_tokens = 0
        self.output_tokens = 0
        self.cost_usd = Decimal(0)
        self.attempts = 0

    def add(self, reply: ProviderAnswer, price: Price | None, *, batch: bool = False) -> None:
        """Count one answered call, priced at ``price`` (free when the model has none).

        ``batch``: the call went through the provider's batch API (its discount applies).
        """
        self.input_tokens += reply.input_tokens
        self.cached_input_tokens += reply.cached_input_tokens
        self.cache_write_tokens += reply.cache_write_tokens
        self.output_tokens += reply.output_tokens
        if price is not None:
            self.cost_usd += price.exact_cost(
                reply.input_tokens,
                reply.output_tokens,
                cached_input_tokens=reply.cached_input_tokens,
                cache_write_tokens=reply.cache_write_tokens,
                batch=batch,
            )

    def usage(self, provider: Provider, mode: LLMMode = LLMMode.ONLINE) -> LLMUsage:
        """The spend so far, named after ``provider`` (the one that answered or failed last)."""
        return LLMUsage(
            provider=provider.name,
            model=provider.model,
            input_tokens=self.input_tokens,
            cached_input_tokens=self.cached_input_tokens,
            cache_write_tokens=self.cache_write_tokens,
            output_tokens=self.output_tokens,
            cost_usd=float(self.cost_usd),
            attempts=self.attempts,
            mode=mode,
        )


class LLMTier:
    """The orchestrator the cascade calls for messages routed to the LLM.

    Providers are built lazily from each policy's ``llm.providers`` and kept for the life of
    the tier (one SDK client each); ``providers`` injects ready ones keyed by
    ``(provider name, model)``, which take precedence. Circuit breakers live in
    ``breaker_store`` (in process by default; pass a
    :class:`~tiergate.workers.llm.breaker.RedisBreakerStore` to share them between workers);
    ``breaker_clock`` is the breakers' clock, in seconds (``time.time`` by default); like
    :class:`~tiergate.workers.llm.breaker.CircuitBreaker`'s, it must agree across the workers
    that share a store. At most ``settings.llm_concurrency`` provider calls are in flight per
    tier. Thread-safe.
    """

    def __init__(
        self,
        settings: Settings,
        *,
        breaker_store: BreakerStore | None = None,
        providers: Mapping[tuple[str, str], Provider] | None = None,
        breaker_clock: Callable[[], float] = time.time,
    ) -> None:
        self.prompt_version = PROMPT_VERSION
        self._settings = settings
        self._breaker = CircuitBreaker(
            breaker_store if breaker_store is not None else LocalBreakerStore(),
            settings.breaker_failures,
            settings.breaker_reset_s,
            clock=breaker_clock,
        )
        self._injected = dict(providers or {})
        self._built: dict[ProviderRef, Provider | None] = {}
        self._build_lock = threading.Lock()
        self._slots = threading.BoundedSemaphore(settings.llm_concurrency)
        self._redactor = Redactor()

    @property
    def breaker(self) -> CircuitBreaker:
        """The circuit breaker guarding this tier's providers (keys ``provider:model``)."""
        return self._breaker

    def chain(self, spec: PolicySpec) -> list[Provider]:
        """The usable providers of ``spec.llm.providers``, in order.

        Providers without an API key (or with an unknown name) are skipped, with a warning
        logged once per tier.
        """
        chain = []
        for ref in spec.llm.providers:
            provider = self._provider(ref)
            if provider is not None:
                chain.append(provider)
        return chain

    def configured(self, spec: PolicySpec) -> bool:
        """Whether at least one provider of the policy's chain is usable."""
        return bool(self.chain(spec))

    def route_key(self, spec: PolicySpec) -> str:
        """The usable chain as ``provider/model>provider/model``.

        It is part of the decision-cache key, so one chain never reuses another's answers.
        """
        return ">".join(f"{provider.name}/{provider.model}" for provider in self.chain(spec))

    def estimate_cost(self, spec: PolicySpec, text: str, *, batch: bool = False) -> float:
        """A deliberately high estimate of one answer's cost in dollars, for budget reservation.

        Input tokens are the prompt's characters / 3, output tokens the policy's
        ``max_output_tokens``, priced at the dearest model of the chain (any may answer);
        unpriced models count as free. A repair attempt is not included. ``batch``: at the
        batch discount (a request sent through the provider's batch API).
        """
        system, user = build_prompt(text, spec, Task.CLASSIFY, ())
        input_tokens = math.ceil((len(system) + len(user)) / _CHARS_PER_TOKEN)
        costs = [
            price.cost(input_tokens, spec.llm.max_output_tokens, batch=batch)
            for provider in self.chain(spec)
            if (price := self._settings.llm_prices.get(provider.model)) is not None
        ]
        return max(costs, default=0.0)

    def answer(self, request: LLMRequest) -> LLMResult:
        """Ask the policy's providers, in order, for a validated answer to ``request``.

        The errors raised after a call was made carry ``usage``: every call made for this
        request (attempts, tokens and dollars, over the whole chain), named after the provider
        that failed last.

        Raises:
            ProviderNotConfiguredError: the policy has no usable provider.
            BreakerOpenError: every provider's breaker is open; no call was made.
            TransientLLMError: every provider that was tried failed transiently (the last
                error is raised, so its ``retry_after`` survives).
            RefusalError: the answering provider refused.
            InvalidAnswerError: the answer stayed invalid after one repair attempt.
            PermanentLLMError: a provider rejected the request or its credentials.
        """
        spec = request.spec
        chain = self.chain(spec)
        if not chain:
            raise ProviderNotConfiguredError(
                "llm", f"policy {spec.name!r} has no provider with an API key"
            )
        wire, mapping = self._wire(request)
        spend = _Spend()
        last_error: TransientLLMError | None = None
        for provider in chain:
            key = f"{provider.name}:{provider.model}"
            if not self._breaker_allows(key):
                log.warning("llm.breaker_open", provider=provider.name, model=provider.model)
                continue
            try:
                answer = self._ask(provider, key, wire, request, spend)
            except TransientLLMError as exc:
                exc.usage = spend.usage(provider)
                last_error = exc
                log.warning(
                    "llm.fallback",
                    provider=provider.name,
                    model=provider.model,
                    error=str(exc),
                    retry_after=exc.retry_after,
                )
                continue
            except PermanentLLMError as exc:
                exc.usage = spend.usage(provider)
                raise
            return self._result(answer, mapping, spend.usage(provider))
        if last_error is not None:
            raise last_error
        raise _all_breakers_open(chain)

    def _wire(self, request: LLMRequest) -> tuple[ProviderRequest, dict[str, str]]:
        """The request as sent (redacted), and the mapping that restores the redacted data."""
        spec = request.spec
        text, mapping = (
            self._redactor.redact(request.text) if self._settings.redact_pii else (request.text, {})
        )
        system, user = build_prompt(text, spec, request.task, request.labels)
        wire = ProviderRequest(
            system=system,
            user=user,
            schema=answer_schema(spec, request.task, request.labels),
            schema_name=SCHEMA_NAME,
            max_output_tokens=spec.llm.max_output_tokens,
            cache_key=(
                prompt_cache_key(spec.name, spec.version, self.prompt_version)
                if self._settings.llm_prompt_caching
                else None
            ),
        )
        return wire, mapping

    def batch_provider(self, spec: PolicySpec) -> Provider | None:
        """The provider a batch of ``spec``'s requests goes to: the first usable one."""
        chain = self.chain(spec)
        return chain[0] if chain else None

    def batch_request(self, request: LLMRequest) -> ProviderRequest:
        """What one request of a batch sends: the same prompt an online call would send."""
        return self._wire(request)[0]

    def batch_result(
        self, provider: Provider, reply: ProviderAnswer, request: LLMRequest
    ) -> LLMResult:
        """Validate a batch's answer to ``request`` exactly as an online answer is validated.

        The usage is priced at the batch discount and marked ``mode: batch``. There is no
        repair attempt (the caller retries the request online or in the next batch).

        Raises:
            RefusalError: the model refused.
            InvalidAnswerError: the answer is invalid or was cut off; its ``usage`` says what
                the call cost.
        """
        spend = _Spend()
        spend.attempts = 1
        price = self._settings.llm_prices.get(provider.model) or self._settings.llm_prices.get(
            reply.model
        )
        spend.add(reply, price, batch=True)
        wire, mapping = self._wire(request)
        try:
            answer = self._validate(provider, reply, request, wire)
        except RefusalError as exc:
            exc.usage = spend.usage(provider, LLMMode.BATCH)
            raise
        except ValueError as exc:
            error = InvalidAnswerError(provider.name, f"invalid answer in a batch: {exc}")
            error.usage = spend.usage(provider, LLMMode.BATCH)
            raise error from None
        return self._result(answer, mapping, spend.usage(provider, LLMMode.BATCH))

    def _result(self, answer: Answer, mapping: dict[str, str], usage: LLMUsage) -> LLMResult:
        """The validated ``answer`` as the tier's result, personal data restored in its text."""
        generated = (
            self._redactor.restore(answer.text, mapping) if answer.text is not None else None
        )
        return LLMResult(
            label=answer.label, labels=list(answer.labels), text=generated, usage=usage
        )

    def check_breakers(self, spec: PolicySpec) -> None:
        """Raise :class:`BreakerOpenError` when no provider of ``spec``'s chain would be called.

        It only reads the breakers (:meth:`CircuitBreaker.would_allow`): a half-open breaker's
        probe is not taken, so the :meth:`answer` that follows can still make it. Callers check
        before spending on a call (a budget reservation) that an outage would waste. It is
        advisory: a breaker that opens between this check and :meth:`answer` is handled there
        as usual. A breaker store that is down passes the check, as it lets calls out in
        :meth:`answer`; a policy with no usable provider passes too (:meth:`answer` says so).
        """
        chain = self.chain(spec)
        if chain and not any(
            self._breaker_allows(f"{provider.name}:{provider.model}", take_probe=False)
            for provider in chain
        ):
            raise _all_breakers_open(chain)

    def _ask(
        self,
        provider: Provider,
        key: str,
        wire: ProviderRequest,
        request: LLMRequest,
        spend: _Spend,
    ) -> Answer:
        """One provider's validated answer, with at most one repair attempt.

        An invalid answer is sent back with the problem named; a truncated one is asked again
        unchanged with a larger output limit (:func:`_repair_output_limit`).
        """
        reply = self._call(provider, key, wire, spend)
        try:
            return self._validate(provider, reply, request, wire)
        except ValueError as exc:
            problem = str(exc)
        log.info(
            "llm.repair",
            provider=provider.name,
            model=provider.model,
            problem=problem,
            truncated=reply.truncated,
        )
        if reply.truncated:
            repair = replace(wire, max_output_tokens=_repair_output_limit(wire.max_output_tokens))
        else:
            repair = replace(wire, repair_of=(reply.raw, problem))
        reply = self._call(provider, key, repair, spend)
        try:
            return self._validate(provider, reply, request, repair)
        except ValueError as exc:
            log.warning(
                "llm.invalid_answer", provider=provider.name, model=provider.model, problem=str(exc)
            )
            raise InvalidAnswerError(
                provider.name, f"invalid answer after one repair attempt: {exc}"
            ) from None

    def _validate(
        self, provider: Provider, reply: ProviderAnswer, request: LLMRequest, wire: ProviderRequest
    ) -> Answer:
        """The validated answer in ``reply`` to ``wire``.

        Raises RefusalError on a refusal, and ValueError for an invalid answer or one cut off
        at the output limit (whatever part of it arrived is not trusted).
        """
        if reply.refusal is not None:
            log.warning("llm.refusal", provider=provider.name, model=provider.model)
            raise RefusalError(provider.name, f"the model refused: {reply.refusal[:200]}")
        if reply.truncated:
            raise ValueError(
                f"the answer was cut off at the output limit of {wire.max_output_tokens} tokens"
            )
        return parse_answer(reply.data, request.spec, request.task, request.labels)

    def _call(
        self, provider: Provider, key: str, wire: ProviderRequest, spend: _Spend
    ) -> ProviderAnswer:
        """One ``complete`` call, reported to the breaker and added to ``spend``."""
        started = time.perf_counter()
        spend.attempts += 1
        try:
            with self._slots:
                reply = provider.complete(wire)
        except TransientLLMError:
            self._report(key, success=False)
            raise
        except PermanentLLMError:
            # The provider answered, so it is up; the fault is in the request or the key.
            self._report(key, success=True)
            raise
        self._report(key, success=True)
        price = self._settings.llm_prices.get(provider.model) or self._settings.llm_prices.get(
            reply.model
        )
        spend.add(reply, price)
        log.info(
            "llm.call",
            provider=provider.name,
            model=provider.model,
            input_tokens=reply.input_tokens,
            cached_input_tokens=reply.cached_input_tokens,
            cache_write_tokens=reply.cache_write_tokens,
            output_tokens=reply.output_tokens,
            latency_ms=round((time.perf_counter() - started) * 1000.0, 1),
            repair=wire.repair_of is not None,
        )
        return reply

    def _breaker_allows(self, key: str, *, take_probe: bool = True) -> bool:
        """Whether the breaker lets a call to ``key`` go out; yes when its store is down.

        With ``take_probe=False`` it only looks (:meth:`CircuitBreaker.would_allow`) and leaves
        a half-open breaker's probe for the call. The breaker only protects providers, so
        losing its shared store (Redis) must not stop the LLM tier: calls go out unguarded and
        the outage is logged.
        """
        try:
            return self._breaker.allow(key) if take_probe else self._breaker.would_allow(key)
        except CoordinationError as exc:
            log.warning("llm.breaker_unavailable", key=key, error=str(exc))
            return True

    def _report(self, key: str, *, success: bool) -> None:
        """Tell the breaker how a call to ``key`` went; a store outage is logged, not raised."""
        try:
            if success:
                self._breaker.record_success(key)
            else:
                self._breaker.record_failure(key)
        except CoordinationError as exc:
            log.warning("llm.breaker_unavailable", key=key, error=str(exc))

    def _provider(self, ref: ProviderRef) -> Provider | None:
        """The provider for ``ref``: injected, built before, or built now (``None``: unusable)."""
        injected = self._injected.get((ref.provider, ref.model))
        if injected is not None:
            return injected
        if ref in self._built:  # the common case: built before, no lock needed to read
            return self._built[ref]
        with self._build_lock:
            if ref not in self._built:
                try:
                    self._built[ref] = build_provider(ref, self._settings)
                except ProviderNotConfiguredError as exc:
                    log.info(
                        "llm.provider_unconfigured",
                        provider=ref.provider,
                        model=ref.model,
                        reason=exc.reason,
                    )
                    self._built[ref] = None
            return self._built[ref]


def _repair_output_limit(limit: int) -> int:
    """The output limit for re-asking a truncated answer: twice ``limit``, bounded."""
    return max(limit, min(2 * limit, MAX_REPAIR_OUTPUT_TOKENS))


def _all_breakers_open(chain: list[Provider]) -> BreakerOpenError:
    """The error for a chain whose every provider is held back by its breaker."""
    names = ", ".join(f"{provider.name}/{provider.model}" for provider in chain)
    return BreakerOpenError("llm", f"circuit breaker open for every provider ({names})")
