"""``tiergate train``: fine-tune a checkpoint on labelled data into an ONNX model directory."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.table import Table

from tiergate.gateway.cli.errors import err, fail, guarded


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
    first_window_only: Annotated[
        bool,
        typer.Option(
            "--first-window-only",
            help="Train on each text's first window only; by default every window of a text "
            "longer than --max-length is a training example, as the tier reads it when serving.",
        ),
    ] = False,
    seed: Annotated[int, typer.Option(help="Seed for shuffling and initialisation.")] = 13,
    name: Annotated[str | None, typer.Option(help="Model name (default: output dir name).")] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing output directory.")] = False,
    checkpoint: Annotated[
        bool, typer.Option(help="Also keep the fine-tuned PyTorch checkpoint.")
    ] = True,
    min_onnx_agreement: Annotated[
        float,
        typer.Option(
            min=0.0,
            max=1.0,
            help="Share of validation examples on which the served ONNX model must pick the "
            "trained model's answer; lower it to accept more differences.",
        ),
    ] = 0.97,
    class_weight: Annotated[
        str | None,
        typer.Option(
            help="Loss weight per label for imbalanced data: 'balanced' (n_examples / (n_labels "
            "* count) on the training split; multi-label: negatives / positives per label) or "
            "'label=3,other=0.5' (labels not named weigh 1). Single-label heads weight the "
            "cross-entropy; multi-label heads use it as BCE pos_weight. The temperature is "
            "fitted afterwards on validation, unweighted.",
        ),
    ] = None,
) -> None:
    """Fine-tune a checkpoint on labelled data and write an ONNX model directory."""
    from tiergate.workers.bert.dataset import Columns, label_set, load_labelled  # noqa: PLC0415
    from tiergate.workers.bert.default_model import base_model_dir  # noqa: PLC0415

    if output.exists() and any(output.iterdir()) and not overwrite:
        raise fail(f"{output} exists; pass --overwrite to replace it")
    columns = Columns(text=text_column, label=label_column, labels=labels_column)
    known = [x.strip() for x in labels.split(",") if x.strip()] if labels else None

    def load(path: Path, known_labels: Sequence[str] | None) -> list[Any]:
        return guarded(
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

        train_examples, validation_examples = guarded(
            lambda: split_validation(train_examples, validation_split, seed)
        )
    test_examples = load(test, label_names) if test is not None else None
    weights = (
        None
        if class_weight is None
        else class_weights(class_weight, train_examples, label_names, multi_label=multi_label)
    )
    base_dir = base if base is not None else guarded(base_model_dir)
    card = run_training(
        base=base_dir,
        output=output,
        labels=tuple(label_names),
        multi_label=multi_label,
        name=name or output.name,
        epochs=epochs,
        batch_size=batch_size,
        learning_rate=learning_rate,
        max_length=max_length,
        all_windows=not first_window_only,
        seed=seed,
        save_checkpoint=checkpoint,
        min_agreement=min_onnx_agreement,
        class_weights=weights,
        data=(train_examples, validation_examples, test_examples),
    )
    print_card(card, output)


def run_training(*, data: tuple[Any, Any, Any], **options: Any) -> Any:
    """Train on ``data`` (train, validation, test examples) with ``TrainOptions(**options)``.

    Returns the model card; a training error exits 2. A label with too few training examples
    is a warning naming it (the card records it as ``rare_labels``), and so, once trained, is a
    label present in validation that the model never predicted there (``never_predicted``).
    """
    from tiergate.workers.bert.dataset import MIN_TRAINING_EXAMPLES, rare_labels  # noqa: PLC0415
    from tiergate.workers.bert.train import TrainOptions, train_model  # noqa: PLC0415

    base = options.pop("base")
    train_examples, validation_examples, test_examples = data
    for label, count in rare_labels(train_examples, options["labels"]).items():
        err.print(
            f"[bold yellow]warning:[/] label {escape(repr(label))} has {count} training example"
            f"{'' if count == 1 else 's'} (under {MIN_TRAINING_EXAMPLES}): its predictions "
            "will be unreliable; add examples of it",
            highlight=False,
            soft_wrap=True,
        )
    train_options = TrainOptions(base_model=base, **options)
    card = guarded(
        lambda: train_model(train_options, train_examples, validation_examples, test_examples)
    )
    for label in card.never_predicted:
        support = card.validation.per_class[label].support
        err.print(
            f"[bold yellow]warning:[/] the model never predicted label {escape(repr(label))} on "
            f"validation ({support} example{'' if support == 1 else 's'} of it there): it "
            "misses that label; add examples of it or train with --class-weight balanced",
            highlight=False,
            soft_wrap=True,
        )
    return card


def class_weights(
    text: str, examples: Sequence[Any], labels: Sequence[str], *, multi_label: bool
) -> dict[str, float]:
    """Every label's loss weight from ``--class-weight``: ``balanced`` or ``label=w,...``.

    ``balanced`` is computed on ``examples`` (the training split); named weights leave the
    other labels at 1. A malformed item, an unknown label or a weight not above 0 exits 2.
    """
    from tiergate.workers.bert.train import (  # noqa: PLC0415
        balanced_class_weights,
        check_class_weights,
    )

    if text.strip() == "balanced":
        return balanced_class_weights(examples, labels, multi_label=multi_label)
    named: dict[str, float] = {}
    for item in text.split(","):
        label, equals, number = item.strip().rpartition("=")
        try:
            weight = float(number)
        except ValueError:
            weight = math.nan
        if not equals or not label.strip() or math.isnan(weight):
            raise fail(
                f"--class-weight: {item.strip()!r} is not label=weight (a number); give "
                "'balanced' or e.g. 'spam=3,ham=1'"
            )
        named[label.strip()] = weight
    guarded(lambda: check_class_weights(named, labels))
    return {label: named.get(label, 1.0) for label in labels}


def print_card(card: Any, directory: Path) -> None:
    """A trained model's card on standard error: metrics per split and per label, and where."""
    from tiergate.gateway.report import per_class_table  # noqa: PLC0415

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
    splits = {"validation": card.validation, "test": card.test}
    err.print(
        per_class_table(
            "per label",
            {split: metrics.per_class for split, metrics in splits.items() if metrics is not None},
        )
    )
    err.print(windows_line(card.training), highlight=False, soft_wrap=True)
    agreement = card.onnx_agreement["argmax_agreement"]
    err.print(
        f"temperature {card.temperature:.3f} · ONNX agrees with torch on {agreement:.1%} "
        f"of validation · trained in {card.training['train_seconds']:.0f} s · written to "
        f"{directory}",
        highlight=False,
        soft_wrap=True,
    )


def windows_line(training: dict[str, Any]) -> str:
    """One line on the long training texts and the windows trained, from the card's record."""
    texts, long_texts = training["examples"], training["texts_with_several_windows"]
    windows = training["windows_trained"]
    head = f"{long_texts:,} of {texts:,} texts longer than one window"
    if training["window_strategy"] == "first":
        return f"{head}: trained on each text's first window only ({windows:,} windows)"
    return f"{head}: trained on all {windows:,} windows"
