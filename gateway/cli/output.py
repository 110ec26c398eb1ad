"""What the commands write: the output stream, its JSON lines, and the table of decisions."""

from __future__ import annotations

import io
import json
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import IO

from rich.console import Console
from rich.table import Table

from tiergate.gateway.cli.errors import fail
from tiergate.workers.errors import RecordError
from tiergate.workers.schemas import Decision, Message


@contextmanager
def open_output(path: Path | None, *, table: bool = False) -> Iterator[IO[str]]:
    """Standard output, a file, or a scratch buffer when a table is printed instead."""
    if path is None:
        yield io.StringIO() if table else sys.stdout
        return
    try:
        handle = path.open("w", encoding="utf-8")
    except OSError as exc:
        raise fail(f"{path}: cannot be written ({exc.strerror})") from None
    with handle:
        yield handle


def decision_line(decision: Decision) -> str:
    """A decision as one JSON line."""
    return decision.model_dump_json(exclude_defaults=False) + "\n"


def error_line(error: RecordError) -> str:
    """A rejected record as one JSON line: ``{"line", "error"}``."""
    return json.dumps({"line": error.line, "error": error.reason}) + "\n"


def unanswered_line(message: Message, reason: str = "not answered in time") -> str:
    """A message no decision came back for as one JSON line: ``{"id", "error"}``."""
    return json.dumps({"id": message.id, "error": reason}) + "\n"


def excerpt(text: str, width: int) -> str:
    """``text`` on one line, cut to ``width`` characters with an ellipsis."""
    flat = " ".join(text.split())
    return flat if len(flat) <= width else flat[: width - 1] + "…"


def decision_table(rows: Sequence[tuple[Message, Decision]], expected: bool = False) -> Table:
    """Decisions as a table that fits the terminal: the message column takes what is left."""
    room = max(12, Console().width - (84 if expected else 73))
    table = Table(show_lines=False, header_style="bold")
    table.add_column("id", no_wrap=True, max_width=12, overflow="ellipsis")
    table.add_column("message", no_wrap=True, overflow="ellipsis")
    if expected:
        table.add_column("expected", no_wrap=True, min_width=8)
    table.add_column("label", no_wrap=True, min_width=8)
    table.add_column("bert p", justify="right", no_wrap=True)
    table.add_column("tier", no_wrap=True, min_width=4)
    table.add_column("why", no_wrap=True, min_width=14)
    for message, decision in rows:
        top = max(decision.scores.values())
        why = decision.reason.value.replace("_", " ")
        if decision.llm_skipped is not None:
            why += f" ({decision.llm_skipped.value.replace('_', ' ')})"
        tier = decision.tier.value + (" ·cache" if decision.cached else "")
        cells = [decision.id, excerpt(message.text, room)]
        if expected:
            gold = str(message.metadata.get("label", ""))
            style = "green" if gold in decision.labels else "red"
            cells.append(gold)
            cells.append(f"[{style}]{', '.join(decision.labels) or '-'}[/]")
        else:
            cells.append(", ".join(decision.labels) or "-")
        cells += [f"{top:.2f}", tier, why]
        table.add_row(*cells)
    return table
