"""``tiergate batches list``: the unfinished LLM batches of batch-mode policies, with their age."""

from __future__ import annotations

import json
import sys
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from tiergate.gateway.cli.errors import fail, guarded
from tiergate.workers.batches import BatchStore, outstanding_json
from tiergate.workers.settings import Settings

batches_app = typer.Typer(
    help="The LLM batches of batch-mode policies (distributed mode).", no_args_is_help=True
)


@batches_app.command("list")
def batches_list(
    as_json: Annotated[bool, typer.Option("--json", help="JSON lines instead of a table.")] = False,
) -> None:
    """Show the outstanding batches (oldest first) and the work waiting for the next one.

    A batch is ``claimed`` (its messages taken from the queue), ``submitting`` (being sent, or
    sent by a worker that died before recording it: the next LLM worker looks it up) or
    ``submitted`` (at the provider, polled until it ends). ``--json`` writes one object per
    batch, then one per policy with waiting work (``"waiting": true``).
    """
    settings = Settings()
    if settings.redis_url is None:
        raise fail("batches are tracked in Redis: set TIERGATE_REDIS_URL")
    store = BatchStore.from_settings(settings)
    batches = guarded(lambda: outstanding_json(store))
    waiting = guarded(store.waiting)
    if as_json:
        for batch in batches:
            sys.stdout.write(json.dumps(batch) + "\n")
        for policy, (count, since) in waiting.items():
            if count:
                line = {"waiting": True, "policy": policy, "messages": count, "oldest_at": since}
                sys.stdout.write(json.dumps(line) + "\n")
        return
    table = Table(title=f"{len(batches)} outstanding batch(es), oldest first")
    for column in ("batch", "policy", "state", "provider batch", "status", "messages", "age"):
        table.add_column(column, overflow="fold")
    for batch in batches:
        table.add_row(
            str(batch["id"]),
            str(batch["policy"]),
            str(batch["state"]),
            str(batch["provider_batch_id"] or "-"),
            str(batch["provider_status"] or "-"),
            str(batch["messages"]),
            _age(float(batch["age_s"])),
        )
    console = Console()
    console.print(table)
    for policy, (count, _) in waiting.items():
        if count:
            console.print(f"{policy}: {count} message(s) waiting for the next batch")


def _age(seconds: float) -> str:
    """``seconds`` as ``1h02m``, ``3m05s`` or ``12s``."""
    whole = int(seconds)
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"
