"""The batch APIs of the fake LLM server: OpenAI files and batches, Anthropic message batches.

:class:`FakeBatches` keeps the batches :class:`~tiergate.workers.llm.testing.FakeLLMServer`
was sent and answers the endpoints the official SDKs call, in each provider's wire format:

- OpenAI: ``POST /v1/files`` (multipart, ``purpose=batch``), ``GET /v1/files/{id}/content``,
  ``POST /v1/batches``, ``GET /v1/batches``, ``GET /v1/batches/{id}``,
  ``POST /v1/batches/{id}/cancel``. A batch's requests are JSONL lines ``{custom_id, method,
  url, body}``; its results are an output file (answered requests) and an error file (failed,
  expired and cancelled requests), as OpenAI writes them.
- Anthropic: ``POST /v1/messages/batches``, ``GET /v1/messages/batches``,
  ``GET /v1/messages/batches/{id}``, ``POST /v1/messages/batches/{id}/cancel``,
  ``GET /v1/messages/batches/{id}/results`` (JSONL of ``succeeded`` / ``errored`` /
  ``canceled`` / ``expired`` results).

How a batch ends is scripted with :class:`BatchPlan`, one per submitted batch in order
(``FakeLLMServer.batches.plan``); without one a batch answers every request. A batch stays in
progress for ``delay_s`` seconds (the server's ``batch_delay_s``) after it was created (with
``hold``, until ``batches.release()``), then ends when it is next read. Each request is
answered as the online endpoint would answer it (the server's answerer, its prompt caches).
"""

from __future__ import annotations

import email.parser
import email.policy
import itertools
import json
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

OPENAI_FILES_PATH = "/v1/files"
OPENAI_BATCHES_PATH = "/v1/batches"
ANTHROPIC_BATCHES_PATH = "/v1/messages/batches"

# (provider, request body, response number) -> the online response body for that request.
OnlineAnswer = Callable[[str, dict[str, Any], int], dict[str, Any]]

# A batch's completion window, as both providers sell it.
BATCH_WINDOW_S = 24 * 3600


@dataclass(frozen=True)
class BatchPlan:
    """How the fake server settles one submitted batch.

    ``errored``: positions (0-based, in submission order) of requests that fail with a server
    error. ``expire_after``: the batch expires with only its first ``expire_after`` requests
    answered (the rest ``expired``). ``hold``: the batch stays in progress until
    ``FakeBatches.release()``, whatever the delay (a cancel still ends it).
    """

    errored: frozenset[int] = frozenset()
    expire_after: int | None = None
    hold: bool = False


@dataclass
class FakeBatch:
    """One batch the fake server was sent: its requests, plan and state.

    ``status`` is the provider's word for where it is: OpenAI ``in_progress``, ``completed``,
    ``expired`` or ``cancelled``; Anthropic ``in_progress`` or ``ended``. ``outcomes`` maps each
    custom id to ``succeeded``, ``errored``, ``expired`` or ``canceled`` once it ended.
    """

    provider: str
    id: str
    requests: list[tuple[str, dict[str, Any]]]
    plan: BatchPlan
    created_at: float
    metadata: dict[str, str] = field(default_factory=dict)
    input_file_id: str | None = None
    status: str = "in_progress"
    cancelled: bool = False
    ended_at: float | None = None
    outcomes: dict[str, str] = field(default_factory=dict)
    results: list[dict[str, Any]] = field(default_factory=list)
    output_file_id: str | None = None
    error_file_id: str | None = None

    @property
    def ended(self) -> bool:
        """Whether its results can be read."""
        return self.ended_at is not None


class FakeBatches:
    """The batch endpoints' state, shared by the server's handler threads (thread-safe)."""

    def __init__(self, answer: OnlineAnswer, base_url: Callable[[], str]) -> None:
        self._answer = answer
        self._base_url = base_url
        self._lock = threading.Lock()
        self._plans: deque[BatchPlan] = deque()
        self._files: dict[str, bytes] = {}
        self._batches: dict[str, FakeBatch] = {}
        self._ids = itertools.count(1)
        self._responses = itertools.count(1_000_000)
        self.delay_s = 0.0
        self._released = False

    # --------------------------------------------------------------------- test controls

    def plan(self, *plans: BatchPlan) -> None:
        """Queue plans, one per batch submitted from now on."""
        with self._lock:
            self._plans.extend(plans)

    def release(self) -> None:
        """Let every held batch end when next read (new held batches stay held)."""
        with self._lock:
            for batch in self._batches.values():
                if batch.plan.hold:
                    batch.plan = BatchPlan(batch.plan.errored, batch.plan.expire_after)

    @property
    def submitted(self) -> list[FakeBatch]:
        """Every batch submitted so far, in order."""
        with self._lock:
            return list(self._batches.values())

    # ------------------------------------------------------------------------ serving

    def handles(self, path: str) -> bool:
        """Whether ``path`` is one of the batch endpoints."""
        return path.startswith((OPENAI_FILES_PATH, OPENAI_BATCHES_PATH, ANTHROPIC_BATCHES_PATH))

    def post(self, path: str, headers: Any, raw: bytes) -> tuple[int, dict[str, Any] | bytes]:
        """Answer a POST to a batch endpoint: (status, JSON body or raw bytes)."""
        if path == OPENAI_FILES_PATH:
            return self._upload(headers.get("content-type", ""), raw)
        body = _json(raw)
        if path == OPENAI_BATCHES_PATH:
            return self._create_openai(body)
        if path == ANTHROPIC_BATCHES_PATH:
            return self._create_anthropic(body)
        parts = path.strip("/").split("/")
        if parts[-1] == "cancel":
            return self._cancel(parts[-2])
        return 404, _not_found(path)

    def get(self, path: str) -> tuple[int, dict[str, Any] | bytes]:
        """Answer a GET on a batch endpoint: (status, JSON body or raw bytes)."""
        parts = path.strip("/").split("/")
        if path in {OPENAI_BATCHES_PATH, ANTHROPIC_BATCHES_PATH}:
            provider = "openai" if path == OPENAI_BATCHES_PATH else "anthropic"
            return 200, self._list(provider)
        if path.startswith(OPENAI_FILES_PATH) and parts[-1] == "content":
            with self._lock:
                content = self._files.get(parts[-2])
            return (200, content) if content is not None else (404, _not_found(path))
        if path.startswith(ANTHROPIC_BATCHES_PATH) and parts[-1] == "results":
            batch = self._read(parts[-2])
            if batch is None or not batch.ended:
                return 404, _not_found(path)
            lines = "".join(json.dumps(line) + "\n" for line in batch.results)
            return 200, lines.encode()
        batch = self._read(parts[-1])
        if batch is None:
            return 404, _not_found(path)
        return 200, self._view(batch)

    def _upload(self, content_type: str, raw: bytes) -> tuple[int, dict[str, Any]]:
        form = _multipart(content_type, raw)
        content = form.get("file", b"")
        with self._lock:
            file_id = f"file-fake-{next(self._ids)}"
            self._files[file_id] = content
        return 200, _file_object(file_id, len(content), "batch_input.jsonl", "batch")

    def _create_openai(self, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        with self._lock:
            content = self._files.get(str(body.get("input_file_id")))
        if content is None:
            return 400, {
                "error": {"message": "no such input file", "type": "invalid_request_error"}
            }
        lines = [json.loads(line) for line in content.decode().splitlines() if line.strip()]
        requests = [(str(line["custom_id"]), dict(line["body"])) for line in lines]
        batch = self._new("openai", "batch_fake", requests, dict(body.get("metadata") or {}))
        batch.input_file_id = str(body["input_file_id"])
        return 200, self._view(batch, settle=False)

    def _create_anthropic(self, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        requests = [(str(r["custom_id"]), dict(r["params"])) for r in body.get("requests", [])]
        batch = self._new("anthropic", "msgbatch_fake", requests, {})
        return 200, self._view(batch, settle=False)

    def _new(
        self,
        provider: str,
        prefix: str,
        requests: list[tuple[str, dict[str, Any]]],
        metadata: dict[str, str],
    ) -> FakeBatch:
        with self._lock:
            plan = self._plans.popleft() if self._plans else BatchPlan()
            batch = FakeBatch(
                provider=provider,
                id=f"{prefix}_{next(self._ids)}",
                requests=requests,
                plan=plan,
                created_at=time.time(),
                metadata=metadata,
            )
            self._batches[batch.id] = batch
        return batch

    def _cancel(self, batch_id: str) -> tuple[int, dict[str, Any]]:
        with self._lock:
            batch = self._batches.get(batch_id)
            if batch is not None and not batch.ended:
                batch.cancelled = True
        if batch is None:
            return 404, _not_found(batch_id)
        return 200, self._view(batch, settle=False)

    def _read(self, batch_id: str) -> FakeBatch | None:
        """The batch, ended first if its time has come."""
        with self._lock:
            batch = self._batches.get(batch_id)
            due = (
                batch is not None
                and not batch.ended
                and (
                    batch.cancelled
                    or (not batch.plan.hold and time.time() - batch.created_at >= self.delay_s)
                )
            )
        if batch is not None and due:
            self._settle(batch)
        return batch

    def _settle(self, batch: FakeBatch) -> None:
        """Answer (or fail, expire, cancel) each request of ``batch`` and end it."""
        results: list[tuple[str, str, dict[str, Any] | None]] = []
        for position, (custom_id, body) in enumerate(batch.requests):
            if batch.cancelled:
                results.append((custom_id, "canceled", None))
            elif batch.plan.expire_after is not None and position >= batch.plan.expire_after:
                results.append((custom_id, "expired", None))
            elif position in batch.plan.errored:
                results.append((custom_id, "errored", None))
            else:
                number = next(self._responses)
                results.append((custom_id, "succeeded", self._answer(batch.provider, body, number)))
        with self._lock:
            if batch.ended:  # another thread settled it meanwhile
                return
            batch.outcomes = {custom_id: outcome for custom_id, outcome, _ in results}
            if batch.provider == "openai":
                self._openai_files(batch, results)
            else:
                batch.results = [_anthropic_line(*result) for result in results]
                batch.status = "ended"
            batch.ended_at = time.time()

    def _openai_files(
        self, batch: FakeBatch, results: list[tuple[str, str, dict[str, Any] | None]]
    ) -> None:
        """Write the output and error files of an ended OpenAI batch (under the lock)."""
        output: list[str] = []
        errors: list[str] = []
        for number, (custom_id, outcome, response) in enumerate(results):
            line = _openai_line(batch.id, number, custom_id, outcome, response)
            (output if outcome == "succeeded" else errors).append(json.dumps(line) + "\n")
        if output:
            batch.output_file_id = f"file-fake-{next(self._ids)}"
            self._files[batch.output_file_id] = "".join(output).encode()
        if errors:
            batch.error_file_id = f"file-fake-{next(self._ids)}"
            self._files[batch.error_file_id] = "".join(errors).encode()
        if batch.cancelled:
            batch.status = "cancelled"
        elif batch.plan.expire_after is not None:
            batch.status = "expired"
        else:
            batch.status = "completed"

    def _list(self, provider: str) -> dict[str, Any]:
        """Every batch of ``provider``, newest first, in one page."""
        with self._lock:
            mine = [b for b in self._batches.values() if b.provider == provider]
        views = [self._view(batch, settle=False) for batch in reversed(mine)]
        page: dict[str, Any] = {
            "data": views,
            "has_more": False,
            "first_id": views[0]["id"] if views else None,
            "last_id": views[-1]["id"] if views else None,
        }
        if provider == "openai":
            page["object"] = "list"
        return page

    def _view(self, batch: FakeBatch, *, settle: bool = True) -> dict[str, Any]:
        """The batch object as the provider returns it."""
        if settle:
            self._read(batch.id)
        with self._lock:
            if batch.provider == "openai":
                return _openai_view(batch)
            return _anthropic_view(batch, self._base_url())


def _json(raw: bytes) -> dict[str, Any]:
    try:
        value = json.loads(raw or b"{}")
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def _multipart(content_type: str, raw: bytes) -> dict[str, bytes]:
    """The parts of a ``multipart/form-data`` body, by field name."""
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
        f"Content-Type: {content_type}\r\n\r\n".encode() + raw
    )
    parts: dict[str, bytes] = {}
    for part in message.iter_parts():
        name = part.get_param("name", header="content-disposition")
        payload = part.get_payload(decode=True)
        if isinstance(name, str) and isinstance(payload, bytes):
            parts[name] = payload
    return parts


def _not_found(what: str) -> dict[str, Any]:
    return {
        "type": "error",
        "error": {"type": "not_found_error", "message": f"not found: {what}"},
    }


def _file_object(file_id: str, size: int, filename: str, purpose: str) -> dict[str, Any]:
    return {
        "id": file_id,
        "object": "file",
        "bytes": size,
        "created_at": int(time.time()),
        "filename": filename,
        "purpose": purpose,
        "status": "processed",
    }


def _counts(batch: FakeBatch) -> dict[str, int]:
    outcomes = list(batch.outcomes.values())
    return {kind: outcomes.count(kind) for kind in ("succeeded", "errored", "expired", "canceled")}


def _openai_view(batch: FakeBatch) -> dict[str, Any]:
    counts = _counts(batch)
    ended = int(batch.ended_at) if batch.ended_at is not None else None
    failed = counts["errored"] + counts["expired"] + counts["canceled"]
    return {
        "id": batch.id,
        "object": "batch",
        "endpoint": "/v1/chat/completions",
        "errors": None,
        "input_file_id": batch.input_file_id,
        "completion_window": "24h",
        "status": batch.status,
        "output_file_id": batch.output_file_id,
        "error_file_id": batch.error_file_id,
        "created_at": int(batch.created_at),
        "in_progress_at": int(batch.created_at),
        "expires_at": int(batch.created_at + BATCH_WINDOW_S),
        "completed_at": ended if batch.status == "completed" else None,
        "expired_at": ended if batch.status == "expired" else None,
        "cancelled_at": ended if batch.status == "cancelled" else None,
        "cancelling_at": int(batch.created_at) if batch.cancelled else None,
        "failed_at": None,
        "finalizing_at": ended,
        "request_counts": {
            "total": len(batch.requests),
            "completed": counts["succeeded"],
            "failed": failed,
        },
        "metadata": batch.metadata or None,
    }


def _anthropic_view(batch: FakeBatch, base_url: str) -> dict[str, Any]:
    counts = _counts(batch)
    created = _iso(batch.created_at)
    return {
        "id": batch.id,
        "type": "message_batch",
        "processing_status": (
            "ended" if batch.ended else ("canceling" if batch.cancelled else "in_progress")
        ),
        "request_counts": {
            "processing": 0 if batch.ended else len(batch.requests),
            **counts,
        },
        "created_at": created,
        "expires_at": _iso(batch.created_at + BATCH_WINDOW_S),
        "ended_at": _iso(batch.ended_at) if batch.ended_at is not None else None,
        "archived_at": None,
        "cancel_initiated_at": created if batch.cancelled else None,
        "results_url": (
            f"{base_url}{ANTHROPIC_BATCHES_PATH}/{batch.id}/results" if batch.ended else None
        ),
    }


def _iso(at: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(at))


def _openai_line(
    batch_id: str, number: int, custom_id: str, outcome: str, response: dict[str, Any] | None
) -> dict[str, Any]:
    """One line of an OpenAI batch's output or error file."""
    line: dict[str, Any] = {"id": f"batch_req_{batch_id}_{number}", "custom_id": custom_id}
    if outcome == "succeeded":
        line["response"] = {"status_code": 200, "request_id": f"req_{number}", "body": response}
        line["error"] = None
    elif outcome == "errored":
        error = {"message": "fake server error 500", "type": "server_error", "code": None}
        line["response"] = {
            "status_code": 500,
            "request_id": f"req_{number}",
            "body": {"error": error},
        }
        line["error"] = None
    else:
        code = "batch_expired" if outcome == "expired" else "batch_cancelled"
        message = (
            "This request could not be executed before the completion window expired."
            if outcome == "expired"
            else "This request was not executed because the batch was cancelled."
        )
        line["response"] = None
        line["error"] = {"code": code, "message": message}
    return line


def _anthropic_line(
    custom_id: str, outcome: str, response: dict[str, Any] | None
) -> dict[str, Any]:
    """One line of an Anthropic batch's results."""
    result: dict[str, Any] = {"type": outcome}
    if outcome == "succeeded":
        result["message"] = response
    elif outcome == "errored":
        result["error"] = {
            "type": "error",
            "error": {"type": "api_error", "message": "fake server error 500"},
        }
    return {"custom_id": custom_id, "result": result}


def outcomes_of(batches: Iterable[FakeBatch]) -> dict[str, str]:
    """Every request's outcome over ``batches``, by custom id (for test assertions)."""
    merged: dict[str, str] = {}
    for batch in batches:
        merged.update(batch.outcomes)
    return merged
