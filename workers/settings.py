"""All of tiergate's configuration, read once from the environment (prefix ``TIERGATE_``)."""

from __future__ import annotations

import os
from decimal import Decimal
from pathlib import Path
from typing import Annotated

from pydantic import (
    AliasChoices,
    BaseModel,
    ConfigDict,
    Field,
    NonNegativeFloat,
    PositiveFloat,
    PositiveInt,
    SecretStr,
)
from pydantic_settings import BaseSettings, SettingsConfigDict


def _default_data_dir() -> Path:
    xdg = os.environ.get("XDG_DATA_HOME")
    base = Path(xdg) if xdg else Path.home() / ".local" / "share"
    return base / "tiergate"


class Price(BaseModel):
    """A model's list prices in US dollars per million tokens, and how to charge one call.

    ``cached_input_per_mtok`` is the rate of input tokens read from the provider's prompt cache
    (OpenAI "cached input", Anthropic "cache hits"); ``cache_write_per_mtok`` the rate of input
    tokens written to it (Anthropic's 5-minute cache writes; OpenAI charges none). Either,
    unset, is the plain input rate. ``batch_discount`` is the share taken off every rate for a
    call made through the provider's batch API (0.5 at both OpenAI and Anthropic; 0 for a
    model sold without one).
    """

    model_config = ConfigDict(frozen=True)

    input_per_mtok: NonNegativeFloat
    output_per_mtok: NonNegativeFloat
    cached_input_per_mtok: NonNegativeFloat | None = None
    cache_write_per_mtok: NonNegativeFloat | None = None
    batch_discount: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.0

    def exact_cost(
        self,
        input_tokens: int,
        output_tokens: int,
        *,
        cached_input_tokens: int = 0,
        cache_write_tokens: int = 0,
        batch: bool = False,
    ) -> Decimal:
        """Dollars for one call, exactly (decimal arithmetic on the rates as written).

        ``input_tokens`` counts every input token of the call, of which ``cached_input_tokens``
        were read from the prompt cache and ``cache_write_tokens`` written to it; the rest are
        charged at the input rate (never fewer than none, whatever a server reports).
        """
        cached = _rate(self.cached_input_per_mtok, self.input_per_mtok)
        write = _rate(self.cache_write_per_mtok, self.input_per_mtok)
        plain = max(0, input_tokens - cached_input_tokens - cache_write_tokens)
        dollars = (
            plain * _decimal(self.input_per_mtok)
            + cached_input_tokens * cached
            + cache_write_tokens * write
            + output_tokens * _decimal(self.output_per_mtok)
        ) / _MILLION
        if batch:
            dollars *= 1 - _decimal(self.batch_discount)
        return dollars

    def cost(
        self,
        input_tokens: int,
        output_tokens: int,
        *,
        cached_input_tokens: int = 0,
        cache_write_tokens: int = 0,
        batch: bool = False,
    ) -> float:
        """:meth:`exact_cost` rounded once to the nearest float."""
        return float(
            self.exact_cost(
                input_tokens,
                output_tokens,
                cached_input_tokens=cached_input_tokens,
                cache_write_tokens=cache_write_tokens,
                batch=batch,
            )
        )


_MILLION = Decimal(1_000_000)


def _decimal(rate: float) -> Decimal:
    """A rate as the decimal it was written as (``0.15``, not the float's binary expansion)."""
    return Decimal(repr(rate))


def _rate(rate: float | None, fallback: float) -> Decimal:
    return _decimal(fallback if rate is None else rate)


# Published list prices (USD per million tokens) of common small models: input, cached input,
# 5-minute cache write (Anthropic), output, and the batch API's discount. Override or extend
# with TIERGATE_LLM_PRICES='{"my-model": {"input_per_mtok": 0.1, "output_per_mtok": 0.4}}'.
# OpenAI caches automatically at no write charge: a cached token costs half the input rate for
# gpt-4o-mini and a quarter for the gpt-4.1 family. Anthropic: cache reads 0.1x and 5-minute
# cache writes 1.25x the input rate.
DEFAULT_PRICES: dict[str, Price] = {
    "gpt-4o-mini": Price(
        input_per_mtok=0.15, cached_input_per_mtok=0.075, output_per_mtok=0.60, batch_discount=0.5
    ),
    "gpt-4.1-mini": Price(
        input_per_mtok=0.40, cached_input_per_mtok=0.10, output_per_mtok=1.60, batch_discount=0.5
    ),
    "gpt-4.1-nano": Price(
        input_per_mtok=0.10, cached_input_per_mtok=0.025, output_per_mtok=0.40, batch_discount=0.5
    ),
    "claude-haiku-4-5": Price(
        input_per_mtok=1.00,
        cached_input_per_mtok=0.10,
        cache_write_per_mtok=1.25,
        output_per_mtok=5.00,
        batch_discount=0.5,
    ),
    "claude-3-5-haiku-latest": Price(
        input_per_mtok=0.80,
        cached_input_per_mtok=0.08,
        cache_write_per_mtok=1.00,
        output_per_mtok=4.00,
        batch_discount=0.5,
    ),
}


class Settings(BaseSettings):
    """tiergate's settings.

    Built once at a front door (the CLI, later the HTTP app factory and the Celery app factory)
    and passed down explicitly; nothing deeper reads the environment. Every field can be set as
    ``TIERGATE_<FIELD>`` (for example ``TIERGATE_MODEL_DIR=/srv/model``).
    """

    model_config = SettingsConfigDict(env_prefix="TIERGATE_", extra="ignore", populate_by_name=True)

    data_dir: Path = Field(
        default_factory=_default_data_dir,
        description="Where tiergate keeps built models and prepared datasets.",
    )
    model_dir: Path | None = Field(
        default=None,
        description="The BERT-tier model directory; defaults to <data_dir>/models/default.",
    )
    intra_op_threads: PositiveInt = Field(
        default_factory=lambda: os.cpu_count() or 1,
        description="ONNX Runtime threads inside one operator, per process. With several "
        "worker processes on one machine, set it to cores / processes. The embedded gateway "
        "shares them between parallel steps (gateway_parallel_steps).",
    )
    inter_op_threads: PositiveInt = Field(
        default=1, description="ONNX Runtime threads across operators (the graph is sequential)."
    )
    intra_op_spin_wait: bool = Field(
        default=False,
        description="Let idle ONNX Runtime threads spin between batches (a little faster on a "
        "dedicated machine; wasteful beside other processes).",
    )
    batch_size: PositiveInt = Field(
        default=32, description="Windows per ONNX Runtime call; batches are sorted by length."
    )
    chunk_overlap: int | None = Field(
        default=None,
        ge=0,
        description="Tokens shared by consecutive windows when a text is longer than the "
        "model's window (default: a quarter of the window).",
    )
    log_level: str = Field(default="INFO", description="structlog level name.")

    # --- policies
    policy_files: list[Path] = Field(
        default_factory=list,
        description="Policy YAML files to load (JSON list); the first is also served as "
        "'default'. Empty: the default model's shipped policy, or one built from the model's "
        "labels.",
    )

    # --- the LLM tier
    openai_api_key: SecretStr | None = Field(
        default=None,
        validation_alias=AliasChoices("TIERGATE_OPENAI_API_KEY", "OPENAI_API_KEY"),
        description="API key for the 'openai' provider (or OPENAI_API_KEY).",
    )
    openai_base_url: str | None = Field(
        default=None,
        description="Endpoint of an OpenAI-compatible server (vLLM, Ollama, llama.cpp); a "
        "policy's provider entry may override it.",
    )
    anthropic_api_key: SecretStr | None = Field(
        default=None,
        validation_alias=AliasChoices("TIERGATE_ANTHROPIC_API_KEY", "ANTHROPIC_API_KEY"),
        description="API key for the 'anthropic' provider (or ANTHROPIC_API_KEY).",
    )
    anthropic_base_url: str | None = Field(
        default=None, description="Endpoint of the Anthropic API (or a compatible server)."
    )
    llm_timeout_s: PositiveFloat = Field(default=30.0, description="Per-request LLM timeout.")
    llm_max_retries: int = Field(
        default=2,
        ge=0,
        description="Retries per provider on 429, 5xx, timeouts and connection errors, with "
        "exponential backoff that honours Retry-After.",
    )
    llm_concurrency: PositiveInt = Field(
        default=8, description="LLM requests in flight at once per process."
    )
    llm_prices: dict[str, Price] = Field(
        default_factory=lambda: dict(DEFAULT_PRICES),
        description="USD per million input, cached input, cache-write and output tokens, and "
        "the batch discount, keyed by model name.",
    )
    llm_prompt_caching: bool = Field(
        default=True,
        description="Use the providers' prompt caches: a stable prompt_cache_key per policy "
        "version for OpenAI, cache_control on the static prefix for Anthropic when it is long "
        "enough for the model.",
    )
    redact_pii: bool = Field(
        default=True,
        description="Replace e-mail addresses, phone numbers, card numbers, IBANs and IP "
        "addresses with placeholders before text leaves for an LLM.",
    )
    breaker_failures: PositiveInt = Field(
        default=5, description="Consecutive provider failures that open its circuit breaker."
    )
    breaker_reset_s: PositiveFloat = Field(
        default=30.0, description="Seconds an open breaker waits before letting a probe through."
    )

    # --- cache, single-flight and budgets
    redis_url: str | None = Field(
        default=None,
        description="Redis for the decision cache, single-flight, budgets and breaker state. "
        "Unset: an embedded SQLite cache and in-process state.",
    )
    cache_prefix: str = Field(default="tiergate", description="Prefix of every Redis key.")
    cache_path: Path | None = Field(
        default=None, description="The embedded SQLite cache (default <data_dir>/cache.sqlite3)."
    )
    single_flight_timeout_s: PositiveFloat = Field(
        default=60.0,
        description="How long a message waits for another worker's LLM call on the same text.",
    )

    @property
    def resolved_model_dir(self) -> Path:
        """The model to serve while no version is promoted: ``model_dir``, else the default."""
        return self.model_dir if self.model_dir is not None else self.default_model_dir

    # --- model versions (promotion, rollback, shadow)
    model_store: Path | None = Field(
        default=None,
        description="Where model versions live, one directory each (default "
        "<data_dir>/models/versions). Every worker and gateway must reach the same directory "
        "(a shared volume); the version serving is a pointer in Redis (or a file here).",
    )
    model_check_interval_s: NonNegativeFloat = Field(
        default=1.0,
        description="How often a serving process checks, between batches, whether another "
        "model version was promoted (one Redis GET, or a file stat in embedded mode).",
    )

    @property
    def resolved_model_store(self) -> Path:
        """The directory of model versions: ``model_store``, else <data_dir>/models/versions."""
        return (
            self.model_store
            if self.model_store is not None
            else self.data_dir / "models" / "versions"
        )

    # --- distributed mode: Celery, the decisions stream and the HTTP gateway
    broker_url: str | None = Field(
        default=None,
        description="Celery broker (redis://... or amqp://...). Unset: embedded mode, where "
        "the gateway runs the cascade in-process.",
    )
    result_backend: str | None = Field(
        default=None, description="Celery result backend (default: redis_url)."
    )
    bert_queue: str = Field(default="tiergate.bert", description="Queue of BERT-tier tasks.")
    llm_queue: str = Field(default="tiergate.llm", description="Queue of LLM-tier tasks.")
    bert_concurrency: PositiveInt = Field(
        default_factory=lambda: os.cpu_count() or 1,
        description="BERT worker processes per machine (prefork); each gets cores / processes "
        "ONNX Runtime threads.",
    )
    bert_flush_every: PositiveInt = Field(
        default=64, description="A BERT worker runs one batch once this many messages wait."
    )
    bert_flush_interval_s: PositiveFloat = Field(
        default=0.02, description="...or once the oldest waiting message is this old."
    )
    llm_worker_threads: PositiveInt = Field(
        default=32, description="Concurrent LLM requests per LLM worker (thread pool)."
    )
    llm_batch_poll_s: PositiveFloat = Field(
        default=30.0,
        description="LLM workers: seconds between looks for batches due to be sent or ended "
        "(policies with llm.mode: batch).",
    )
    visibility_timeout_s: PositiveInt = Field(
        default=3600,
        description="Redis broker: seconds before an unacknowledged task is redelivered; "
        "longer than the longest task.",
    )
    redeliver_after_s: PositiveFloat = Field(
        default=600.0,
        description="A message accepted through the client or gateway and still unanswered "
        "this long is published again (covers a broker that lost it).",
    )
    task_max_retries: int = Field(
        default=5, ge=0, description="Retries of a task failing transiently before dead-letter."
    )
    decisions_stream: str = Field(
        default="tiergate:decisions", description="Redis Stream every decision is appended to."
    )
    decisions_stream_maxlen: PositiveInt = Field(
        default=1_000_000, description="Approximate cap on the decisions stream's length."
    )
    dead_letters_maxlen: PositiveInt = Field(
        default=100_000, description="Dead letters kept (the oldest go first); all are counted."
    )
    decision_record_ttl_s: PositiveInt = Field(
        default=7 * 24 * 3600,
        description="How long a message id's decision is kept (idempotency window).",
    )
    webhook_secret: SecretStr | None = Field(
        default=None, description="Signs webhook bodies (HMAC-SHA256) when set."
    )
    api_keys: dict[str, list[str]] = Field(
        default_factory=dict,
        description="HTTP API keys: SHA-256 hex of the key -> policies it may use ('*' = "
        "all). Empty: no key required (development only).",
    )
    max_body_bytes: PositiveInt = Field(
        default=1_000_000, description="Largest HTTP request body accepted (413 above)."
    )
    max_text_chars: PositiveInt = Field(
        default=100_000, description="Longest message text accepted (413 above)."
    )
    max_batch_messages: PositiveInt = Field(
        default=256, description="Most messages in one HTTP request."
    )
    request_timeout_s: PositiveFloat = Field(
        default=30.0, description="How long POST /v1/classify waits for decisions."
    )
    gateway_batches_in_flight: PositiveInt = Field(
        default=6,
        description="Embedded gateway: micro-batches classified at once. Their ONNX Runtime "
        "steps take turns at the session, the batch with the least work left first, so a "
        "short message overtakes a long text.",
    )
    gateway_parallel_steps: PositiveInt | None = Field(
        default=None,
        description="Embedded gateway: ONNX Runtime steps run at once, sharing "
        "intra_op_threads. Default: as many as intra_op_threads, single-threaded.",
    )
    gateway_step_tokens: PositiveInt = Field(
        default=128,
        description="Embedded gateway: the most padded tokens in one ONNX Runtime step; a "
        "batch of more waits for its turn again between steps.",
    )
    gateway_batch_window_ms: NonNegativeFloat = Field(
        default=2.0,
        description="Embedded mode: how long the gateway gathers concurrent requests into one "
        "ONNX batch.",
    )

    @property
    def resolved_cache_path(self) -> Path:
        """The embedded SQLite cache file."""
        return self.cache_path if self.cache_path is not None else self.data_dir / "cache.sqlite3"

    @property
    def default_model_dir(self) -> Path:
        """Where ``tiergate model build-default`` writes (and later finds) the default model."""
        return self.data_dir / "models" / "default"
