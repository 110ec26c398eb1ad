"""How the commands end and speak: the exit codes, standard error, and the one-line usage error.

Standard output carries only results (decisions, JSON, tables asked for); every message to the
user, progress bar and summary goes to :data:`err`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import typer
from rich.console import Console
from rich.markup import escape

from tiergate.policies.spec import PolicyError
from tiergate.workers.errors import TiergateError

USAGE_ERROR = 2
REJECTED = 1

err = Console(stderr=True)

T = TypeVar("T")


def fail(message: str) -> typer.Exit:
    """Print ``error: message`` on one line of standard error; raise the result (exit code 2)."""
    err.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
    return typer.Exit(USAGE_ERROR)


def warn(message: str) -> None:
    """Print ``warning: message`` in yellow on standard error; the command goes on."""
    err.print(f"[bold yellow]warning:[/] {escape(message)}", highlight=False, soft_wrap=True)


def guarded(action: Callable[[], T]) -> T:
    """Run ``action``; a tiergate or policy error becomes a one-line message and exit code 2."""
    try:
        return action()
    except (TiergateError, PolicyError) as exc:
        raise fail(str(exc)) from None
