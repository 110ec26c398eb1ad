"""Fixtures of the security suite: a real gateway over real HTTP, real Redis, a fake LLM API.

``make_gateway`` serves ``tiergate.gateway.http.create_app`` in embedded mode with uvicorn on a free
local port, over a real ONNX model (the session's ``tiny_model``, or the multi-label one built
here), policies loaded from YAML files, API keys configured, Redis under the test's own
prefix, and the LLM tier pointed at a :class:`~tiergate.workers.llm.testing.FakeLLMServer`: the only
fake. ``captured_logs`` configures structlog the way a front door does (JSON lines on
standard error) into a buffer, and collects Python logging and the process's output too, so
a test can scan everything that was logged.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx2 as httpx
import pytest
import structlog
import uvicorn
import yaml

from cluster import delete_keys
from tiergate.gateway.http import create_app, hash_api_key
from tiergate.workers.bert.dataset import LabelledExample
from tiergate.workers.llm.testing import FakeLLMServer
from tiergate.workers.logs import configure_logging
from tiergate.workers.settings import Settings

# How long a gateway may take to start and become ready, and to stop: generous, since a
# loaded 2-core runner may take many seconds.
START_S = 60

TICKET_LABELS = ("account", "billing", "bug")  # the labels of the session's tiny_model
MODERATION_LABELS = ("harassment", "spam", "violence")

# Keys a client presents. Long, random-looking and distinctive, so a scan of the logs cannot
# match them by accident.
KEY_ALL = "tg-sec-all-7f3a9c2e51d84b6f0a1e"
KEY_LIMITED = "tg-sec-limited-to-one-c41d7e09b2a8"
KEY_WRONG = "tg-sec-not-a-key-5e8b2f1a90c3d7"
# The LLM provider keys the gateway holds; they must reach the provider and nothing else.
OPENAI_KEY = "sk-test-openai-SECRET-93kf02mdq81nz7"
ANTHROPIC_KEY = "sk-ant-test-SECRET-x7c2p9q4r1m0v5"


def write_policy(directory: Path, name: str, **fields: Any) -> Path:
    """A policy YAML file named ``name`` over the ticket labels; ``fields`` override parts."""
    document: dict[str, Any] = {
        "name": name,
        "version": "1",
        "description": f"the {name} policy of the security tests",
        "labels": [
            {"name": "account", "description": "log-in, password and profile problems"},
            {"name": "billing", "description": "invoices, charges and refunds"},
            {"name": "bug", "description": "something in the product is broken"},
        ],
        # Every single-label message escalates (no calibrated probability reaches 1).
        "escalation": {"min_probability": 1.0},
        "generation": {"tasks": ["reply", "summary", "explain"]},
        "llm": {
            "providers": [{"provider": "openai", "model": "gpt-4o-mini"}],
            "instructions": "You triage customer support tickets.",
        },
    }
    document.update(fields)
    path = directory / f"{name}.yaml"
    path.write_text(yaml.safe_dump(document, sort_keys=False), encoding="utf-8")
    return path


@dataclass
class Gateway:
    """A served gateway: its base URL, its settings, and the fake LLM API behind it."""

    url: str
    settings: Settings
    llm: FakeLLMServer
    app: Any

    def request(self, method: str, path: str, *, key: str | None = KEY_ALL, **kwargs: Any):
        """One HTTP request to the gateway, with ``key`` as X-API-Key (None: no key)."""
        headers = dict(kwargs.pop("headers", {}) or {})
        if key is not None:
            headers.setdefault("X-API-Key", key)
        kwargs.setdefault("timeout", 60)
        return httpx.request(method, f"{self.url}{path}", headers=headers, **kwargs)

    def post(self, path: str, **kwargs: Any):
        """POST to the gateway (see :meth:`request`)."""
        return self.request("POST", path, **kwargs)

    def get(self, path: str, **kwargs: Any):
        """GET from the gateway (see :meth:`request`)."""
        return self.request("GET", path, **kwargs)


def free_port() -> int:
    """A TCP port that was free a moment ago on 127.0.0.1."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@contextlib.contextmanager
def serve(app: Any) -> Iterator[str]:
    """Serve ``app`` with uvicorn in a thread until the block ends; yields its base URL."""
    port = free_port()
    # log_config=None: uvicorn's loggers stay as the test configured them (captured).
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_config=None, log_level="info")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="security-gateway", daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + START_S
        while not server.started:
            assert thread.is_alive(), "the gateway failed to start"
            assert time.monotonic() < deadline, f"the gateway did not start within {START_S} s"
            time.sleep(0.02)
        url = f"http://127.0.0.1:{port}"
        while not _ready(url):
            assert time.monotonic() < deadline, f"the gateway not ready within {START_S} s"
            time.sleep(0.02)
        yield url
    finally:
        server.should_exit = True
        thread.join(timeout=START_S)


def _ready(url: str) -> bool:
    """Whether ``/readyz`` answers 200; a probe that fails or times out is a "not yet"."""
    try:
        return httpx.get(f"{url}/readyz", timeout=10).status_code == 200
    except httpx.TransportError:
        return False


@pytest.fixture
def fake_llm() -> Iterator[FakeLLMServer]:
    """The fake OpenAI/Anthropic API on a free local port."""
    with FakeLLMServer() as server:
        yield server


def gateway_factory(
    stack: contextlib.ExitStack,
    directory: Path,
    model: Path,
    redis_prefix: str,
    fake_llm: FakeLLMServer,
) -> Callable[..., Gateway]:
    """A function that starts keyed embedded gateways, each stopped when ``stack`` closes.

    ``make(model=..., policies=[...], **settings)``: the model defaults to ``model``; the
    policies to ``tickets`` (the default) and ``internal``. ``KEY_ALL`` may use every policy,
    ``KEY_LIMITED`` only the first (default) one. Redis holds the cache, budgets, breakers and
    decisions under ``redis_prefix``; both LLM providers point at ``fake_llm``.
    """

    def make(
        *, model: Path = model, policies: list[Path] | None = None, **overrides: Any
    ) -> Gateway:
        if policies is None:
            policies = [write_policy(directory, "tickets"), write_policy(directory, "internal")]
        first = yaml.safe_load(policies[0].read_text(encoding="utf-8"))["name"]
        values: dict[str, Any] = {
            "data_dir": directory,
            "model_dir": model,
            "policy_files": policies,
            "api_keys": {hash_api_key(KEY_ALL): ["*"], hash_api_key(KEY_LIMITED): [first]},
            "redis_url": "redis://127.0.0.1:6379/0",
            "cache_prefix": redis_prefix,
            "decisions_stream": f"{redis_prefix}:decisions",
            "openai_api_key": OPENAI_KEY,
            "openai_base_url": fake_llm.openai_base_url,
            "anthropic_api_key": ANTHROPIC_KEY,
            "anthropic_base_url": fake_llm.anthropic_base_url,
            "llm_max_retries": 0,
            "llm_timeout_s": 10.0,
            "intra_op_threads": 1,
            "max_text_chars": 20_000,
            "max_body_bytes": 200_000,
        }
        values.update(overrides)
        settings = Settings(**values)
        app = create_app(settings)
        url = stack.enter_context(serve(app))
        return Gateway(url=url, settings=settings, llm=fake_llm, app=app)

    return make


@pytest.fixture
def make_gateway(
    tmp_path: Path, tiny_model: Path, redis_prefix: str, fake_llm: FakeLLMServer
) -> Iterator[Callable[..., Gateway]]:
    """Start keyed gateways for one test (see :func:`gateway_factory`); they stop after it."""
    with contextlib.ExitStack() as stack:
        yield gateway_factory(stack, tmp_path, tiny_model, redis_prefix, fake_llm)


@pytest.fixture(scope="module")
def make_shared_gateway(
    tmp_path_factory: pytest.TempPathFactory, tiny_model: Path
) -> Iterator[Callable[..., Gateway]]:
    """Start keyed gateways shared by a module's tests, with a Redis prefix of their own.

    For tests that only send requests the gateway refuses, or whose ids do not meet: one
    gateway per module saves a start, a stop and a scan of Redis per test.
    """
    prefix = f"tiergate-test-{uuid.uuid4().hex}"
    directory = tmp_path_factory.mktemp("gateway")
    try:
        with FakeLLMServer() as fake, contextlib.ExitStack() as stack:
            yield gateway_factory(stack, directory, tiny_model, prefix, fake)
    finally:
        delete_keys(f"{prefix}:*")


@pytest.fixture(scope="session")
def tiny_multi_label_model(make_tiny_model: Callable[..., Path]) -> Path:
    """A random two-layer DistilBERT with a multi-label head over ``MODERATION_LABELS``."""
    examples = [
        LabelledExample(text=f"comment {i} about {word}", labels=labels, line=i + 1)
        for i, (word, labels) in enumerate(
            [
                ("insults", ("harassment",)),
                ("cheap pills", ("spam",)),
                ("threats", ("harassment", "violence")),
                ("the weather", ()),
            ]
            * 6
        )
    ]
    return make_tiny_model("tiny-moderation", MODERATION_LABELS, examples, multi_label=True)


@pytest.fixture(scope="module")
def moderation_gateway(
    make_shared_gateway: Callable[..., Gateway],
    tiny_multi_label_model: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Gateway:
    """A keyed gateway over the multi-label tiny model, so that every route can answer 200.

    ``moderation`` (the default; ``KEY_LIMITED`` may use only it) sends borderline labels to
    the LLM; ``strict-moderation`` lets every BERT verdict stand. Both collect labels, so
    ``POST /v1/feedback`` can answer 200 too.
    """
    tmp_path = tmp_path_factory.mktemp("moderation")
    labels = [{"name": n, "description": f"{n} in a comment"} for n in MODERATION_LABELS]
    moderation = write_policy(
        tmp_path,
        "moderation",
        multi_label=True,
        labels=labels,
        escalation={"flag_threshold": 0.5, "band": {"low": 0.2, "high": 0.8}},
        learning={"collect": True},
    )
    strict = write_policy(
        tmp_path,
        "strict-moderation",
        multi_label=True,
        labels=labels,
        escalation={},
        learning={"collect": True},
    )
    gateway: Gateway = make_shared_gateway(
        model=tiny_multi_label_model, policies=[moderation, strict]
    )
    return gateway


@dataclass
class CapturedLogs:
    """Everything a test run logged: structlog lines, Python logging records, raw output."""

    structured: io.StringIO
    caplog: pytest.LogCaptureFixture
    capfd: pytest.CaptureFixture[str]
    output: str = ""  # what the process wrote to its file descriptors 1 and 2 so far

    def text(self) -> str:
        """All captured log output so far, as one string."""
        out, err = self.capfd.readouterr()  # drains the capture, so keep what it held
        self.output += out + err
        records = "\n".join(
            f"{record.name} {record.getMessage()} {record.__dict__}"
            for record in self.caplog.records
        )
        return "\n".join([self.structured.getvalue(), records, self.output])

    def events(self) -> list[dict[str, Any]]:
        """The structlog events so far, parsed from their JSON lines."""
        return [json.loads(line) for line in self.structured.getvalue().splitlines() if line]


@pytest.fixture
def captured_logs(
    caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture[str]
) -> Iterator[CapturedLogs]:
    """Structlog configured at DEBUG as JSON lines into a buffer, plus all Python logging."""
    previous = structlog.get_config()
    buffer = io.StringIO()
    with contextlib.redirect_stderr(buffer):
        configure_logging("DEBUG", json=True)  # binds the logger factory to this buffer
    caplog.set_level(logging.DEBUG)
    try:
        yield CapturedLogs(structured=buffer, caplog=caplog, capfd=capfd)
    finally:
        structlog.configure(**previous)
