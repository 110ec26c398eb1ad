"""``tiergate feedback FILE``: people's corrections of decisions, from a JSONL file.

Each line is ``{"id": ..., "label": ...}`` (or ``"labels": [...]`` for a multi-label policy)
with an optional ``"source"`` (who corrects). Each goes to the label store that the settings
name (Redis with ``TIERGATE_REDIS_URL``, else the embedded SQLite file), exactly as
``POST /v1/feedback`` does: it outranks the LLM's label and deletes the cached decision.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer
from pydantic import BaseModel, ConfigDict, Field, StrictStr, ValidationError

from tiergate.gateway.cli.errors import REJECTED, err, fail, guarded
from tiergate.gateway.cli.output import error_line
from tiergate.workers.errors import InputError, RecordError, TransientError
from tiergate.workers.labels import CollectedExample, Corrections
from tiergate.workers.records import InputFormat, Record, read_bytes, read_records
from tiergate.workers.settings import Settings

Name = Annotated[StrictStr, Field(min_length=1, max_length=256)]


class FeedbackLine(BaseModel):
    """One correction of a feedback file (the body of ``POST /v1/feedback``)."""

    model_config = ConfigDict(extra="forbid")

    id: Name
    label: Name | None = None
    labels: list[Name] | None = None
    source: Name | None = None

    def given(self) -> list[str]:
        """The labels given, or ``ValueError`` unless exactly one of label and labels is."""
        if (self.label is None) == (self.labels is None):
            raise ValueError("give either 'label' or 'labels' (one of them)")
        return [self.label] if self.label is not None else list(self.labels or [])


def feedback(
    file: Annotated[Path, typer.Argument(help="JSONL: {id, label | labels, source?} per line.")],
) -> None:
    """Correct decisions by message id: a person's label outranks the LLM's.

    Writes one JSON line per input line, in order: the stored correction (``line``, ``id``,
    ``labels``, ``source``, ``policy``), or ``{"line", "error"}`` for a line that was rejected
    (malformed, an unknown or expired id, a label outside the policy). Exit code 1 when some
    line was rejected, 2 when the file cannot be read or the store is unreachable.
    """
    data = guarded(lambda: read_bytes(file))
    corrections = Corrections.from_settings(Settings())
    corrected = rejected = 0
    try:
        for item in read_records(data, InputFormat.JSONL, source=str(file)):
            try:
                example = _apply(corrections, item)
            except RecordError as exc:
                sys.stdout.write(error_line(exc))
                rejected += 1
                continue
            assert isinstance(item, Record)
            sys.stdout.write(_corrected_line(item.line, item.fields["id"], example))
            corrected += 1
    except TransientError as exc:
        raise fail(str(exc)) from None
    finally:
        corrections.close()
    err.print(f"corrected {corrected}, rejected {rejected}")
    if rejected:
        raise typer.Exit(REJECTED)


def _apply(corrections: Corrections, item: Record | RecordError) -> CollectedExample:
    """Store one line's correction; a :class:`RecordError` naming the line when it is refused."""
    if isinstance(item, RecordError):
        raise item
    try:
        line = FeedbackLine.model_validate(item.fields)
        labels = line.given()
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"]) or "record"
        raise RecordError(item.line, f"{where!r}: {first['msg']}") from None
    except ValueError as exc:
        raise RecordError(item.line, str(exc)) from None
    try:
        return corrections.correct(line.id, labels, line.source)
    except InputError as exc:
        raise RecordError(item.line, str(exc)) from None


def _corrected_line(line: int, message_id: str, example: CollectedExample) -> str:
    stored = {
        "line": line,
        "id": message_id,
        "labels": example.labels,
        "source": example.source,
        "policy": example.policy,
    }
    return json.dumps(stored, ensure_ascii=False) + "\n"
