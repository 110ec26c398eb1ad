"""Logging, configured once per process from settings.

tiergate logs through structlog: events are named (``llm.call``, ``budget.exhausted``) and carry
fields (provider, model, policy, message id, tokens, latency), never message text or secrets.
Context such as a request id is bound through ``structlog.contextvars``. Output is one JSON
object per line on standard error, or a console rendering when standard error is a terminal.
"""

from __future__ import annotations

import logging
import sys

import structlog


def configure_logging(level: str = "INFO", *, json: bool | None = None) -> None:
    """Configure structlog for this process; call once at a front door (CLI, app, worker).

    ``level`` is a standard level name; ``json`` forces JSON lines (default: JSON unless
    standard error is a terminal).
    """
    numeric = logging.getLevelNamesMapping().get(level.upper())
    if numeric is None:
        raise ValueError(f"unknown log level {level!r}")
    as_json = json if json is not None else not sys.stderr.isatty()
    renderer: structlog.typing.Processor = (
        structlog.processors.JSONRenderer()
        if as_json
        else structlog.dev.ConsoleRenderer(colors=False)
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=False,
    )
