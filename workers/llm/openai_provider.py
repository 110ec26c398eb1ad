"""The ``openai`` provider: Chat Completions with a strict JSON-schema response format.

Also serves any OpenAI-compatible server (vLLM, Ollama, llama.cpp) through ``base_url``.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

import openai

from tiergate.workers.llm.prompt import repair_instruction
from tiergate.workers.llm.provider import (
    ProviderAnswer,
    ProviderRequest,
    llm_error_from_connection,
    llm_error_from_status,
    no_retry_after_long_waits,
)

if TYPE_CHECKING:
    from openai.types.chat import ChatCompletion, ChatCompletionMessageParam


class OpenAIProvider:
    """One OpenAI (or compatible) model behind one thread-safe SDK client.

    The client is built once, with the given timeout and retry count (the SDK backs off and
    honours a ``Retry-After`` of at most a minute between retries; see
    :mod:`tiergate.workers.llm.provider`). ``complete`` asks for
    ``response_format={"type": "json_schema", ..., "strict": True}`` and parses
    ``choices[0].message.content`` as JSON; ``message.refusal`` becomes the refusal and
    ``finish_reason == "length"`` marks the answer truncated. The static prefix (schema and
    system prompt) comes first, so OpenAI's automatic prompt cache can serve it; with a
    ``cache_key`` the request carries it as ``prompt_cache_key``, and the usage's
    ``prompt_tokens_details.cached_tokens`` says how many input tokens the cache served.
    """

    name = "openai"
    api_key_setting = "openai_api_key"
    base_url_setting = "openai_base_url"

    def __init__(
        self,
        model: str,
        *,
        api_key: str,
        base_url: str | None = None,
        timeout_s: float = 30.0,
        max_retries: int = 2,
    ) -> None:
        self.model = model
        self.base_url = base_url
        self._client = openai.OpenAI(
            api_key=api_key,
            http_client=openai.DefaultHttpxClient(
                event_hooks={"response": [no_retry_after_long_waits]}
            ),
            # None would let the SDK read OPENAI_BASE_URL; tiergate's settings decide instead.
            base_url=base_url or "https://api.openai.com/v1",
            timeout=timeout_s,
            max_retries=max_retries,
        )
        # Resolve the lazily created resource now, so threads never race to create it.
        self._completions = self._client.chat.completions

    def __repr__(self) -> str:
        return f"OpenAIProvider(model={self.model!r}, base_url={self.base_url!r})"

    def complete(self, request: ProviderRequest) -> ProviderAnswer:
        """Send ``request`` as one chat completion; see the class docstring."""
        try:
            completion = self._completions.create(**self.request_params(request))
        except openai.APITimeoutError as exc:
            raise llm_error_from_connection(self.name, timed_out=True) from exc
        except openai.APIConnectionError as exc:
            raise llm_error_from_connection(self.name, timed_out=False) from exc
        except openai.APIStatusError as exc:
            raise llm_error_from_status(
                self.name, exc.status_code, exc.response.headers, exc.message
            ) from exc
        return answer_of_completion(completion, self.model)

    @property
    def client(self) -> openai.OpenAI:
        """The SDK client (the batch API uses it too; see :mod:`tiergate.workers.llm.batch_api`)."""
        return self._client

    def request_params(self, request: ProviderRequest) -> dict[str, Any]:
        """The Chat Completions parameters for ``request`` (also a batch line's ``body``)."""
        messages: list[ChatCompletionMessageParam] = [
            {"role": "system", "content": request.system},
            {"role": "user", "content": request.user},
        ]
        if request.repair_of is not None:
            previous, error = request.repair_of
            messages.append({"role": "assistant", "content": previous or "(empty answer)"})
            messages.append({"role": "user", "content": repair_instruction(error)})
        params: dict[str, Any] = {
            "model": self.model,
            "messages": messages,
            "max_completion_tokens": request.max_output_tokens,
            "response_format": {
                "type": "json_schema",
                "json_schema": {
                    "name": request.schema_name,
                    "schema": request.schema,
                    "strict": True,
                },
            },
        }
        if request.cache_key is not None:
            params["prompt_cache_key"] = request.cache_key
        return params


def answer_of_completion(completion: ChatCompletion, model: str) -> ProviderAnswer:
    """The :class:`ProviderAnswer` in a chat completion (``model`` when it names none)."""
    usage = completion.usage
    input_tokens = usage.prompt_tokens if usage is not None else 0
    output_tokens = usage.completion_tokens if usage is not None else 0
    details = usage.prompt_tokens_details if usage is not None else None
    cached_tokens = (details.cached_tokens or 0) if details is not None else 0
    choice = completion.choices[0] if completion.choices else None
    message = choice.message if choice is not None else None
    raw = (message.content if message is not None else None) or ""
    return ProviderAnswer(
        data=_json_object(raw),
        raw=raw,
        input_tokens=input_tokens,
        output_tokens=output_tokens,
        cached_input_tokens=cached_tokens,
        model=completion.model or model,
        refusal=message.refusal if message is not None else None,
        truncated=choice is not None and choice.finish_reason == "length",
    )


def _json_object(raw: str) -> dict[str, Any] | None:
    """``raw`` parsed as a JSON object, or ``None`` when it is not one."""
    try:
        value = json.loads(raw)
    except (ValueError, RecursionError):  # malformed, or nested past the interpreter's stack
        return None
    return value if isinstance(value, dict) else None
