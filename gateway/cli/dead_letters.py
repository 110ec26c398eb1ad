"""``tiergate dead-letters list`` and ``replay``: the messages a distributed tiergate gave up on."""

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
from tiergate.workers.ledger import RedisDecisionLedger, held_messages
from tiergate.workers.schemas import Message
from tiergate.workers.settings import Settings

dead_letters_app = typer.Typer(
    help="Read and replay the dead letters (distributed mode).", no_args_is_help=True
)


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
    """Show the dead letters: when, why, and the message id where there is one."""
    ledger = _dead_letter_ledger()
    entries = guarded(lambda: ledger.dead_letters(limit))
    if as_json:
        for entry in entries:
            sys.stdout.write(json.dumps(entry, ensure_ascii=False) + "\n")
        return
    table = Table(title=f"{len(entries)} dead letter(s), newest first")
    for column in ("at (UTC)", "reason", "message id", "replayable"):
        table.add_column(column)
    for entry in entries:
        at = datetime.fromtimestamp(float(entry.get("at", 0)), tz=UTC)
        message = _dead_message(entry.get("payload"))
        table.add_row(
            at.strftime("%Y-%m-%d %H:%M:%S"),
            excerpt(str(entry.get("reason", "")), 80),
            message.id if message else "-",
            "yes" if message else "no",
        )
    Console().print(table)


@dead_letters_app.command("replay")
def dead_letters_replay(
    limit: Annotated[int, typer.Option(min=1, help="Replay at most this many.")] = 1000,
) -> None:
    """Publish the dead letters that hold a message again, and remove them from the list.

    Run it once the cause is fixed (a policy deployed, a provider key set). A message whose id
    was answered meanwhile is not answered twice. Dead letters that hold no message (a
    webhook that gave up, a payload that never was a message) stay in the list.
    """
    from tiergate.gateway.client import TiergateClient  # noqa: PLC0415

    settings = Settings()
    if settings.broker_url is None or settings.redis_url is None:
        raise fail("replay needs TIERGATE_BROKER_URL and TIERGATE_REDIS_URL")
    client = guarded(lambda: TiergateClient.from_settings(settings))
    ledger = client.ledger
    replayed = kept = 0
    for stored, entry in guarded(lambda: ledger.dead_letter_entries(limit)):
        message = _dead_message(entry.get("payload"))
        if message is None:
            kept += 1
            continue
        guarded(partial(client.submit_many, [message]))
        guarded(partial(ledger.discard_dead_letter, stored))
        replayed += 1
    err.print(f"replayed {replayed} message(s); kept {kept} dead letter(s) that hold no message")
