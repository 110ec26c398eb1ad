"""Policy files: what a user declares about a label set, its thresholds and its LLM tier.

A policy is a YAML file validated by :class:`PolicySpec`. It names itself (``name`` and
``version``; both go into every decision and into the decision-cache key) and holds:

- ``labels``: the label set with a description per label (the LLM's prompt shows them);
- ``multi_label``: one label per message, or independent flags;
- ``escalation``: when the BERT answer does not stand (a minimum calibrated top-1 probability,
  a minimum margin over the runner-up, per-label overrides; for multi-label an uncertainty band
  per label, so only borderline labels go to the LLM);
- ``generation``: labels that always need a generated answer and request tasks that ask for
  generation (``reply``, ``summary``, ``explain``);
- ``llm``: the provider chain tried in order, and the prompt instructions;
- ``cache``: how long a decision is reused;
- ``budget``: LLM calls per minute, money per day, and what happens when either is spent;
- ``learning``: whether decisions are kept as training examples (opt-in) and for how long.

Everything here is pure: loading reads one file, and nothing else touches the outside world.
"""

from __future__ import annotations

from collections.abc import Sequence
from enum import StrEnum
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Self

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    NonNegativeFloat,
    PositiveInt,
    StrictStr,
    ValidationError,
    model_validator,
)

Probability = Annotated[float, Field(ge=0.0, le=1.0)]
LabelName = Annotated[StrictStr, Field(min_length=1, max_length=128, pattern=r"^\S(.*\S)?$")]


class PolicyError(ValueError):
    """A policy file that cannot be used; the message names the file and the field."""


class Task(StrEnum):
    """What a producer asks for: a label, or a label plus generated text."""

    CLASSIFY = "classify"
    REPLY = "reply"
    SUMMARY = "summary"
    EXPLAIN = "explain"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class LabelSpec(_Strict):
    """One label and the description the LLM reads."""

    name: LabelName
    description: Annotated[StrictStr, Field(max_length=2000)] = ""


class Band(_Strict):
    """A multi-label uncertainty band: a probability in ``[low, high)`` is borderline."""

    low: Probability
    high: Probability

    @model_validator(mode="after")
    def _ordered(self) -> Self:
        if self.low > self.high:
            raise ValueError(f"band low {self.low} is above high {self.high}")
        return self

    def contains(self, probability: float) -> bool:
        """Whether ``probability`` is borderline."""
        return self.low <= probability < self.high


class LabelThresholds(_Strict):
    """Per-label overrides of the escalation thresholds (unset fields keep the policy's)."""

    min_probability: Probability | None = None
    min_margin: Probability | None = None
    band: Band | None = None


class Escalation(_Strict):
    """When the BERT answer does not stand.

    Single-label: a message escalates when its calibrated top-1 probability is below
    ``min_probability`` or its margin over the runner-up is below ``min_margin``; the top
    label's entry in ``per_label`` overrides either. Multi-label: a label is flagged when its
    probability is at least ``flag_threshold``, and it is borderline when the probability lies
    in its ``band``; a message escalates when any label is borderline, and only those labels
    are put to the LLM.
    """

    min_probability: Probability = 0.0
    min_margin: Probability = 0.0
    flag_threshold: Probability = 0.5
    band: Band = Band(low=0.5, high=0.5)
    per_label: dict[LabelName, LabelThresholds] = Field(default_factory=dict)

    def min_probability_for(self, label: str) -> float:
        """The top-1 probability threshold that applies when ``label`` is the top label."""
        override = self.per_label.get(label)
        if override is not None and override.min_probability is not None:
            return override.min_probability
        return self.min_probability

    def min_margin_for(self, label: str) -> float:
        """The margin threshold that applies when ``label`` is the top label."""
        override = self.per_label.get(label)
        if override is not None and override.min_margin is not None:
            return override.min_margin
        return self.min_margin

    def band_for(self, label: str) -> Band:
        """The uncertainty band that applies to ``label``."""
        override = self.per_label.get(label)
        if override is not None and override.band is not None:
            return override.band
        return self.band


class Generation(_Strict):
    """Which answers need generated text (and so always go to the LLM)."""

    labels: list[LabelName] = Field(default_factory=list)
    tasks: list[Task] = Field(default_factory=lambda: [Task.REPLY, Task.SUMMARY, Task.EXPLAIN])

    @model_validator(mode="after")
    def _classify_needs_no_text(self) -> Self:
        if Task.CLASSIFY in self.tasks:
            raise ValueError("'classify' asks for a label only and cannot be a generation task")
        return self


class ProviderRef(_Strict):
    """One link of the LLM provider chain.

    ``provider`` names an implementation (``openai`` or ``anthropic``; any OpenAI-compatible
    server is ``openai`` with a ``base_url``). ``base_url`` overrides the provider's default
    endpoint; the API key comes from settings, never from the policy file.
    """

    provider: Annotated[StrictStr, Field(min_length=1)]
    model: Annotated[StrictStr, Field(min_length=1)]
    base_url: StrictStr | None = None


DEFAULT_PROVIDERS: tuple[ProviderRef, ...] = (
    ProviderRef(provider="openai", model="gpt-4o-mini"),
    ProviderRef(provider="anthropic", model="claude-haiku-4-5"),
)
"""The provider chain of the shipped policies, and of a policy that ``tiergate policy init`` or
``tiergate calibrate`` writes when no chain is given: each provider whose key is set is tried in
this order."""


class CallMode(StrEnum):
    """How the LLM is asked: ``online`` (one call per message, answered at once) or ``batch``.

    ``batch``: the messages the policy routes to the LLM are answered first by the BERT tier
    (status ``pending_llm``), then collected and sent through the provider's batch API, at its
    discount, and answered within the provider's completion window (up to 24 hours).
    """

    ONLINE = "online"
    BATCH = "batch"


class OnBatchError(StrEnum):
    """What happens to a request that errored, expired or was cancelled in a batch.

    ``online``: it is asked again at once with an online call. ``next_batch``: it joins the
    next batch.
    """

    ONLINE = "online"
    NEXT_BATCH = "next_batch"


class LLMSpec(_Strict):
    """The LLM tier of this policy: providers tried in order, and what the prompt says.

    ``mode``: online or batch (:class:`CallMode`). In batch mode a batch is sent once
    ``max_batch`` messages wait or the oldest has waited ``max_wait_s`` seconds, and
    ``on_batch_error`` says how its failed requests are retried.
    """

    providers: list[ProviderRef] = Field(default_factory=list)
    instructions: Annotated[StrictStr, Field(max_length=8000)] = ""
    max_output_tokens: PositiveInt = 512
    mode: CallMode = CallMode.ONLINE
    max_wait_s: Annotated[float, Field(gt=0, le=24 * 3600)] = 600.0
    # OpenAI takes at most 50,000 requests per batch (Anthropic 100,000).
    max_batch: Annotated[int, Field(ge=1, le=50_000)] = 2000
    on_batch_error: OnBatchError = OnBatchError.ONLINE


class CacheSpec(_Strict):
    """How long a decision is reused for an identical message (0 disables the cache)."""

    ttl_seconds: Annotated[int, Field(ge=0)] = 7 * 24 * 3600


class WhenExhausted(StrEnum):
    """What happens to a message that needs the LLM once the budget is spent.

    ``bert``: the BERT answer is given, flagged ``budget_exhausted``. ``defer``: no answer yet;
    the decision is marked deferred and the message is tried again later.
    """

    BERT = "bert"
    DEFER = "defer"


class BudgetSpec(_Strict):
    """LLM spending limits of one policy (unset means unlimited)."""

    calls_per_minute: PositiveInt | None = None
    usd_per_day: NonNegativeFloat | None = None
    when_exhausted: WhenExhausted = WhenExhausted.BERT


class WebhookSpec(_Strict):
    """Where a distributed deployment POSTs every decision of this policy, retried on failure.

    The body is the decision JSON; with ``TIERGATE_WEBHOOK_SECRET`` set, the header
    ``X-Tiergate-Signature: sha256=<hex>`` is the HMAC-SHA256 of the body with that secret.
    A 2xx answer is success; anything else is retried with exponential backoff, up to
    ``max_attempts``, then the delivery goes to the dead letters.
    """

    url: Annotated[StrictStr, Field(pattern=r"^https?://\S+$", max_length=2000)]
    timeout_s: Annotated[float, Field(gt=0, le=60)] = 10.0
    max_attempts: Annotated[int, Field(ge=1, le=20)] = 5


class LearningSpec(_Strict):
    """Whether this policy's decisions become training examples, and for how long they are kept.

    ``collect``: keep one example per decision-cache key (the redacted text, the BERT tier's
    scores, the LLM's label and any person's correction), so ``tiergate distill`` can train on
    them; off by default, and nothing is kept for a policy that does not opt in. ``retain_days``:
    how long an example (and the record of which message id it came from) is kept after its
    last label. ``auto_promote``: continuous distillation may promote a candidate on its own
    when the promotion gate passes. ``audit_share``: the share of distinct texts (a fixed draw
    by cache key, :func:`~tiergate.policies.routing.in_audit_sample`) answered by the LLM even
    when the BERT answer would stand, so the labels collected include a uniform sample of the
    traffic: ``tiergate distill`` judges and re-calibrates on it. It costs LLM calls (about
    that share of the messages the BERT tier would keep); it needs ``collect``.
    """

    collect: bool = False
    retain_days: PositiveInt = 30
    auto_promote: bool = False
    audit_share: Annotated[float, Field(ge=0.0, le=1.0)] = 0.0

    @model_validator(mode="after")
    def _audit_needs_collection(self) -> Self:
        if self.audit_share > 0.0 and not self.collect:
            raise ValueError(
                "audit_share: an audit sample is kept as labels, so it needs collect: true"
            )
        return self

    @property
    def retain_seconds(self) -> int:
        """``retain_days`` in seconds."""
        return self.retain_days * 24 * 3600


class PolicySpec(_Strict):
    """A validated policy. See the module docstring for the meaning of each section."""

    name: Annotated[StrictStr, Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9_.-]+$")]
    version: Annotated[StrictStr, Field(min_length=1, max_length=64)]
    description: StrictStr = ""
    multi_label: bool = False
    labels: Annotated[list[LabelSpec], Field(min_length=1)]
    escalation: Escalation = Escalation()
    generation: Generation = Generation()
    llm: LLMSpec = LLMSpec()
    cache: CacheSpec = CacheSpec()
    budget: BudgetSpec = BudgetSpec()
    webhook: WebhookSpec | None = None
    learning: LearningSpec = LearningSpec()

    @model_validator(mode="after")
    def _labels_are_known(self) -> Self:
        names = [label.name for label in self.labels]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"labels listed twice: {duplicates}")
        known = set(names)
        for where, used in (
            ("escalation.per_label", list(self.escalation.per_label)),
            ("generation.labels", self.generation.labels),
        ):
            unknown = sorted(set(used) - known)
            if unknown:
                raise ValueError(f"{where} names labels not in the label set: {unknown}")
        return self

    @property
    def label_names(self) -> tuple[str, ...]:
        """The label set, in file order."""
        return tuple(label.name for label in self.labels)

    @classmethod
    def for_labels(
        cls, labels: tuple[str, ...], *, multi_label: bool, name: str = "default"
    ) -> PolicySpec:
        """A policy that lets every BERT answer stand: for a model that has no policy file."""
        return cls(
            name=name,
            version="0",
            description="The model's labels with no escalation rules.",
            multi_label=multi_label,
            labels=[LabelSpec(name=label) for label in labels],
        )

    def with_escalation(self, escalation: Escalation, version: str) -> PolicySpec:
        """A copy with new escalation rules under a new version (calibration writes these)."""
        return self.model_copy(update={"escalation": escalation, "version": version})

    def with_providers(self, providers: Sequence[ProviderRef]) -> PolicySpec:
        """A copy whose LLM tier tries ``providers``, in order (same name and version)."""
        llm = self.llm.model_copy(update={"providers": list(providers)})
        return self.model_copy(update={"llm": llm})

    def to_yaml(self) -> str:
        """The policy as YAML that :func:`load_policy` reads back to an equal spec."""
        data = self.model_dump(mode="json", exclude_defaults=False)
        return yaml.safe_dump(data, sort_keys=False, allow_unicode=True, width=100)


def parse_policy(data: Any, *, source: str = "policy") -> PolicySpec:
    """Validate already-parsed YAML; errors name ``source`` and the offending field."""
    if not isinstance(data, dict):
        raise PolicyError(f"{source}: a policy must be a mapping, not {type(data).__name__}")
    try:
        return PolicySpec.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"]) or "policy"
        reason = first["msg"].removeprefix("Value error, ")
        more = f" (and {exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
        raise PolicyError(f"{source}: {where}: {reason}{more}") from None


def parse_policy_text(text: str, *, source: str = "policy") -> PolicySpec:
    """Parse and validate a policy from YAML text."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise PolicyError(f"{source}: not valid YAML{where}") from None
    except RecursionError:
        raise PolicyError(f"{source}: not valid YAML: nested too deeply") from None
    except (ValueError, TypeError, AttributeError, LookupError):
        # PyYAML's constructors let these out for a scalar they cannot convert (``!!int x``,
        # ``!!int`` with no value, ``!!bool x``, ``!!timestamp x``, a date out of range, an
        # integer of 5,000 digits).
        raise PolicyError(
            f"{source}: not valid YAML: a value cannot be converted to its type "
            "(a malformed number, boolean, date or timestamp)"
        ) from None
    return parse_policy(data, source=source)


def load_policy(path: Path) -> PolicySpec:
    """Read and validate a policy file."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise PolicyError(f"{path}: no such policy file") from None
    except UnicodeDecodeError:
        raise PolicyError(f"{path}: not UTF-8 text") from None
    except OSError as exc:
        raise PolicyError(f"{path}: cannot be read ({exc.strerror})") from None
    except ValueError:  # a path the OS cannot take, such as one with a NUL byte
        raise PolicyError(f"{str(path)!r}: not a usable file name") from None
    return parse_policy_text(text, source=str(path))


EXAMPLES = ("rotten-tomatoes", "ticket-routing", "moderation")


def example_policy(name: str) -> PolicySpec:
    """One of the policies shipped with tiergate (``EXAMPLES``), by name."""
    if name not in EXAMPLES:
        raise PolicyError(f"no example policy {name!r} (known: {', '.join(EXAMPLES)})")
    resource = resources.files("tiergate.policies").joinpath(f"examples/{name}.yaml")
    return parse_policy_text(resource.read_text(encoding="utf-8"), source=f"example {name}")
