"""``tiergate submit``: publish a file of messages through the broker and collect the decisions."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from tiergate.gateway.cli.errors import REJECTED, err, fail, guarded
from tiergate.gateway.cli.inputs import CHUNK, chunks, stream_items
from tiergate.gateway.cli.output import open_output
from tiergate.gateway.cli.tally import Tally, print_summary, write_answers
from tiergate.workers.ledger import IdReused
from tiergate.workers.records import detect_format, read_bytes
from tiergate.workers.schemas import Decision, Message
from tiergate.workers.settings import Settings


def submit(
    input_file: Annotated[Path, typer.Argument(help="A JSONL or CSV file of messages.")],
    output_file: Annotated[
        Path | None, typer.Option("--output", "-o", help="Write decisions here (JSONL).")
    ] = None,
    timeout: Annotated[
        float, typer.Option(min=0.0, help="Seconds to wait for all decisions.")
    ] = 600.0,
    text_field: Annotated[str, typer.Option(help="The field holding the text.")] = "text",
    id_field: Annotated[str, typer.Option(help="The field holding the message id.")] = "id",
) -> None:
    """Publish a file of messages through the broker and report as decisions come back.

    Messages keep their file ids (records without one get ``line-N``), so submitting a file
    twice is answered once per id: the second run publishes them no more and reports them as
    answered earlier, at no LLM cost; an id answered before for another text is rejected. Exit
    codes as for ``classify``; a message not answered within ``--timeout`` counts as rejected.
    """
    from tiergate.gateway.client import TiergateClient  # noqa: PLC0415

    settings = Settings()
    if settings.broker_url is None or settings.redis_url is None:
        raise fail("submit needs TIERGATE_BROKER_URL and TIERGATE_REDIS_URL")
    data = guarded(lambda: read_bytes(input_file))
    layout = detect_format(input_file, data[:64])
    items = list(
        stream_items(data, layout, text_field=text_field, id_field=id_field, source=str(input_file))
    )
    messages = [item for item in items if isinstance(item, Message)]
    client = guarded(lambda: TiergateClient.from_settings(settings))
    # Ids answered before this run get their earlier decision back, paid for then, and are not
    # published again; an id answered for another text is refused.
    found: list[Decision | IdReused | None] = []
    for chunk in chunks(messages, CHUNK):
        found += client.answers_for(chunk)
    answered_earlier = {answer.id for answer in found if isinstance(answer, Decision)}
    fresh = [i for i, answer in enumerate(found) if answer is None]
    tally = Tally()
    started = time.perf_counter()
    deadline = time.monotonic() + timeout
    progress = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=err,
        transient=True,
    )
    with progress, open_output(output_file) as out:
        pending = [messages[i] for i in fresh]
        published = progress.add_task("publishing", total=len(pending))
        for chunk in chunks(pending, CHUNK):
            client.submit_many(chunk)
            progress.update(published, advance=len(chunk))
        answered = progress.add_task("answered", total=len(pending))
        waited: list[Decision | IdReused | None] = []
        for chunk in chunks(pending, CHUNK):  # in chunks, so that the bar moves
            left = max(0.0, deadline - time.monotonic())
            waited += client.wait_for(chunk, left)
            progress.update(answered, advance=len(chunk))
        for i, answer in zip(fresh, waited, strict=True):
            found[i] = answer
        write_answers(items, found, out, tally, answered_earlier)
    print_summary(tally, time.perf_counter() - started)
    if tally.rejected:
        raise typer.Exit(REJECTED)
