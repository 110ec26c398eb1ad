"""A local HTTP server that speaks the OpenAI and Anthropic wire formats, for tests and benchmarks.

:class:`FakeLLMServer` answers ``POST /v1/chat/completions`` (OpenAI Chat Completions) and
``POST /v1/messages`` (Anthropic Messages) well enough for the official SDKs, so code under
test runs its real provider path: the SDK's request building, retries, timeouts and response
parsing. Behaviour is scripted per call::

    with FakeLLMServer() as server:
        server.script(Fail(429, retry_after=1), Respond({"label": "positive"}))
        settings = Settings(openai_api_key="k", openai_base_url=server.openai_base_url)
        ...
        assert server.calls == 2

Once the script is used up, a default answerer decides: a callable given the request body
that returns the answer object. The default one picks the first allowed label of the schema
in the request (and writes a short text when the schema asks for one). Benchmarks pass their
own answerer to simulate a model's accuracy, and ``latency_s`` to simulate its speed.

The server keeps prompt caches as the providers do (:class:`PromptCacheSimulation`, rules in
:mod:`tiergate.workers.llm.prompt_cache`) and reports them in each answer's usage: OpenAI's
``prompt_tokens_details.cached_tokens`` for a repeated prefix of at least 1,024 tokens, in
128-token steps; Anthropic's ``cache_creation_input_tokens`` and ``cache_read_input_tokens``
for a prefix marked with ``cache_control`` that reaches the model's minimum. A token is four
characters of the request's text (schema and tools included, as the providers bill them).

It also speaks both batch APIs (OpenAI files and batches, Anthropic message batches): see
:mod:`tiergate.workers.llm.testing_batches`; ``server.batches`` scripts how batches end.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import re
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any, Self

from tiergate.workers.llm.prompt_cache import (
    CACHE_LIFETIME_S,
    OPENAI_CACHE_STEP_TOKENS,
    OPENAI_MIN_CACHED_TOKENS,
    anthropic_min_cacheable_tokens,
)
from tiergate.workers.llm.testing_batches import FakeBatches

OPENAI_PATH = "/v1/chat/completions"
ANTHROPIC_PATH = "/v1/messages"

Answerer = Callable[[dict[str, Any]], dict[str, Any]]


@dataclass(frozen=True)
class Respond:
    """Answer with this JSON object (as the message content, or as the tool's input).

    ``usage``, when given, replaces fields of the answer's ``usage`` object, in the provider's
    own format (for example ``{"prompt_tokens": 2000, "prompt_tokens_details":
    {"cached_tokens": 1920}}`` or ``{"input_tokens": 12, "cache_read_input_tokens": 4100}``).
    """

    data: dict[str, Any]
    usage: Mapping[str, Any] | None = None


@dataclass(frozen=True)
class RespondRaw:
    """Answer with this text as the model's output, verbatim (for malformed answers)."""

    text: str


@dataclass(frozen=True)
class Fail:
    """Answer with an error status, and a ``Retry-After`` header when ``retry_after`` is set."""

    status_code: int
    retry_after: float | None = None


@dataclass(frozen=True)
class Stall:
    """Wait ``seconds`` before answering with the default answerer (to provoke timeouts)."""

    seconds: float


@dataclass(frozen=True)
class Refuse:
    """Refuse to answer, the way the provider reports refusals."""

    message: str = "I can't help with that request."


@dataclass(frozen=True)
class Truncate:
    """Answer cut off at the request's output limit, the way the provider reports it.

    OpenAI: the first half of the answer's JSON with ``finish_reason: "length"``; Anthropic: a
    ``tool_use`` block with empty input and ``stop_reason: "max_tokens"``. Either way the output
    tokens reported are the whole limit. The answer is ``data``, else the answerer's.
    """

    data: dict[str, Any] | None = None


Step = Respond | RespondRaw | Fail | Stall | Refuse | Truncate


@dataclass(frozen=True)
class ReceivedRequest:
    """One request the server received: its path, its JSON body, and when it arrived.

    ``at`` is the arrival time (``time.time()``), so a test can tell which calls were in flight
    at a given moment, or count calls per minute.
    """

    path: str
    body: dict[str, Any]
    at: float = field(default_factory=time.time)


def schema_of(body: dict[str, Any]) -> dict[str, Any]:
    """The answer schema a request asks for (OpenAI ``response_format`` or Anthropic tool)."""
    response_format = body.get("response_format")
    if isinstance(response_format, dict):
        schema: dict[str, Any] = response_format["json_schema"]["schema"]
        return schema
    tools = body.get("tools") or [{}]
    tool_schema: dict[str, Any] = tools[0].get("input_schema", {})
    return tool_schema


def _text_of(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(part.get("text", "") for part in content if isinstance(part, dict))
    return ""


def message_of(body: dict[str, Any]) -> str:
    """The text between ``<message>`` and ``</message>`` in the request's first user turn."""
    for turn in body.get("messages", []):
        if turn.get("role") == "user":
            match = re.search(
                r"<message>\n?(.*?)\n?</message>", _text_of(turn["content"]), re.DOTALL
            )
            return match.group(1) if match else ""
    return ""


def first_label_answer(body: dict[str, Any]) -> dict[str, Any]:
    """The default answerer: the first allowed label, and a short text when one is asked."""
    properties = schema_of(body).get("properties", {})
    answer: dict[str, Any] = {}
    if "label" in properties:
        answer["label"] = properties["label"]["enum"][0]
    if "labels" in properties:
        answer["labels"] = properties["labels"]["items"]["enum"][:1]
    if "text" in properties:
        nullable = "null" in properties["text"].get("type", [])
        answer["text"] = None if nullable else "Thank you for your message."
    return answer


class SimulatedLLM:
    """An answerer that imitates an LLM of a given accuracy on texts whose labels are known.

    ``gold`` maps a message text to its right label (single-label). For a known text the
    answer is right with probability ``accuracy`` and otherwise a different allowed label; the
    choice is a deterministic function of ``seed`` and the text, so a repeated message gets the
    same answer. Unknown texts get the first allowed label. Generated text, when asked for, is
    a fixed sentence. This is a simulation for demos and benchmarks, not a model.
    """

    def __init__(self, gold: Mapping[str, str], *, accuracy: float, seed: int = 0) -> None:
        if not 0.0 <= accuracy <= 1.0:
            raise ValueError(f"accuracy must lie in [0, 1], not {accuracy}")
        self.gold = {" ".join(text.split()): label for text, label in gold.items()}
        self.accuracy = accuracy
        self.seed = seed

    def __call__(self, body: dict[str, Any]) -> dict[str, Any]:
        """The answer object for one request."""
        answer = first_label_answer(body)
        properties = schema_of(body).get("properties", {})
        text = " ".join(message_of(body).split())
        right = self.gold.get(text)
        if "label" not in properties or right is None:
            return answer
        allowed = list(properties["label"]["enum"])
        digest = hashlib.sha256(f"{self.seed}\0{text}".encode()).digest()
        draw = int.from_bytes(digest[:8], "big") / 2**64
        wrong = [label for label in allowed if label != right]
        if draw < self.accuracy or not wrong:
            answer["label"] = right
        else:
            answer["label"] = wrong[digest[8] % len(wrong)]
        return answer


# Prefixes the simulated caches hold before expired ones are dropped.
_MAX_REMEMBERED = 200_000


@dataclass(frozen=True)
class CacheUse:
    """Input tokens of one request read from (``read``) and written to (``written``) the cache."""

    read: int = 0
    written: int = 0


class PromptCacheSimulation:
    """The providers' prompt caches, as the fake server keeps them. Thread-safe.

    A prefix is remembered by the hash of its text, per provider and model (and OpenAI's
    ``prompt_cache_key``), for :data:`~tiergate.workers.llm.prompt_cache.CACHE_LIFETIME_S`
    after its last use. ``enabled=False`` keeps nothing: every request is served uncached.
    """

    def __init__(
        self, *, enabled: bool = True, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.enabled = enabled
        self._clock = clock
        self._lock = threading.Lock()
        self._seen: dict[tuple[str, ...], float] = {}

    def openai(self, body: dict[str, Any], text: str) -> CacheUse:
        """Cached tokens of an OpenAI request: the longest remembered prefix, in 128-token steps.

        Nothing below 1,024 tokens; every step of this request's prompt is remembered.
        """
        total = _tokens(text)
        if not self.enabled or total < OPENAI_MIN_CACHED_TOKENS:
            return CacheUse()
        scope = ("openai", str(body.get("model")), str(body.get("prompt_cache_key")))
        steps = range(OPENAI_MIN_CACHED_TOKENS, total + 1, OPENAI_CACHE_STEP_TOKENS)
        keys = [(*scope, digest) for digest in _prefix_digests(text, [4 * n for n in steps])]
        with self._lock:
            now = self._clock()
            hits = [n for n, key in zip(steps, keys, strict=True) if self._alive(key, now)]
            self._remember(keys, now)
        return CacheUse(read=max(hits, default=0))

    def anthropic(self, body: dict[str, Any], breakpoints: list[int], text: str) -> CacheUse:
        """Cache use of an Anthropic request whose ``cache_control`` blocks end at ``breakpoints``.

        A marked prefix shorter than the model's minimum is not cached. The longest remembered
        marked prefix is read; the rest of the last cacheable one is written.
        """
        if not self.enabled:
            return CacheUse()
        minimum = anthropic_min_cacheable_tokens(str(body.get("model")))
        cut = [p for p in breakpoints if p // 4 >= minimum]
        if not cut:
            return CacheUse()
        scope = ("anthropic", str(body.get("model")))
        keys = [(*scope, digest) for digest in _prefix_digests(text, cut)]
        with self._lock:
            now = self._clock()
            hits = [p // 4 for p, key in zip(cut, keys, strict=True) if self._alive(key, now)]
            self._remember(keys, now)
        read = max(hits, default=0)
        return CacheUse(read=read, written=cut[-1] // 4 - read)

    def clear(self) -> None:
        """Forget every cached prefix."""
        with self._lock:
            self._seen.clear()

    def _alive(self, key: tuple[str, ...], now: float) -> bool:
        last = self._seen.get(key)
        return last is not None and now - last <= CACHE_LIFETIME_S

    def _remember(self, keys: Sequence[tuple[str, ...]], now: float) -> None:
        """Mark ``keys`` used at ``now``; past a bound, forget the expired ones (long runs)."""
        for key in keys:
            self._seen[key] = now
        if len(self._seen) > _MAX_REMEMBERED:
            self._seen = {k: t for k, t in self._seen.items() if now - t <= CACHE_LIFETIME_S}


def _prefix_digests(text: str, ends: list[int]) -> list[str]:
    """The SHA-256 of ``text[:end]`` for each of the ascending ``ends``, in one pass."""
    hasher = hashlib.sha256()
    digests = []
    start = 0
    for end in ends:
        hasher.update(text[start:end].encode())
        start = end
        digests.append(hasher.copy().hexdigest())
    return digests


def _openai_prompt_text(body: dict[str, Any]) -> str:
    """An OpenAI request's input in processing order: response schema, tools, then the turns."""
    parts = [json.dumps(body[name]) for name in ("response_format", "tools") if name in body]
    parts.extend(
        f"{turn.get('role')}: {_text_of(turn.get('content'))}\n" for turn in body["messages"]
    )
    return "".join(parts)


def _anthropic_prompt_text(body: dict[str, Any]) -> tuple[str, list[int]]:
    """An Anthropic request's input in processing order (tools, system, messages).

    Also where each block marked with ``cache_control`` ends in that text.
    """
    text = ""
    breakpoints: list[int] = []

    def add(piece: str, block: Any) -> None:
        nonlocal text
        text += piece
        if isinstance(block, dict) and block.get("cache_control"):
            breakpoints.append(len(text))

    for tool in body.get("tools") or []:
        add(json.dumps({k: v for k, v in tool.items() if k != "cache_control"}), tool)
    system = body.get("system", "")
    for block in [{"text": system}] if isinstance(system, str) else system:
        add(block.get("text", ""), block)
    for turn in body.get("messages", []):
        content = turn.get("content")
        blocks = [{"text": content}] if isinstance(content, str) else content
        add(f"{turn.get('role')}: ", None)
        for block in blocks:
            add(_text_of([block]) + "\n", block)
    return text, breakpoints


class _LocalHTTPServer(ThreadingHTTPServer):
    """A ThreadingHTTPServer whose listen backlog fits a concurrent client."""

    # socketserver's default backlog of 5 drops connections when a client opens more at once
    # (the LLM tier runs llm_concurrency calls in parallel); Linux retries a dropped SYN after
    # 1 s, which would show up as 1 s LLM calls in benchmarks.
    request_queue_size = 128


class FakeLLMServer:
    """An OpenAI- and Anthropic-compatible HTTP server on 127.0.0.1, scripted per call.

    ``script(*steps)`` queues steps (:class:`Respond`, :class:`RespondRaw`, :class:`Fail`,
    :class:`Stall`, :class:`Refuse`, :class:`Truncate`), used one per request in arrival order,
    whatever the path; then ``answerer`` decides. ``set_outage(step)`` answers every request
    with one failure until it is lifted. ``latency_s`` delays every answer. ``prompt_cache``
    holds the simulated prompt caches (``prompt_caching=False``: none, every token uncached).
    ``calls`` counts requests (``calls_by_path`` per path, ``statuses`` per response status)
    and ``requests`` keeps their bodies and arrival times; all are safe to read while requests
    are served. Online calls only: the batch endpoints keep their own record in ``batches``
    (:class:`~tiergate.workers.llm.testing_batches.FakeBatches`; ``batches.plan(...)`` scripts
    how each batch ends, ``batch_delay_s`` how long one stays in progress).
    Start and stop it as a context manager or with :meth:`start` and :meth:`stop`.
    """

    def __init__(
        self,
        answerer: Answerer = first_label_answer,
        *,
        latency_s: float = 0.0,
        prompt_caching: bool = True,
        batch_delay_s: float = 0.0,
    ) -> None:
        self.answerer = answerer
        self.latency_s = latency_s
        self.prompt_cache = PromptCacheSimulation(enabled=prompt_caching)
        self._lock = threading.Lock()
        self._steps: deque[Step] = deque()
        self._outage: Fail | Stall | None = None
        self._requests: list[ReceivedRequest] = []
        self._statuses: Counter[int] = Counter()
        self._stopping = threading.Event()
        self._ids = itertools.count(1)
        self._server = _LocalHTTPServer(("127.0.0.1", 0), self._handler_class())
        # Handler threads may be sleeping in a Stall; they must not keep the process alive.
        self._server.daemon_threads = True
        self._thread: threading.Thread | None = None
        self.batches = FakeBatches(self._batch_answer, lambda: self.anthropic_base_url)
        self.batches.delay_s = batch_delay_s

    @property
    def port(self) -> int:
        """The port the server listens on."""
        return int(self._server.server_address[1])

    @property
    def openai_base_url(self) -> str:
        """The ``base_url`` for the OpenAI SDK (it ends in ``/v1``)."""
        return f"http://127.0.0.1:{self.port}/v1"

    @property
    def anthropic_base_url(self) -> str:
        """The ``base_url`` for the Anthropic SDK (the server root)."""
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> Self:
        """Serve in a background thread; returns the server."""
        if self._thread is None:
            self._thread = threading.Thread(
                # A short poll interval makes stop() quick: shutdown waits for one poll.
                target=self._server.serve_forever,
                kwargs={"poll_interval": 0.05},
                name="fake-llm-server",
                daemon=True,
            )
            self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving, wake any stalled handler, and close the socket."""
        self._stopping.set()
        if self._thread is not None:
            self._server.shutdown()
            self._thread.join(timeout=5)
            self._thread = None
        self._server.server_close()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    def script(self, *steps: Step) -> None:
        """Queue ``steps``, one per coming request, before the answerer takes over."""
        with self._lock:
            self._steps.extend(steps)

    def set_outage(self, step: Fail | Stall | None) -> None:
        """Answer every request with ``step`` from now on, ahead of the script; ``None`` ends it.

        A provider down for a while (5xx, a 429 storm, timeouts) rather than for a number of
        calls. Requests are still counted.
        """
        with self._lock:
            self._outage = step

    @property
    def statuses(self) -> dict[int, int]:
        """Responses sent so far, per HTTP status (a stalled answer counts when it is sent)."""
        with self._lock:
            return dict(self._statuses)

    @property
    def calls(self) -> int:
        """Requests received so far, on any path."""
        with self._lock:
            return len(self._requests)

    @property
    def calls_by_path(self) -> dict[str, int]:
        """Requests received so far, per path."""
        with self._lock:
            return dict(Counter(request.path for request in self._requests))

    @property
    def requests(self) -> list[ReceivedRequest]:
        """The requests received so far, in arrival order."""
        with self._lock:
            return list(self._requests)

    # ------------------------------------------------------------------------ serving

    def _next_step(self, path: str, body: dict[str, Any]) -> Step | None:
        with self._lock:
            self._requests.append(ReceivedRequest(path=path, body=body))
            if self._outage is not None:
                return self._outage
            return self._steps.popleft() if self._steps else None

    def _count_status(self, status: int) -> None:
        with self._lock:
            self._statuses[status] += 1

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                server._serve(self)

            def do_GET(self) -> None:
                server._serve_batch(self, "GET")

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
                """Stay quiet: tests read the request log, not stderr."""

        return Handler

    def _serve_batch(self, handler: BaseHTTPRequestHandler, method: str, raw: bytes = b"") -> None:
        """Answer a request to one of the batch endpoints (404 for any other GET)."""
        path = handler.path.split("?", 1)[0]
        if not self.batches.handles(path):
            self._send(handler, HTTPStatus.NOT_FOUND, {"error": {"message": "no such path"}})
            return
        if method == "GET":
            status, payload = self.batches.get(path)
        else:
            status, payload = self.batches.post(path, handler.headers, raw)
        if isinstance(payload, bytes):
            self._send_bytes(handler, status, payload)
        else:
            self._send(handler, status, payload)

    def _batch_answer(self, provider: str, body: dict[str, Any], number: int) -> dict[str, Any]:
        """The online response body to one request of a batch (the answerer decides)."""
        step = Respond(self.answerer(body))
        if provider == "openai":
            return _openai_response(step, body, number, self.prompt_cache)
        return _anthropic_response(step, body, number, self.prompt_cache)

    def _serve(self, handler: BaseHTTPRequestHandler) -> None:
        length = int(handler.headers.get("content-length") or 0)
        raw = handler.rfile.read(length)
        path = handler.path.split("?", 1)[0]
        if self.batches.handles(path):
            self._serve_batch(handler, "POST", raw)
            return
        try:
            body = json.loads(raw or b"{}")
        except ValueError:
            body = {}
        if path not in {OPENAI_PATH, ANTHROPIC_PATH}:
            self._send(handler, HTTPStatus.NOT_FOUND, {"error": {"message": "no such path"}})
            return
        step = self._next_step(path, body)
        if isinstance(step, Stall):
            if self._stopping.wait(step.seconds):
                return
            step = None
        if self.latency_s and self._stopping.wait(self.latency_s):
            return
        openai = path == OPENAI_PATH
        if isinstance(step, Fail):
            headers = {}
            if step.retry_after is not None:
                headers["Retry-After"] = f"{step.retry_after:g}"
            self._count_status(step.status_code)
            self._send(
                handler, step.status_code, _error_body(step.status_code, openai=openai), headers
            )
            return
        if step is None:
            step = Respond(self.answerer(body))
        elif isinstance(step, Truncate) and step.data is None:
            step = Truncate(self.answerer(body))
        number = next(self._ids)
        payload = (
            _openai_response(step, body, number, self.prompt_cache)
            if openai
            else _anthropic_response(step, body, number, self.prompt_cache)
        )
        self._count_status(HTTPStatus.OK)
        self._send(handler, HTTPStatus.OK, payload)

    @staticmethod
    def _send(
        handler: BaseHTTPRequestHandler,
        status: int,
        payload: dict[str, Any],
        headers: dict[str, str] | None = None,
    ) -> None:
        data = json.dumps(payload).encode()
        try:
            handler.send_response(status)
            handler.send_header("Content-Type", "application/json")
            handler.send_header("Content-Length", str(len(data)))
            for name, value in (headers or {}).items():
                handler.send_header(name, value)
            handler.end_headers()
            handler.wfile.write(data)
        except OSError:
            pass  # the client gave up (a timeout test); nothing to tell it

    @staticmethod
    def _send_bytes(handler: BaseHTTPRequestHandler, status: int, data: bytes) -> None:
        """Send a file's bytes (a batch's JSONL results)."""
        try:
            handler.send_response(status)
            handler.send_header("Content-Type", "application/octet-stream")
            handler.send_header("Content-Length", str(len(data)))
            handler.end_headers()
            handler.wfile.write(data)
        except OSError:
            pass


def _tokens(text: str) -> int:
    """A rough token count (four characters a token), for the usage fields."""
    return max(1, len(text) // 4)


def _error_body(status_code: int, *, openai: bool) -> dict[str, Any]:
    kinds = {
        429: "rate_limit_error",
        500: "api_error",
        529: "overloaded_error",
        400: "invalid_request_error",
        401: "authentication_error",
    }
    kind = kinds.get(status_code, "api_error")
    message = f"fake server error {status_code}"
    if openai:
        return {"error": {"message": message, "type": kind, "param": None, "code": None}}
    return {"type": "error", "error": {"type": kind, "message": message}}


def _openai_response(
    step: Step, body: dict[str, Any], number: int, cache: PromptCacheSimulation
) -> dict[str, Any]:
    content: str | None
    refusal = None
    finish_reason = "stop"
    if isinstance(step, Respond):
        content = json.dumps(step.data)
    elif isinstance(step, RespondRaw):
        content = step.text
    elif isinstance(step, Truncate):
        whole = json.dumps(step.data)
        content, finish_reason = whole[: len(whole) // 2], "length"
    else:
        assert isinstance(step, Refuse)
        content, refusal = None, step.message
    output = _tokens(content or refusal or "")
    if isinstance(step, Truncate):
        output = int(body.get("max_completion_tokens") or output)
    text = _openai_prompt_text(body)
    prompt = _tokens(text)
    usage: dict[str, Any] = {
        "prompt_tokens": prompt,
        "completion_tokens": output,
        "total_tokens": prompt + output,
        "prompt_tokens_details": {"cached_tokens": cache.openai(body, text).read},
    }
    if isinstance(step, Respond) and step.usage is not None:
        usage.update(step.usage)
    return {
        "id": f"chatcmpl-fake-{number}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": body.get("model", "fake"),
        "choices": [
            {
                "index": 0,
                "finish_reason": finish_reason,
                "message": {"role": "assistant", "content": content, "refusal": refusal},
            }
        ],
        "usage": usage,
    }


def _anthropic_response(
    step: Step, body: dict[str, Any], number: int, cache: PromptCacheSimulation
) -> dict[str, Any]:
    tool = (body.get("tools") or [{"name": "answer"}])[0]["name"]
    output_tokens = None
    if isinstance(step, Respond):
        content = [
            {"type": "tool_use", "id": f"toolu_fake_{number}", "name": tool, "input": step.data}
        ]
        stop_reason, output = "tool_use", json.dumps(step.data)
    elif isinstance(step, Truncate):
        # The tool call was cut off before its input was complete.
        content = [{"type": "tool_use", "id": f"toolu_fake_{number}", "name": tool, "input": {}}]
        stop_reason, output = "max_tokens", ""
        output_tokens = int(body.get("max_tokens") or 1)
    elif isinstance(step, RespondRaw):
        content = [{"type": "text", "text": step.text}]
        stop_reason, output = "end_turn", step.text
    else:
        assert isinstance(step, Refuse)
        content = [{"type": "text", "text": step.message}]
        stop_reason, output = "refusal", step.message
    return {
        "id": f"msg_fake_{number}",
        "type": "message",
        "role": "assistant",
        "model": body.get("model", "fake"),
        "content": content,
        "stop_reason": stop_reason,
        "stop_sequence": None,
        "usage": _anthropic_usage(step, body, cache, output_tokens or _tokens(output)),
    }


def _anthropic_usage(
    step: Step, body: dict[str, Any], cache: PromptCacheSimulation, output_tokens: int
) -> dict[str, Any]:
    """The usage object: ``input_tokens`` leaves out what the cache served or stored."""
    text, breakpoints = _anthropic_prompt_text(body)
    use = cache.anthropic(body, breakpoints, text)
    usage: dict[str, Any] = {
        "input_tokens": max(0, _tokens(text) - use.read - use.written),
        "cache_creation_input_tokens": use.written,
        "cache_read_input_tokens": use.read,
        "cache_creation": {
            "ephemeral_5m_input_tokens": use.written,
            "ephemeral_1h_input_tokens": 0,
        },
        "output_tokens": output_tokens,
    }
    if isinstance(step, Respond) and step.usage is not None:
        usage.update(step.usage)
    return usage
