"""Shared fixtures: real models built once per test session.

``trained_model`` fine-tunes the default base checkpoint (all-MiniLM-L6-v2) on a small real
subset of the Rotten Tomatoes corpus through ``train_model`` (the same path as ``tiergate
train``), so tests of the BERT tier and the CLI run against a real ONNX model. ``tiny_model`` is
a randomly initialised two-layer DistilBERT with a 32-token window, exported through the same
path: fast, and small enough that chunking is easy to trigger.
"""

from __future__ import annotations

import random
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis

from cluster import RedisServer
from workers.bert.dataset import LabelledExample
from workers.bert.default_model import LABELS, base_model_dir, load_default_splits
from workers.bert.train import ModelCard, TrainOptions, train_model


@dataclass(frozen=True)
class TrainedModel:
    """A model directory, its card, and the held-out examples it was measured on."""

    directory: Path
    card: ModelCard
    validation: list[LabelledExample]
    test: list[LabelledExample]


def _sample(
    examples: Sequence[LabelledExample], per_label: int, seed: int
) -> list[LabelledExample]:
    """A seeded sample of ``per_label`` short examples of each label (chance is 1 / labels)."""
    rng = random.Random(seed)
    by_label: dict[str, list[LabelledExample]] = {}
    for example in examples:
        if len(example.text) < 400:  # short snippets keep the training test fast
            by_label.setdefault(example.labels[0], []).append(example)
    picked = []
    for group in by_label.values():
        picked += rng.sample(group, min(per_label, len(group)))
    rng.shuffle(picked)
    return picked


@pytest.fixture(scope="session")
def trained_model(tmp_path_factory: pytest.TempPathFactory) -> TrainedModel:
    """MiniLM-L6 fine-tuned on 750 real snippets; measured on 300 held-out ones."""
    splits = load_default_splits()
    train = _sample(splits.train, 250, seed=1)
    validation = _sample(splits.validation, 60, seed=2)
    test = _sample(splits.test, 100, seed=3)
    directory = tmp_path_factory.mktemp("models") / "small"
    options = TrainOptions(
        base_model=base_model_dir(),
        output=directory,
        labels=LABELS,
        name="small-rt",
        epochs=2,
        batch_size=16,
        learning_rate=1e-4,
        max_length=128,
        show_progress=False,
    )
    card = train_model(options, train, validation, test)
    return TrainedModel(directory=directory, card=card, validation=validation, test=test)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random two-layer DistilBERT with a 32-token window, as a tiergate model directory."""
    from transformers import (
        AutoTokenizer,
        DistilBertConfig,
        DistilBertForSequenceClassification,
    )

    root = tmp_path_factory.mktemp("tiny")
    checkpoint = root / "distilbert"
    tokenizer = AutoTokenizer.from_pretrained(str(base_model_dir()))
    config = DistilBertConfig(
        vocab_size=tokenizer.vocab_size,
        dim=32,
        hidden_dim=64,
        n_layers=2,
        n_heads=2,
        max_position_embeddings=64,
        num_labels=3,
    )
    DistilBertForSequenceClassification(config).save_pretrained(str(checkpoint))
    tokenizer.save_pretrained(str(checkpoint))
    examples = [
        LabelledExample(text=f"message number {i} about {word}", labels=(label,), line=i + 1)
        for i, (word, label) in enumerate(
            [("refunds", "billing"), ("passwords", "account"), ("crashes", "bug")] * 8
        )
    ]
    options = TrainOptions(
        base_model=checkpoint,
        output=root / "model",
        labels=("account", "billing", "bug"),
        name="tiny-distilbert",
        epochs=1,
        batch_size=8,
        max_length=32,
        min_agreement=0.0,  # a random model's logits are near ties; closeness is asserted instead
        save_checkpoint=True,
        show_progress=False,
    )
    train_model(options, examples[:18], examples[18:])
    return root / "model"


@pytest.fixture
def redis_prefix() -> Iterator[str]:
    """A fresh key prefix in the local Redis; every key under it is deleted afterwards."""
    prefix = f"tiergate-test-{uuid.uuid4().hex}"
    yield prefix
    client = redis.Redis(host="127.0.0.1", port=6379)
    keys = list(client.scan_iter(match=f"{prefix}:*"))
    if keys:
        client.delete(*keys)
    client.close()


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A Redis server of this test's own (started), stopped after the test."""
    directory = tmp_path / "redis"
    directory.mkdir()
    server = RedisServer(directory)
    server.start()
    yield server
    server.stop()
