"""Labelled examples for training and evaluation, read strictly from JSONL or CSV files.

A single-label file has a text column and a label column (``text`` and ``label`` by default). A
multi-label file has a labels column instead (``labels``): a JSON array of strings in JSONL, or
labels separated by ``|`` in CSV. Training refuses a bad file at its first bad record, naming the
file and the line, rather than training on part of it.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from tiergate.workers.errors import DataFileError, RecordError
from tiergate.workers.records import InputFormat, Record, detect_format, read_bytes, read_records


@dataclass(frozen=True)
class LabelledExample:
    """One training or evaluation example.

    ``id`` is the record's ``id`` field when it has one (evaluation joins recorded LLM answers
    on it), else ``line-<n>``.
    """

    text: str
    labels: tuple[str, ...]
    line: int
    id: str = ""

    @property
    def message_id(self) -> str:
        """The id to key this example by."""
        return self.id or f"line-{self.line}"


@dataclass(frozen=True)
class Columns:
    """Which columns hold the text and the label(s)."""

    text: str = "text"
    label: str = "label"
    labels: str = "labels"


def load_labelled(
    path: Path, *, columns: Columns, multi_label: bool, known_labels: Sequence[str] | None = None
) -> list[LabelledExample]:
    """Read every example of a labelled file.

    Args:
        path: a ``.jsonl`` or ``.csv`` file.
        columns: the column names.
        multi_label: read the labels column (a list) instead of the label column.
        known_labels: when given, a label outside this set is an error.

    Raises:
        DataFileError: the file is missing, unreadable, lacks a column, has no examples, or a
            record is invalid (the message names the line).
    """
    data = read_bytes(path)
    fmt = detect_format(path, data[:64])
    if fmt is InputFormat.TEXT:
        raise DataFileError(f"{path}: labelled data must be .jsonl or .csv")
    label_column = columns.labels if multi_label else columns.label
    known = set(known_labels) if known_labels is not None else None
    examples = []
    for item in read_records(data, fmt, required=(columns.text, label_column), source=str(path)):
        if isinstance(item, RecordError):
            raise DataFileError(f"{path}: {item}")
        example = _example(item, columns.text, label_column, multi_label=multi_label, fmt=fmt)
        if isinstance(example, RecordError):
            raise DataFileError(f"{path}: {example}")
        if known is not None:
            unknown = [label for label in example.labels if label not in known]
            if unknown:
                raise DataFileError(
                    f"{path}: line {example.line}: unknown label {unknown[0]!r} "
                    f"(known: {', '.join(sorted(known))})"
                )
        examples.append(example)
    if not examples:
        raise DataFileError(f"{path}: no examples")
    return examples


def _example(
    record: Record, text_column: str, label_column: str, *, multi_label: bool, fmt: InputFormat
) -> LabelledExample | RecordError:
    fields = record.fields
    if text_column not in fields:
        return RecordError(record.line, f"missing field {text_column!r}")
    if label_column not in fields:
        return RecordError(record.line, f"missing field {label_column!r}")
    text = fields[text_column]
    if not isinstance(text, str):
        return RecordError(record.line, f"{text_column!r} must be a string")
    if not text.strip():
        return RecordError(record.line, f"{text_column!r} is empty or only whitespace")
    raw = fields[label_column]
    labels: tuple[str, ...]
    if multi_label:
        if fmt is InputFormat.CSV and isinstance(raw, str):
            raw = [part.strip() for part in raw.split("|") if part.strip()]
        if not isinstance(raw, list) or not all(isinstance(x, str) and x.strip() for x in raw):
            return RecordError(record.line, f"{label_column!r} must be a list of label names")
        labels = tuple(dict.fromkeys(raw))
    else:
        if isinstance(raw, bool) or not isinstance(raw, str | int):
            return RecordError(record.line, f"{label_column!r} must be a label name")
        label = str(raw).strip()
        if not label:
            return RecordError(record.line, f"{label_column!r} is empty")
        labels = (label,)
    raw_id = fields.get("id")
    usable_id = isinstance(raw_id, str | int) and not isinstance(raw_id, bool)
    example_id = str(raw_id) if usable_id else ""
    return LabelledExample(text=text, labels=labels, line=record.line, id=example_id)


def label_set(examples: Sequence[LabelledExample]) -> list[str]:
    """Every label that occurs, sorted."""
    return sorted({label for example in examples for label in example.labels})


# Below this many training examples a label's head is barely trained: training warns and the
# model card lists the label under ``rare_labels``.
MIN_TRAINING_EXAMPLES = 5


def rare_labels(
    examples: Sequence[LabelledExample],
    labels: Sequence[str],
    minimum: int = MIN_TRAINING_EXAMPLES,
) -> dict[str, int]:
    """Each of ``labels`` with fewer than ``minimum`` examples, mapped to its count (maybe 0)."""
    counts = Counter(label for example in examples for label in example.labels)
    return {label: counts[label] for label in labels if counts[label] < minimum}
