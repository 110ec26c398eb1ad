"""The providers' batch APIs: send many requests as one batch, read the answers hours later.

:class:`BatchAPI` is the one interface; :func:`batch_api` gives the implementation for a
provider built by :func:`~tiergate.workers.llm.provider.build_provider` (it reuses that
provider's SDK client and its request parameters, so a batched request is byte for byte the
online one):

- OpenAI (:class:`OpenAIBatchAPI`): the requests as a JSONL file (``files.create(purpose=
  "batch")``), then ``batches.create`` on ``/v1/chat/completions`` with a 24-hour window; the
  answers are the batch's output file, the failures its error file.
- Anthropic (:class:`AnthropicBatchAPI`): ``messages.batches.create``; the answers are
  ``messages.batches.results``.

Each request carries a custom id chosen by the caller. A batch carries the caller's ``tag``
(OpenAI: in its metadata), so a caller that died between sending a batch and recording its id
can find it again (:meth:`BatchAPI.find`) instead of sending it twice. SDK errors become
:mod:`tiergate.workers.errors` classes, as in the online providers.
"""

from __future__ import annotations

import contextlib
import io
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any, Protocol

from tiergate.workers.errors import ProviderNotConfiguredError
from tiergate.workers.llm.provider import (
    Provider,
    ProviderAnswer,
    ProviderRequest,
    llm_error_from_connection,
    llm_error_from_status,
)

if TYPE_CHECKING:
    from tiergate.workers.llm.anthropic_provider import AnthropicProvider
    from tiergate.workers.llm.openai_provider import OpenAIProvider

# The metadata key of an OpenAI batch that holds the caller's tag.
TAG_METADATA_KEY = "tiergate_batch"

# How many of the provider's most recent batches :meth:`BatchAPI.find` looks through.
_FIND_LIMIT = 200


@dataclass(frozen=True)
class BatchStatus:
    """Where a batch is: ``ended`` once its results can be read; ``status`` the provider's word."""

    ended: bool
    status: str


@dataclass(frozen=True)
class RequestOutcome:
    """One request's outcome in an ended batch: its ``answer``, or why there is none.

    ``failure`` is ``errored`` (the provider failed the request), ``expired`` (not run within
    the window), ``canceled`` (the batch was cancelled first) or ``missing`` (no line for it).
    """

    answer: ProviderAnswer | None = None
    failure: str | None = None
    detail: str = ""


class BatchAPI(Protocol):
    """One provider's batch API, for one model.

    Methods raise :class:`~tiergate.workers.errors.TransientLLMError` (worth trying again
    later) or :class:`~tiergate.workers.errors.PermanentLLMError`, like ``Provider.complete``.
    """

    name: str
    model: str

    def submit(self, requests: Sequence[tuple[str, ProviderRequest]], tag: str) -> str:
        """Send ``(custom id, request)`` pairs as one batch tagged ``tag``; its provider id."""
        ...

    def find(self, tag: str, created_after: float, count: int) -> str | None:
        """The id of a batch sent before with ``tag`` (``None``: none was created).

        ``created_after`` (epoch seconds, a little before the submission began) and ``count``
        (its number of requests) identify it where the provider keeps no tag (Anthropic).
        """
        ...

    def status(self, batch_id: str) -> BatchStatus:
        """Whether the batch ended, and the provider's status word."""
        ...

    def results(self, batch_id: str, schema_name: str) -> dict[str, RequestOutcome]:
        """Every request's outcome in an ended batch, by custom id."""
        ...

    def cancel(self, batch_id: str) -> None:
        """Ask the provider to cancel the batch; it ends soon after, unrun requests canceled."""
        ...


def batch_api(provider: Provider) -> BatchAPI:
    """The batch API behind ``provider`` (an OpenAI or Anthropic provider).

    Raises:
        ProviderNotConfiguredError: the provider has no batch API that tiergate speaks.
    """
    from tiergate.workers.llm.anthropic_provider import AnthropicProvider  # noqa: PLC0415
    from tiergate.workers.llm.openai_provider import OpenAIProvider  # noqa: PLC0415

    if isinstance(provider, OpenAIProvider):
        return OpenAIBatchAPI(provider)
    if isinstance(provider, AnthropicProvider):
        return AnthropicBatchAPI(provider)
    raise ProviderNotConfiguredError(provider.name, "no batch API for this provider")


@contextlib.contextmanager
def _sdk_errors(name: str) -> Iterator[None]:
    """Turn either SDK's errors into tiergate's transient and permanent LLM errors."""
    import anthropic  # noqa: PLC0415
    import openai  # noqa: PLC0415

    try:
        yield
    except (openai.APITimeoutError, anthropic.APITimeoutError) as exc:
        raise llm_error_from_connection(name, timed_out=True) from exc
    except (openai.APIConnectionError, anthropic.APIConnectionError) as exc:
        raise llm_error_from_connection(name, timed_out=False) from exc
    except (openai.APIStatusError, anthropic.APIStatusError) as exc:
        raise llm_error_from_status(
            name, exc.status_code, exc.response.headers, exc.message
        ) from exc


class OpenAIBatchAPI:
    """OpenAI's Batch API over Chat Completions, through the provider's SDK client."""

    def __init__(self, provider: OpenAIProvider) -> None:
        self.provider = provider
        self.name = provider.name
        self.model = provider.model
        self._client = provider.client

    def submit(self, requests: Sequence[tuple[str, ProviderRequest]], tag: str) -> str:
        """See :meth:`BatchAPI.submit`: upload the JSONL, then create the batch."""
        lines = "".join(
            json.dumps(
                {
                    "custom_id": custom_id,
                    "method": "POST",
                    "url": "/v1/chat/completions",
                    "body": self.provider.request_params(request),
                }
            )
            + "\n"
            for custom_id, request in requests
        )
        with _sdk_errors(self.name):
            uploaded = self._client.files.create(
                file=(f"tiergate-{tag}.jsonl", io.BytesIO(lines.encode())), purpose="batch"
            )
            batch = self._client.batches.create(
                input_file_id=uploaded.id,
                endpoint="/v1/chat/completions",
                completion_window="24h",
                metadata={TAG_METADATA_KEY: tag},
            )
        return batch.id

    def find(self, tag: str, created_after: float, count: int) -> str | None:
        """See :meth:`BatchAPI.find`: the batch whose metadata holds ``tag``."""
        del created_after, count  # OpenAI keeps the tag itself
        with _sdk_errors(self.name):
            for seen, batch in enumerate(self._client.batches.list(limit=100)):
                if (batch.metadata or {}).get(TAG_METADATA_KEY) == tag:
                    return batch.id
                if seen >= _FIND_LIMIT:
                    break
        return None

    def status(self, batch_id: str) -> BatchStatus:
        """See :meth:`BatchAPI.status`."""
        with _sdk_errors(self.name):
            batch = self._client.batches.retrieve(batch_id)
        return BatchStatus(
            ended=batch.status in {"completed", "failed", "expired", "cancelled"},
            status=batch.status,
        )

    def results(self, batch_id: str, schema_name: str) -> dict[str, RequestOutcome]:
        """See :meth:`BatchAPI.results`: the output file's answers, the error file's failures."""
        from tiergate.workers.llm.openai_provider import answer_of_completion  # noqa: PLC0415

        del schema_name  # the answer is the message content, whatever the schema's name
        with _sdk_errors(self.name):
            batch = self._client.batches.retrieve(batch_id)
            files = [f for f in (batch.output_file_id, batch.error_file_id) if f]
            texts = [self._client.files.content(file_id).text for file_id in files]
        outcomes: dict[str, RequestOutcome] = {}
        for text in texts:
            for line in text.splitlines():
                if line.strip():
                    custom_id, outcome = _openai_outcome(json.loads(line), answer_of_completion)
                    outcomes[custom_id] = outcome
        return outcomes

    def cancel(self, batch_id: str) -> None:
        """See :meth:`BatchAPI.cancel`."""
        with _sdk_errors(self.name):
            self._client.batches.cancel(batch_id)


def _openai_outcome(line: dict[str, Any], parse: Any) -> tuple[str, RequestOutcome]:
    """One line of an OpenAI output or error file as ``(custom id, outcome)``."""
    from openai.types.chat import ChatCompletion  # noqa: PLC0415

    custom_id = str(line.get("custom_id"))
    error = line.get("error")
    if isinstance(error, dict):
        code = str(error.get("code") or "")
        failure = {"batch_expired": "expired", "batch_cancelled": "canceled"}.get(code, "errored")
        return custom_id, RequestOutcome(failure=failure, detail=str(error.get("message", "")))
    response = line.get("response") or {}
    if response.get("status_code") != 200:
        detail = json.dumps(response.get("body"))[:500]
        return custom_id, RequestOutcome(
            failure="errored", detail=f"status {response.get('status_code')}: {detail}"
        )
    completion = ChatCompletion.model_validate(response["body"])
    return custom_id, RequestOutcome(answer=parse(completion, ""))


class AnthropicBatchAPI:
    """Anthropic's Message Batches API, through the provider's SDK client."""

    def __init__(self, provider: AnthropicProvider) -> None:
        self.provider = provider
        self.name = provider.name
        self.model = provider.model
        self._batches = provider.client.messages.batches

    def submit(self, requests: Sequence[tuple[str, ProviderRequest]], tag: str) -> str:
        """See :meth:`BatchAPI.submit` (Anthropic keeps no tag: see :meth:`find`)."""
        del tag
        batch_requests: list[Any] = [
            {"custom_id": custom_id, "params": self.provider.request_params(request)}
            for custom_id, request in requests
        ]
        with _sdk_errors(self.name):
            return self._batches.create(requests=batch_requests).id

    def find(self, tag: str, created_after: float, count: int) -> str | None:
        """See :meth:`BatchAPI.find`: the oldest batch created since, with ``count`` requests.

        Sound because a caller sends at most one batch per model at a time and records each
        batch's id before sending the next (:mod:`tiergate.workers.batches`).
        """
        del tag
        found = None
        with _sdk_errors(self.name):
            for seen, batch in enumerate(self._batches.list(limit=100)):
                counts = batch.request_counts
                total = (
                    counts.processing
                    + counts.succeeded
                    + counts.errored
                    + counts.canceled
                    + counts.expired
                )
                if _epoch(batch.created_at) >= created_after and total == count:
                    found = batch.id  # newest first: keep going to the oldest match
                if seen >= _FIND_LIMIT:
                    break
        return found

    def status(self, batch_id: str) -> BatchStatus:
        """See :meth:`BatchAPI.status`."""
        with _sdk_errors(self.name):
            batch = self._batches.retrieve(batch_id)
        return BatchStatus(ended=batch.processing_status == "ended", status=batch.processing_status)

    def results(self, batch_id: str, schema_name: str) -> dict[str, RequestOutcome]:
        """See :meth:`BatchAPI.results`."""
        from tiergate.workers.llm.anthropic_provider import answer_of_message  # noqa: PLC0415

        outcomes: dict[str, RequestOutcome] = {}
        with _sdk_errors(self.name):
            for line in self._batches.results(batch_id):
                result = line.result
                if result.type == "succeeded":
                    answer = answer_of_message(result.message, schema_name)
                    outcomes[line.custom_id] = RequestOutcome(answer=answer)
                elif result.type == "errored":
                    detail = result.error.error.message if result.error.error else ""
                    outcomes[line.custom_id] = RequestOutcome(failure="errored", detail=detail)
                else:
                    outcomes[line.custom_id] = RequestOutcome(failure=result.type)
        return outcomes

    def cancel(self, batch_id: str) -> None:
        """See :meth:`BatchAPI.cancel`."""
        with _sdk_errors(self.name):
            self._batches.cancel(batch_id)


def _epoch(at: datetime) -> float:
    return at.timestamp()
