"""``tiergate dead-letters``: list, show, replay and discard the messages tiergate gave up on."""

from __future__ import annotations

import json
import sys
from datetime import UTC, datetime
from functools import partial
from typing import Annotated, Any

import typer
from pydantic import ValidationError
from rich.console import Console
from rich.table import Table

from tiergate.gateway.cli.errors import err, fail, guarded
from tiergate.gateway.cli.output import excerpt
from tiergate.workers.ledger import (
    DeadLetterKind,
    RedisDecisionLedger,
    held_message_id,
    held_messages,
)
from tiergate.workers.schemas import Message
from tiergate.workers.settings import Settings

dead_letters_app = typer.Typer(
    help="Read, replay and discard the dead letters (distributed mode).", no_args_is_help=True
)

# Letters replay leaves alone: their message would only be dead-lettered again.
_NOT_REPLAYED = {DeadLetterKind.ID_REUSED.value}


def _dead_letter_ledger() -> RedisDecisionLedger:
    settings = Settings()
    if settings.redis_url is None:
        raise fail("dead letters are kept in Redis: set TIERGATE_REDIS_URL")
    return RedisDecisionLedger.from_settings(settings)


def _dead_message(payload: Any) -> Message | None:
    """The message a dead letter holds, if any (see ``held_messages``)."""
    for candidate in held_messages(payload):
        try:
            return Message.model_validate(candidate)
        except ValidationError:
            continue
    return None


@dead_letters_app.command("list")
def dead_letters_list(
    limit: Annotated[int, typer.Option(min=1, help="How many, newest first.")] = 100,
    as_json: Annotated[bool, typer.Option("--json", help="JSON lines instead of a table.")] = False,
) -> None:
    """Show the dead letters: when, why, and the message id wherever the payload has one.

    ``--json`` writes each letter whole, with ``message_id`` added.
    """
    ledger = _dead_letter_ledger()
    entries = guarded(lambda: ledger.dead_letters(limit))
    if as_json:
        for entry in entries:
            found = {**entry, "message_id": held_message_id(entry.get("payload"))}
            sys.stdout.write(json.dumps(found, ensure_ascii=False) + "\n")
        return
    table = Table(title=f"{len(entries)} dead letter(s), newest first")
    for column in ("at (UTC)", "reason", "kind", "message id", "replayable"):
        table.add_column(column, overflow="fold")
    for entry in entries:
        at = datetime.fromtimestamp(float(entry.get("at", 0)), tz=UTC)
        replayable = _replayable(entry) is not None
        table.add_row(
            at.strftime("%Y-%m-%d %H:%M:%S"),
            excerpt(str(entry.get("reason", "")), 80),
            str(entry.get("kind") or "-"),
            held_message_id(entry.get("payload")) or "-",
            "yes" if replayable else "no",
        )
    Console().print(table)


@dead_letters_app.command("show")
def dead_letters_show(
    message_id: Annotated[str, typer.Argument(help="The message id, as `list` shows it.")],
    limit: Annotated[int, typer.Option(min=1, help="Search this many, newest first.")] = 100_000,
) -> None:
    """Print every dead letter of a message id whole, as JSON lines (payload, reason, kind, at)."""
    ledger = _dead_letter_ledger()
    found = [
        entry
        for entry in guarded(lambda: ledger.dead_letters(limit))
        if held_message_id(entry.get("payload")) == message_id
    ]
    if not found:
        raise fail(f"no dead letter holds message id {message_id!r}")
    for entry in found:
        sys.stdout.write(json.dumps(entry, ensure_ascii=False) + "\n")


@dead_letters_app.command("discard")
def dead_letters_discard(
    message_id: Annotated[
        str | None, typer.Argument(help="Discard the letters of this message id.")
    ] = None,
    kind: Annotated[
        str | None,
        typer.Option(help=f"Discard every letter of this kind ({', '.join(DeadLetterKind)})."),
    ] = None,
    limit: Annotated[int, typer.Option(min=1, help="Search this many, newest first.")] = 100_000,
) -> None:
    """Remove dead letters for good: those of a message id, or every one of a ``--kind``."""
    if (message_id is None) == (kind is None):
        raise fail("name a message id or --kind (one of them)")
    if kind is not None and kind not in set(DeadLetterKind):
        raise fail(f"unknown kind {kind!r}; the kinds are {', '.join(DeadLetterKind)}")
    ledger = _dead_letter_ledger()
    discarded = 0
    for stored, entry in guarded(lambda: ledger.dead_letter_entries(limit)):
        if message_id is not None and held_message_id(entry.get("payload")) != message_id:
            continue
        if kind is not None and entry.get("kind") != kind:
            continue
        discarded += guarded(partial(ledger.discard_dead_letter, stored))
    err.print(f"discarded {discarded} dead letter(s)")


def _replayable(entry: dict[str, Any]) -> Message | None:
    """The message replay would publish for a dead letter, if any."""
    if entry.get("kind") in _NOT_REPLAYED:
        return None
    return _dead_message(entry.get("payload"))


@dead_letters_app.command("replay")
def dead_letters_replay(
    limit: Annotated[int, typer.Option(min=1, help="Replay at most this many.")] = 1000,
) -> None:
    """Publish the dead letters that hold a message again, and remove them from the list.

    Run it once the cause is fixed (a policy deployed, a provider key set, a producer that now
    sends the right arguments). A message whose id was answered meanwhile is not answered twice.
    Dead letters that hold no message (a webhook that gave up, a payload that never was a
    message) and those of an id answered for another text stay in the list.
    """
    from tiergate.gateway.client import TiergateClient  # noqa: PLC0415

    settings = Settings()
    if settings.broker_url is None or settings.redis_url is None:
        raise fail("replay needs TIERGATE_BROKER_URL and TIERGATE_REDIS_URL")
    client = guarded(lambda: TiergateClient.from_settings(settings))
    ledger = client.ledger
    replayed = kept = 0
    for stored, entry in guarded(lambda: ledger.dead_letter_entries(limit)):
        message = _replayable(entry)
        if message is None:
            kept += 1
            continue
        guarded(partial(client.submit_many, [message]))
        guarded(partial(ledger.discard_dead_letter, stored))
        replayed += 1
    err.print(
        f"replayed {replayed} message(s); kept {kept} dead letter(s) that hold no message to replay"
    )
