"""Fixtures of the reliability suite: clusters, a private Redis, held-out texts, figures.

Every test here runs real worker processes over real Redis and RabbitMQ (the LLM API is the
only fake) and records the figures it measured with the ``figures`` fixture. They are printed
in pytest's terminal summary, under "reliability figures", and written as JSON to
``reliability-figures.json`` in pytest's base temporary directory (outside the repository; the
summary prints the path).
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import pytest

from tiergate.workers.bert.default_model import load_default_splits

FIGURES_FILE = "reliability-figures.json"

# Figures of every test that ran in this session, by test id, in the order they ran.
_figures: dict[str, dict[str, Any]] = {}
_written_to: list[Path] = []


class Figures:
    """The named figures one test reports; floats are rounded to three decimals."""

    def __init__(self, store: dict[str, Any]) -> None:
        self._store = store

    def record(self, **values: Any) -> None:
        """Record figures by name (a later value of the same name replaces the earlier one)."""
        for name, value in values.items():
            self._store[name] = round(value, 3) if isinstance(value, float) else value


@pytest.fixture
def figures(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    """Where a test records its figures; written out after the test, even when it fails."""
    store: dict[str, Any] = {}
    _figures[request.node.nodeid] = store
    yield Figures(store)
    path = tmp_path_factory.getbasetemp() / FIGURES_FILE
    path.write_text(json.dumps(_figures, indent=2) + "\n")
    if not _written_to:
        _written_to.append(path)


def pytest_terminal_summary(terminalreporter: Any) -> None:
    """Print every reliability test's figures after the run."""
    if not _figures:
        return
    terminalreporter.section("reliability figures")
    for test, values in _figures.items():
        terminalreporter.write_line(test)
        for name, value in values.items():
            terminalreporter.write_line(f"    {name:<34} {value}")
    if _written_to:
        terminalreporter.write_line(f"(also written to {_written_to[0]})")


@pytest.fixture(scope="session")
def snippets() -> list[str]:
    """Distinct real Rotten Tomatoes snippets in a fixed order: the held-out test split first.

    The test split (about 2,300 snippets) was never trained on; validation and train follow.
    Each split is shuffled with a fixed seed, since the files group snippets by label (the
    model is sure of synopses and unsure of many opinions, so the share sent to the LLM would
    otherwise drift along the sequence).
    """
    splits = load_default_splits()
    seen: dict[str, None] = {}
    for number, split in enumerate((splits.test, splits.validation, splits.train)):
        texts = [" ".join(example.text.split()) for example in split]
        random.Random(number).shuffle(texts)
        for text in texts:
            if text:
                seen.setdefault(text, None)
    return list(seen)
