"""``tiergate classify``: the embedded cascade over texts, a file, or standard input."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO, Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from tiergate.gateway.cli.embedded import (
    MODEL_OPTION,
    load_serving_classifier,
    open_cascade_or_exit,
    settings_with_policies,
)
from tiergate.gateway.cli.errors import REJECTED, err, fail, guarded
from tiergate.gateway.cli.inputs import (
    CHUNK,
    argument_messages,
    chunks,
    count_records,
    stream_items,
)
from tiergate.gateway.cli.output import decision_table, open_output
from tiergate.gateway.cli.tally import Tally, print_summary, write_answers
from tiergate.workers.cascade import Cascade
from tiergate.workers.errors import RecordError, TiergateError
from tiergate.workers.records import InputFormat, detect_format, read_bytes
from tiergate.workers.schemas import Decision, Message


def classify(
    texts: Annotated[list[str] | None, typer.Argument(help="Texts to classify.")] = None,
    input_file: Annotated[
        Path | None,
        typer.Option("--input", "-i", help="A JSONL or CSV file of messages ('-' = stdin)."),
    ] = None,
    output_file: Annotated[
        Path | None, typer.Option("--output", "-o", help="Write JSONL decisions here.")
    ] = None,
    fmt: Annotated[
        InputFormat | None,
        typer.Option("--format", help="Input layout; guessed from the extension or content."),
    ] = None,
    model: Annotated[Path | None, MODEL_OPTION] = None,
    text_field: Annotated[str, typer.Option(help="The field holding the text.")] = "text",
    id_field: Annotated[str, typer.Option(help="The field holding the message id.")] = "id",
    table: Annotated[bool, typer.Option("--table", help="Print a table, not JSONL.")] = False,
    policy: Annotated[
        list[Path] | None,
        typer.Option(help="Policy file (repeatable; the first is the default policy)."),
    ] = None,
    cache: Annotated[
        bool, typer.Option(help="Reuse and store decisions in the decision cache.")
    ] = True,
) -> None:
    """Classify texts given as arguments, in a file, or on standard input.

    Writes one JSON line per input record, in input order: a decision, or ``{"line", "error"}``
    for a record that was rejected. A closing summary goes to standard error.
    """
    if texts and input_file is not None:
        raise fail("give texts as arguments or --input FILE, not both")
    settings = settings_with_policies(policy)
    if texts:
        argument_messages(texts)  # reject empty texts before loading anything
        cascade = open_cascade_or_exit(
            settings, load_serving_classifier(settings, model), use_cache=cache
        )
        _classify_arguments(texts, cascade, output_file, table=table)
        return

    from_stdin = input_file is None or str(input_file) == "-"
    if from_stdin and sys.stdin.isatty():
        raise fail("give texts as arguments, --input FILE, or messages on standard input")
    path = None if from_stdin else input_file
    data = sys.stdin.buffer.read() if path is None else guarded(lambda: read_bytes(path))
    layout = fmt or detect_format(path, data[:64])
    source = "standard input" if path is None else str(path)
    cascade = open_cascade_or_exit(
        settings, load_serving_classifier(settings, model), use_cache=cache
    )
    tally = Tally()
    rows: list[tuple[Message, Decision]] = []
    started = time.perf_counter()
    items = stream_items(
        data,
        layout,
        text_field=text_field,
        id_field=id_field,
        source=source,
        policies=cascade.policies,
    )
    total = count_records(data, layout)
    progress = Progress(
        TextColumn("classifying"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=err,
        disable=path is None,
        transient=True,
    )
    with progress, open_output(output_file, table=table) as out:
        task = progress.add_task("classify", total=total)

        def advance(n: int) -> None:
            progress.update(task, advance=n)

        try:
            for batch in chunks(items, CHUNK):
                decisions = _run_items(cascade, batch, out, tally, advance)
                if table:
                    messages = [m for m in batch if isinstance(m, Message)]
                    rows += zip(messages, decisions, strict=True)
        except TiergateError as exc:
            raise fail(str(exc)) from None
    seconds = time.perf_counter() - started
    if table:
        Console().print(decision_table(rows))
    print_summary(tally, seconds)
    if tally.rejected:
        raise typer.Exit(REJECTED)


def _classify_arguments(
    texts: Sequence[str],
    cascade: Cascade,
    output_file: Path | None,
    *,
    table: bool,
) -> None:
    messages = argument_messages(texts)
    tally = Tally()
    started = time.perf_counter()
    with open_output(output_file, table=table) as out:
        decisions = guarded(lambda: _run_items(cascade, messages, out, tally, lambda _: None))
    seconds = time.perf_counter() - started
    if table:
        Console().print(decision_table(list(zip(messages, decisions, strict=True))))
    print_summary(tally, seconds)


def _run_items(
    cascade: Cascade,
    items: Sequence[Message | RecordError],
    out: IO[str],
    tally: Tally,
    on_progress: Callable[[int], None],
) -> list[Decision]:
    """Decide the messages of ``items``, write every item's line, and report their number."""
    decisions = cascade.decide([item for item in items if isinstance(item, Message)])
    write_answers(items, decisions, out, tally)
    on_progress(len(items))
    return decisions
