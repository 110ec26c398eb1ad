"""The one interface every LLM provider implements, and the registry that builds them.

A provider turns a :class:`ProviderRequest` (system prompt, user turn, the JSON schema of the
answer) into a :class:`ProviderAnswer` (the parsed answer object, the raw text, token usage)
with one call of its official SDK. Providers know the wire format only: prompts, validation,
fallback and circuit breaking live in :mod:`tiergate.workers.llm.tier`.

Timeouts and retries are the SDKs' own: each client is built with
``timeout=settings.llm_timeout_s`` and ``max_retries=settings.llm_max_retries``, and retries
rate limits, server errors, timeouts and failed connections, waiting what the server's
``Retry-After`` asks or else a short exponential backoff. Left alone, the SDKs would sleep
through long waits (the OpenAI SDK up to two minutes, the Anthropic SDK any wait), so both
clients carry the response hook :func:`no_retry_after_long_waits`: a response asking for more
than :data:`MAX_RETRY_WAIT_S` is not retried. What still fails reaches us as an SDK error, which
:func:`llm_error_from_status` and :func:`llm_error_from_connection` turn into
:mod:`tiergate.workers.errors` classes (a long wait surfaces as a transient error carrying its
``retry_after``, and the tier moves on to the next provider).
"""

from __future__ import annotations

import email.utils
import importlib
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from tiergate.policies.spec import ProviderRef
from tiergate.workers.errors import (
    LLMError,
    PermanentLLMError,
    ProviderNotConfiguredError,
    TransientLLMError,
)
from tiergate.workers.settings import Settings


@dataclass(frozen=True)
class ProviderRequest:
    """What goes over the wire: the prompt and the shape the answer must have.

    ``schema`` is the JSON schema of the answer object and ``schema_name`` its name (a valid
    OpenAI response-format name and Anthropic tool name). ``repair_of`` is set for the one
    repair attempt: the previous raw answer and the validation error it failed with, which the
    provider sends as an assistant turn followed by a user turn naming the error.
    ``cache_key`` turns on the provider's prompt cache for the static prefix (the schema and
    ``system``; see :mod:`tiergate.workers.llm.prompt_cache`): OpenAI sends it as
    ``prompt_cache_key``, Anthropic marks the prefix with ``cache_control`` when it is long
    enough for the model. ``None`` asks for no caching.
    """

    system: str
    user: str
    schema: dict[str, Any]
    schema_name: str
    max_output_tokens: int
    repair_of: tuple[str, str] | None = None
    cache_key: str | None = None


@dataclass(frozen=True)
class ProviderAnswer:
    """What a provider answered, unvalidated.

    ``data`` is the answer object parsed from the model's output, or ``None`` when the output
    was not a JSON object; ``raw`` is the output as received (text, or the tool arguments as
    JSON). ``refusal`` holds the provider's refusal text when the model refused; ``truncated``
    is true when the output was cut off at ``max_output_tokens`` (OpenAI ``finish_reason:
    "length"``, Anthropic ``stop_reason: "max_tokens"``). Token counts are the provider's own:
    ``input_tokens`` counts every input token, of which ``cached_input_tokens`` were read from
    the prompt cache and ``cache_write_tokens`` written to it.
    """

    data: dict[str, Any] | None
    raw: str
    input_tokens: int
    output_tokens: int
    model: str
    refusal: str | None = None
    truncated: bool = False
    cached_input_tokens: int = 0
    cache_write_tokens: int = 0


class Provider(Protocol):
    """One LLM behind one SDK client.

    ``complete`` sends one request (the SDK may retry it internally) and returns the answer,
    or raises :class:`~tiergate.workers.errors.TransientLLMError` (rate limited, server error,
    timeout, connection failure: worth trying later or elsewhere) or
    :class:`~tiergate.workers.errors.PermanentLLMError` (the request or the credentials are wrong).
    It is called from several threads at once.
    """

    name: str
    model: str

    def complete(self, request: ProviderRequest) -> ProviderAnswer:
        """Send ``request`` and return the provider's answer; see the class docstring."""
        ...


class ProviderClass(Protocol):
    """What the registry needs of a provider implementation: its settings and a constructor.

    ``api_key_setting`` and ``base_url_setting`` name the :class:`Settings` fields that hold
    the provider's API key and default endpoint.
    """

    api_key_setting: str
    base_url_setting: str

    def __call__(
        self,
        model: str,
        *,
        api_key: str,
        base_url: str | None,
        timeout_s: float,
        max_retries: int,
    ) -> Provider:
        """Build a provider for ``model`` with one SDK client."""
        ...


# Implementations are imported only when a policy names them, so an install that never uses
# Anthropic never imports its SDK.
PROVIDERS: dict[str, str] = {
    "openai": "tiergate.workers.llm.openai_provider:OpenAIProvider",
    "anthropic": "tiergate.workers.llm.anthropic_provider:AnthropicProvider",
}


def provider_class(name: str) -> ProviderClass:
    """The implementation registered as ``name``.

    Raises:
        ProviderNotConfiguredError: ``name`` is not in :data:`PROVIDERS` (the message lists
            the known names).
    """
    target = PROVIDERS.get(name)
    if target is None:
        known = ", ".join(sorted(PROVIDERS))
        raise ProviderNotConfiguredError(name, f"unknown provider (known: {known})")
    module_name, _, class_name = target.partition(":")
    implementation: ProviderClass = getattr(importlib.import_module(module_name), class_name)
    return implementation


def api_key_variable(setting: str) -> str:
    """The environment variable that sets the :class:`Settings` field ``setting``."""
    return f"TIERGATE_{setting.upper()}"


def build_provider(ref: ProviderRef, settings: Settings) -> Provider:
    """Build the provider ``ref`` names, with its key, endpoint, timeout and retries.

    The endpoint is ``ref.base_url``, else the provider's ``*_base_url`` setting, else the
    SDK's default. A key is always required (for a keyless local server, set any string).

    Raises:
        ProviderNotConfiguredError: the provider name is unknown, or its API key is not set
            (the message names the environment variable to set).
    """
    implementation = provider_class(ref.provider)
    secret = getattr(settings, implementation.api_key_setting)
    api_key = secret.get_secret_value() if secret is not None else ""
    if not api_key:
        variable = api_key_variable(implementation.api_key_setting)
        raise ProviderNotConfiguredError(ref.provider, f"no API key: set {variable}")
    base_url = ref.base_url or getattr(settings, implementation.base_url_setting)
    return implementation(
        ref.model,
        api_key=api_key,
        base_url=base_url,
        timeout_s=settings.llm_timeout_s,
        max_retries=settings.llm_max_retries,
    )


# The longest Retry-After an SDK may sleep through before retrying; a longer wait would park a
# worker thread, so such a response is not retried.
MAX_RETRY_WAIT_S = 60.0


def no_retry_after_long_waits(response: Any) -> None:
    """SDK response hook: mark a response asking for a wait over the bound as not to be retried.

    Both SDKs obey the ``x-should-retry`` response header; ``response`` is their HTTP
    client's response, whose headers the hook may change before the SDK reads them.
    """
    wait = retry_after_seconds(response.headers)
    if wait is not None and wait > MAX_RETRY_WAIT_S:
        response.headers["x-should-retry"] = "false"


# The statuses the SDKs themselves retry: request timeout, lock conflict, rate limit, 5xx.
_TRANSIENT_STATUSES = frozenset({408, 409, 429})


def retry_after_seconds(headers: Mapping[str, str]) -> float | None:
    """Seconds the server asked us to wait, from ``retry-after-ms`` or ``Retry-After``.

    ``Retry-After`` may be a number of seconds or an HTTP date; ``None`` when neither header
    is present or readable. ``headers`` is looked up case-insensitively by the SDKs' header
    mappings; lower-case names are used here.
    """
    milliseconds = headers.get("retry-after-ms")
    if milliseconds is not None:
        try:
            value = float(milliseconds) / 1000.0
        except ValueError:
            pass
        else:
            if math.isfinite(value) and value >= 0:
                return value
    header = headers.get("retry-after")
    if header is None:
        return None
    try:
        value = float(header)
    except ValueError:
        parsed = email.utils.parsedate_tz(header)
        if parsed is None:
            return None
        return max(0.0, email.utils.mktime_tz(parsed) - time.time())
    return value if math.isfinite(value) and value >= 0 else None


def llm_error_from_status(
    provider: str, status_code: int, headers: Mapping[str, str], message: str
) -> LLMError:
    """The tiergate error for an HTTP error status the SDK gave up on.

    408, 409, 429 and 5xx are transient (with ``retry_after`` from the response headers);
    every other status (400, 401, 403, 404, 422, ...) is permanent.
    """
    if status_code in _TRANSIENT_STATUSES or status_code >= 500:
        return TransientLLMError(
            provider, message, status_code=status_code, retry_after=retry_after_seconds(headers)
        )
    return PermanentLLMError(provider, message, status_code=status_code)


def llm_error_from_connection(provider: str, *, timed_out: bool) -> TransientLLMError:
    """The tiergate error for a timeout or a failed connection (after the SDK's retries)."""
    reason = "request timed out" if timed_out else "connection failed"
    return TransientLLMError(provider, reason)
