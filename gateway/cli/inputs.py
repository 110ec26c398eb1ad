"""Reading what the commands classify: texts given as arguments and records of JSONL or CSV files.

A record becomes a :class:`~tiergate.workers.schemas.Message` or, when it cannot, a
:class:`~tiergate.workers.errors.RecordError` naming its line, so that every input line is
answered in place.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import Any, TypeVar

from pydantic import ValidationError

from tiergate.gateway.cli.errors import fail
from tiergate.workers.cascade import PolicyBook
from tiergate.workers.errors import RecordError, UnknownPolicyError
from tiergate.workers.records import InputFormat, Record, read_records
from tiergate.workers.schemas import Message

CHUNK = 256  # messages per cascade call (or broker round) when reading a file

T = TypeVar("T")


def message_from_record(record: Record, *, text_field: str, id_field: str) -> Message:
    """The message a record holds; other columns are its extra fields.

    :class:`Message` moves extra scalar fields into metadata and refuses others by name.
    """
    payload: dict[str, Any] = dict(record.fields)
    if text_field not in payload:
        raise RecordError(record.line, f"missing field {text_field!r}")
    text = payload.pop(text_field)
    message_id = payload.pop(id_field, None)
    # A ``text`` or ``id`` column that --text-field or --id-field passed over is the record's
    # own data, so it travels in metadata like any other column.
    passed_over = {name: payload.pop(name) for name in ("text", "id") if name in payload}
    metadata = payload.get("metadata", {})
    if passed_over and isinstance(metadata, dict):
        payload["metadata"] = {**passed_over, **metadata}
    payload["text"] = text
    if message_id is None:
        payload["id"] = f"line-{record.line}"
    elif isinstance(message_id, int) and not isinstance(message_id, bool):
        payload["id"] = str(message_id)
    else:
        payload["id"] = message_id
    try:
        return Message.model_validate(payload)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = str(first["loc"][0]) if first["loc"] else "record"
        where = text_field if where == "text" else id_field if where == "id" else where
        reason = first["msg"].removeprefix("Value error, ")
        raise RecordError(record.line, f"{where!r}: {reason}") from None


def argument_messages(texts: Sequence[str]) -> list[Message]:
    """Texts given on the command line as messages ``arg-1``, ``arg-2``, ...; none may be blank."""
    messages = []
    for number, text in enumerate(texts, start=1):
        if not text.strip():
            raise fail(f"text argument {number} is empty or only whitespace")
        messages.append(Message(id=f"arg-{number}", text=text))
    return messages


def stream_items(
    data: bytes,
    fmt: InputFormat,
    *,
    text_field: str,
    id_field: str,
    source: str,
    policies: PolicyBook | None = None,
) -> Iterator[Message | RecordError]:
    """Each record of ``data`` in order: its message, or why it was rejected.

    With ``policies``, a message naming a policy the book does not hold is rejected too.
    """
    required = (text_field,) if fmt is InputFormat.CSV else ()
    for item in read_records(data, fmt, required=required, source=source, text_field=text_field):
        if isinstance(item, RecordError):
            yield item
            continue
        try:
            message = message_from_record(item, text_field=text_field, id_field=id_field)
            if policies is not None:
                policies.get(message.policy)
        except RecordError as exc:
            yield exc
        except UnknownPolicyError as exc:
            yield RecordError(item.line, str(exc))
        else:
            yield message


def count_records(data: bytes, fmt: InputFormat) -> int | None:
    """How many records ``data`` holds, for a progress bar; ``None`` when it cannot tell."""
    if fmt is InputFormat.CSV:
        return None  # fields may span lines; the bar counts without a total
    return data.count(b"\n") + (0 if data.endswith(b"\n") or not data else 1)


def chunks(items: Iterable[T], size: int) -> Iterator[list[T]]:
    """``items`` in lists of ``size`` (the last one shorter), read lazily."""
    batch: list[T] = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch
