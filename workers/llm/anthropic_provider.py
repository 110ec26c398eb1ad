"""The ``anthropic`` provider: the Messages API with one forced tool whose input is the answer."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

import anthropic

from tiergate.workers.llm.prompt import repair_instruction
from tiergate.workers.llm.prompt_cache import anthropic_prefix_cacheable
from tiergate.workers.llm.provider import (
    ProviderAnswer,
    ProviderRequest,
    llm_error_from_connection,
    llm_error_from_status,
    no_retry_after_long_waits,
)

if TYPE_CHECKING:
    from anthropic.types import Message, MessageParam, TextBlockParam, ToolParam


class AnthropicProvider:
    """One Anthropic model behind one thread-safe SDK client.

    The client is built once, with the given timeout and retry count (the SDK backs off and
    honours a ``Retry-After`` of at most a minute between retries; see
    :mod:`tiergate.workers.llm.provider`). ``complete`` offers a single tool named
    ``request.schema_name`` whose ``input_schema`` is the answer schema and forces it with
    ``tool_choice``; the answer is that ``tool_use`` block's ``input`` (``data`` is ``None``
    without one). ``stop_reason == "refusal"`` is a refusal and ``"max_tokens"`` a truncated
    answer. With a ``cache_key``, the static prefix (the tool, then the system prompt) ends in
    a ``cache_control`` breakpoint when it may be long enough for the model to cache
    (:func:`~tiergate.workers.llm.prompt_cache.anthropic_prefix_cacheable`); the usage's
    ``cache_read_input_tokens`` and ``cache_creation_input_tokens`` say what the cache served
    and stored.
    """

    name = "anthropic"
    api_key_setting = "anthropic_api_key"
    base_url_setting = "anthropic_base_url"

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
        self._client = anthropic.Anthropic(
            api_key=api_key,
            http_client=anthropic.DefaultHttpxClient(
                event_hooks={"response": [no_retry_after_long_waits]}
            ),
            # None would let the SDK read ANTHROPIC_BASE_URL; tiergate's settings decide instead.
            base_url=base_url or "https://api.anthropic.com",
            timeout=timeout_s,
            max_retries=max_retries,
        )
        # Resolve the lazily created resource now, so threads never race to create it.
        self._messages = self._client.messages

    def __repr__(self) -> str:
        return f"AnthropicProvider(model={self.model!r}, base_url={self.base_url!r})"

    def complete(self, request: ProviderRequest) -> ProviderAnswer:
        """Send ``request`` as one Messages API call; see the class docstring."""
        try:
            response = self._messages.create(**self.request_params(request))
        except anthropic.APITimeoutError as exc:
            raise llm_error_from_connection(self.name, timed_out=True) from exc
        except anthropic.APIConnectionError as exc:
            raise llm_error_from_connection(self.name, timed_out=False) from exc
        except anthropic.APIStatusError as exc:
            raise llm_error_from_status(
                self.name, exc.status_code, exc.response.headers, exc.message
            ) from exc
        return answer_of_message(response, request.schema_name)

    @property
    def client(self) -> anthropic.Anthropic:
        """The SDK client (the batch API uses it too; see :mod:`tiergate.workers.llm.batch_api`)."""
        return self._client

    def request_params(self, request: ProviderRequest) -> dict[str, Any]:
        """The Messages API parameters for ``request`` (also a batch request's ``params``)."""
        messages: list[MessageParam] = [{"role": "user", "content": request.user}]
        if request.repair_of is not None:
            previous, error = request.repair_of
            messages.append({"role": "assistant", "content": previous or "(empty answer)"})
            messages.append({"role": "user", "content": repair_instruction(error)})
        tool: ToolParam = {
            "name": request.schema_name,
            "description": "Record the answer about the message.",
            "input_schema": request.schema,
        }
        return {
            "model": self.model,
            "max_tokens": request.max_output_tokens,
            "system": self._system(request, tool),
            "messages": messages,
            "tools": [tool],
            "tool_choice": {"type": "tool", "name": request.schema_name},
        }

    def _system(self, request: ProviderRequest, tool: ToolParam) -> str | list[TextBlockParam]:
        """The system prompt, as one text block ending the cached prefix when it is marked.

        The prefix Anthropic caches runs from the tool definition through the marked block, so
        its length is the tool's JSON and the system prompt together.
        """
        if request.cache_key is None:
            return request.system
        prefix_chars = len(json.dumps(tool)) + len(request.system)
        if not anthropic_prefix_cacheable(self.model, prefix_chars):
            return request.system
        return [{"type": "text", "text": request.system, "cache_control": {"type": "ephemeral"}}]


def answer_of_message(response: Message, tool_name: str) -> ProviderAnswer:
    """The :class:`ProviderAnswer` in a Messages API response."""
    data = None
    texts: list[str] = []
    for block in response.content:
        if block.type == "tool_use" and block.name == tool_name and data is None:
            data = dict(block.input)
        elif block.type == "text":
            texts.append(block.text)
    raw = json.dumps(data, ensure_ascii=False) if data is not None else "".join(texts)
    refusal = None
    if response.stop_reason == "refusal":
        details = response.stop_details
        explanation = details.explanation if details is not None else None
        refusal = "".join(texts) or explanation or "the model declined to answer"
    usage = response.usage
    cache_read = usage.cache_read_input_tokens or 0
    cache_write = usage.cache_creation_input_tokens or 0
    return ProviderAnswer(
        data=data,
        raw=raw,
        # Anthropic's input_tokens leaves out the tokens read from or written to the cache.
        input_tokens=usage.input_tokens + cache_read + cache_write,
        cached_input_tokens=cache_read,
        cache_write_tokens=cache_write,
        output_tokens=usage.output_tokens,
        model=response.model,
        refusal=refusal,
        truncated=response.stop_reason == "max_tokens",
    )
