"""``tiergate serve --workers N``: each uvicorn process classifies with its share of the cores."""

from __future__ import annotations

import gc
import os

import pytest
import structlog
import uvicorn
from typer.testing import CliRunner

from tiergate.gateway.cli import app
from tiergate.gateway.http import app as app_module


@pytest.fixture
def started(monkeypatch):
    """What ``uvicorn.run`` was started with, and the environment its processes inherit.

    The CLI configures logging to the runner's captured standard error and exports its log
    level; both are put back afterwards, so later tests do not log to a closed stream.
    """
    calls: list[tuple[dict, str | None]] = []

    def record(target, **options):
        calls.append((options, os.environ.get("TIERGATE_INTRA_OP_THREADS")))

    monkeypatch.setattr(uvicorn, "run", record)
    monkeypatch.delenv("TIERGATE_INTRA_OP_THREADS", raising=False)
    monkeypatch.delenv("TIERGATE_LOG_LEVEL", raising=False)
    logging_before = structlog.get_config()
    yield calls
    structlog.configure(**logging_before)


def test_worker_processes_split_the_cores_between_them(started, monkeypatch):
    """Two processes on this machine get half its cores each (at least one)."""
    monkeypatch.setattr(os, "cpu_count", lambda: 8)
    result = CliRunner().invoke(app, ["serve", "--workers", "2", "--port", "8123"])
    assert result.exit_code == 0, result.output
    ((options, threads),) = started
    assert options["workers"] == 2
    assert options["port"] == 8123
    assert threads == "4"


def test_an_explicit_thread_count_is_kept(started, monkeypatch):
    """TIERGATE_INTRA_OP_THREADS set by the operator wins over the even split."""
    monkeypatch.setattr(os, "cpu_count", lambda: 8)
    monkeypatch.setenv("TIERGATE_INTRA_OP_THREADS", "3")
    result = CliRunner().invoke(app, ["serve", "--workers", "4"])
    assert result.exit_code == 0, result.output
    ((_, threads),) = started
    assert threads == "3"


def test_the_served_app_freezes_what_startup_built(started, monkeypatch):
    """One process: the app is built, then startup's objects leave the garbage collector."""
    served = object()
    monkeypatch.delenv("TIERGATE_BROKER_URL", raising=False)
    monkeypatch.setattr(app_module, "create_app", lambda *_, **__: served)
    gc.unfreeze()
    try:
        result = CliRunner().invoke(app, ["serve", "--port", "8124"])
        frozen = gc.get_freeze_count()
    finally:
        gc.unfreeze()
    assert result.exit_code == 0, result.output
    assert frozen > 10_000, "the imports alone leave tens of thousands of objects"
    ((options, _),) = started
    assert options["port"] == 8124
