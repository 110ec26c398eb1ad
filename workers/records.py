"""Reading messages and labelled examples from JSONL, CSV or plain-text input.

Every physical input is accounted for: :func:`read_records` yields either a :class:`Record` or a
:class:`~tiergate.workers.errors.RecordError` carrying the 1-based line number where the bad record
starts, so a caller can answer the good ones and report each bad one. Bytes that are not UTF-8
are reported per record, not for the whole file.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterator
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

from tiergate.workers.errors import DataFileError, RecordError

# CSV fields of long texts can exceed the csv module's 128 KiB default.
csv.field_size_limit(1 << 26)


class InputFormat(StrEnum):
    """How an input stream is laid out."""

    JSONL = "jsonl"  # one JSON object per line
    CSV = "csv"  # a header row, then one record per row (fields may span lines)
    TEXT = "text"  # one message text per line


@dataclass(frozen=True)
class Record:
    """One input record: its fields and the line it starts on."""

    line: int
    fields: dict[str, Any]


def detect_format(path: Path | None, head: bytes) -> InputFormat:
    """Guess the format from the file extension, else from the first non-blank byte."""
    if path is not None:
        suffix = path.suffix.lower()
        if suffix in {".jsonl", ".ndjson", ".json"}:
            return InputFormat.JSONL
        if suffix == ".csv":
            return InputFormat.CSV
        if suffix == ".txt":
            return InputFormat.TEXT
    stripped = head.removeprefix(b"\xef\xbb\xbf").lstrip()
    if stripped.startswith(b"{"):
        return InputFormat.JSONL
    return InputFormat.TEXT


def read_bytes(path: Path) -> bytes:
    """The file's bytes, or a :class:`DataFileError` that names the problem."""
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise DataFileError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise DataFileError(f"{path}: is a directory, not a file") from None
    except OSError as exc:
        raise DataFileError(f"{path}: cannot be read ({exc.strerror})") from None


def read_records(
    data: bytes,
    fmt: InputFormat,
    *,
    required: tuple[str, ...] = (),
    source: str = "input",
    text_field: str = "text",
) -> Iterator[Record | RecordError]:
    """Parse ``data`` into records, yielding an error in place of each bad one.

    Args:
        data: the whole input.
        fmt: its layout.
        required: columns a CSV header must have (checked once, before any record).
        source: how to name the input in errors.
        text_field: the field a plain-text line becomes.

    Raises:
        DataFileError: the CSV header lacks a required column, is malformed or not UTF-8, or
            the input has no header.
    """
    if fmt is InputFormat.CSV:
        yield from _read_csv(data, required=required, source=source)
    else:
        yield from _read_lines(data, fmt, text_field=text_field)


def _read_lines(
    data: bytes, fmt: InputFormat, *, text_field: str
) -> Iterator[Record | RecordError]:
    lines = data.removeprefix(b"\xef\xbb\xbf").split(b"\n")  # a UTF-8 BOM is not content
    if lines and lines[-1] == b"":
        lines.pop()  # the newline that ends the last line does not start another
    for number, raw in enumerate(lines, start=1):
        raw_line = raw.removesuffix(b"\r")
        try:
            line = raw_line.decode("utf-8")
        except UnicodeDecodeError as exc:
            yield RecordError(number, f"not valid UTF-8 (byte {exc.start + 1} of the line)")
            continue
        if fmt is InputFormat.TEXT:
            yield Record(number, {text_field: line})
            continue
        if not line.strip():
            yield RecordError(number, "blank line where a JSON object was expected")
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as exc:
            yield RecordError(number, f"malformed JSON: {exc.msg} at column {exc.colno}")
            continue
        except RecursionError:
            yield RecordError(number, "malformed JSON: nested too deeply")
            continue
        except ValueError:  # an integer past Python's int-from-string digit limit
            yield RecordError(number, "malformed JSON: a number has too many digits")
            continue
        if not isinstance(value, dict):
            yield RecordError(number, f"expected a JSON object, got {_json_type(value)}")
            continue
        yield Record(number, value)


def _read_csv(
    data: bytes, *, required: tuple[str, ...], source: str
) -> Iterator[Record | RecordError]:
    text = data.decode("utf-8", errors="surrogateescape").removeprefix("\ufeff")
    # strict: an unclosed quote is an error at its record, not a field swallowing the rest
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    try:
        header = next(reader)
    except StopIteration:
        raise DataFileError(f"{source}: empty CSV, expected a header row") from None
    except csv.Error as exc:
        raise DataFileError(f"{source}: malformed CSV header row: {exc}") from None
    if any(_has_surrogates(name) for name in header):
        # Column names become fields (and metadata keys) of every record: no record is usable.
        raise DataFileError(f"{source}: the CSV header row is not valid UTF-8")
    missing = [name for name in required if name not in header]
    if missing:
        raise DataFileError(
            f"{source}: CSV header lacks column {', '.join(map(repr, missing))} "
            f"(it has {', '.join(map(repr, header))})"
        )
    start = reader.line_num + 1
    while True:
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:
            yield RecordError(start, f"malformed CSV: {exc}")
            start = reader.line_num + 1
            continue
        line, start = start, reader.line_num + 1
        if not row:
            yield RecordError(line, "blank line where a CSV record was expected")
            continue
        if len(row) != len(header):
            yield RecordError(line, f"has {len(row)} fields, the header has {len(header)}")
            continue
        if any(_has_surrogates(value) for value in row):
            yield RecordError(line, "not valid UTF-8")
            continue
        yield Record(line, dict(zip(header, row, strict=True)))


def _has_surrogates(value: str) -> bool:
    return any(0xD800 <= ord(ch) <= 0xDFFF for ch in value)


def _json_type(value: object) -> str:
    names = {list: "an array", str: "a string", bool: "a boolean", type(None): "null"}
    return names.get(type(value), "a number")
