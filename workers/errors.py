"""Errors raised by tiergate's workers.

The hierarchy::

    TiergateError
    ├── InputError                  bad input from a user: HTTP 4xx, CLI exit code 2
    │   ├── RecordError             one record of a file is bad (carries its line number)
    │   ├── DataFileError           a whole input file is unusable (missing column, unreadable)
    │   ├── UnknownPolicyError      a message names a policy that is not loaded
    │   ├── UnknownDecisionError    feedback names a message id no collected decision has
    │   ├── LabelNotInPolicyError   feedback gives a label outside the decision's policy
    │   └── NotEnoughLabelsError    too few collected labels to distill and evaluate a model
    ├── ModelError                  the model directory cannot be used
    │   ├── ModelNotFoundError      no model directory, or a file missing from it
    │   └── ModelIntegrityError     a corrupt manifest or a file whose hash does not match
    ├── ModelVersionError           an unknown model version, or a switch that cannot be made
    │   └── PromotionRefusedError   the candidate failed the promotion gate (carries the reasons)
    ├── LLMError                    no usable answer (provider, status_code, retry_after, usage)
    │   ├── TransientLLMError       429, 5xx, timeouts, connection errors (also TransientError)
    │   │   └── BreakerOpenError    the provider's circuit breaker is open; no call was made
    │   └── PermanentLLMError       retrying the same request will not help
    │       ├── ProviderNotConfiguredError  unknown provider name or no API key
    │       ├── InvalidAnswerError  the answer failed validation, also after one repair attempt
    │       └── RefusalError        the model refused to answer
    └── TransientError              may go away on its own: the same work can be tried again
        ├── TransientLLMError       (above)
        ├── CoordinationError       Redis, the cache, single-flight or budget store failed
        │   └── SingleFlightTimeout another worker's LLM call did not finish in time
        └── PoliciesNotAnnouncedError  no BERT worker has said which policies it serves yet

Retrying code reads one split: a ``TransientError`` is tried again later (a worker republishes
its task with backoff; the HTTP gateway answers 503), any other error is final for that work.
Errors keep their constructor arguments in ``args``, so they copy and pickle like built-in ones.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tiergate.workers.schemas import LLMUsage


class TiergateError(Exception):
    """Base class of every error tiergate raises on purpose."""


class InputError(TiergateError):
    """Input that tiergate cannot accept; the message names the problem."""


class RecordError(InputError):
    """One record of an input file is invalid.

    Attributes:
        line: the 1-based line number where the record starts.
        reason: what is wrong with it.
    """

    def __init__(self, line: int, reason: str) -> None:
        super().__init__(line, reason)
        self.line = line
        self.reason = reason

    def __str__(self) -> str:
        return f"line {self.line}: {self.reason}"


class DataFileError(InputError):
    """An input file as a whole cannot be read (missing, unreadable, lacking a column)."""


class ModelError(TiergateError):
    """The model directory cannot be used."""

    def __init__(self, path: Path | str, reason: str) -> None:
        super().__init__(str(path), reason)
        self.path = str(path)
        self.reason = reason

    def __str__(self) -> str:
        return f"model at {self.path}: {self.reason}"


class ModelNotFoundError(ModelError):
    """The model directory or one of its files does not exist."""


class ModelIntegrityError(ModelError):
    """The manifest is corrupt or a file does not match the hash the manifest records."""


class ModelVersionError(TiergateError):
    """A model version is unknown, or a promotion, rollback or shadow cannot be made."""


class PromotionRefusedError(ModelVersionError):
    """The candidate failed the promotion gate; ``reasons`` says why (``--force`` overrides)."""

    def __init__(self, version: str, reasons: list[str]) -> None:
        super().__init__(version, reasons)
        self.version = version
        self.reasons = reasons

    def __str__(self) -> str:
        return (
            f"model version {self.version!r} is not promoted: {'; '.join(self.reasons)} "
            "(--force promotes it anyway, and is logged)"
        )


class TransientError(TiergateError):
    """An error that may go away on its own; the same work can be retried later."""


class UnknownPolicyError(InputError):
    """A message names a policy that this process has not loaded."""

    def __init__(self, name: str, known: tuple[str, ...]) -> None:
        super().__init__(name, known)
        self.name = name
        self.known = known

    def __str__(self) -> str:
        return f"unknown policy {self.name!r} (loaded: {', '.join(self.known) or 'none'})"


class UnknownDecisionError(InputError):
    """Feedback names a message id with no collected decision.

    Never seen, expired, or decided under a policy that does not collect labels.
    """

    def __init__(self, message_id: str) -> None:
        super().__init__(message_id)
        self.message_id = message_id

    def __str__(self) -> str:
        return (
            f"no collected decision for message id {self.message_id!r} (unknown, expired, or "
            "its policy does not collect labels)"
        )


class LabelNotInPolicyError(InputError):
    """Feedback gives labels that the decision's policy cannot take (unknown, or not one)."""

    def __init__(self, policy: str, reason: str) -> None:
        super().__init__(policy, reason)
        self.policy = policy
        self.reason = reason

    def __str__(self) -> str:
        return f"policy {self.policy!r}: {self.reason}"


class NotEnoughLabelsError(InputError):
    """Too few collected labels of a policy to distill a model and evaluate it on the newest."""

    def __init__(self, policy: str, have: int, need: int) -> None:
        super().__init__(policy, have, need)
        self.policy = policy
        self.have = have
        self.need = need

    def __str__(self) -> str:
        return (
            f"policy {self.policy!r} has {self.have} usable collected label"
            f"{'' if self.have == 1 else 's'}; distillation needs at least {self.need} "
            "(to train on the older ones and evaluate on the newest)"
        )


class LLMError(TiergateError):
    """An LLM provider gave no usable answer.

    Attributes:
        provider: the provider's name (``openai``, ``anthropic``).
        reason: what went wrong, in words.
        status_code: the HTTP status of the failed call, when there was one.
        retry_after: seconds the provider asked us to wait (``Retry-After``), when it did.
        usage: what the calls made for the failed answer cost (attempts, tokens, dollars),
            set by the LLM tier on the errors it raises; ``None`` when no call was made.
    """

    usage: LLMUsage | None = None

    def __init__(
        self,
        provider: str,
        reason: str,
        status_code: int | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(provider, reason, status_code, retry_after)
        self.provider = provider
        self.reason = reason
        self.status_code = status_code
        self.retry_after = retry_after

    def __str__(self) -> str:
        status = f" (HTTP {self.status_code})" if self.status_code is not None else ""
        return f"{self.provider}: {self.reason}{status}"


class TransientLLMError(LLMError, TransientError):
    """A failure worth retrying later: rate limited, server error, timeout, connection."""


class BreakerOpenError(TransientLLMError):
    """The provider's circuit breaker is open, so no call was made."""


class PermanentLLMError(LLMError):
    """A failure that retrying the same request will not fix."""


class ProviderNotConfiguredError(PermanentLLMError):
    """An unknown provider name, or a provider whose API key is not set."""


class InvalidAnswerError(PermanentLLMError):
    """The LLM's answer failed validation, and so did its one repair attempt."""


class RefusalError(PermanentLLMError):
    """The LLM refused to answer."""


class CoordinationError(TransientError):
    """The shared store behind the decision cache, single-flight or budgets failed."""


class SingleFlightTimeout(CoordinationError):  # noqa: N818 -- reads as the event it reports
    """Waiting for another worker's LLM answer to the same message timed out."""


class PoliciesNotAnnouncedError(TransientError):
    """A process that loads no model asked which policies the workers serve before any said."""
