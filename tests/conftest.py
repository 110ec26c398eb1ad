"""Shared fixtures: real models built once per test session.

``trained_model`` fine-tunes the default base checkpoint (all-MiniLM-L6-v2) on a small real
subset of the Rotten Tomatoes corpus through ``train_model`` (the same path as ``tiergate
train``), so tests of the BERT tier and the CLI run against a real ONNX model. ``tiny_model`` is
a randomly initialised two-layer DistilBERT with a 32-token window, exported through the same
path: fast, and small enough that chunking is easy to trigger.
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import HealthCheck
from hypothesis import settings as hypothesis_settings

from cluster import Cluster, ClusterFactory, RedisServer, delete_keys, positive_answer
from tiergate.workers.bert.dataset import LabelledExample
from tiergate.workers.bert.default_model import LABELS, base_model_dir, load_default_splits
from tiergate.workers.bert.train import ModelCard, TrainOptions, train_model
from tiergate.workers.llm.testing import FakeLLMServer

# Hypothesis' deadline and its too-slow health check time the machine, not the code: on a loaded
# 2-core runner one generated example can take seconds. Every property test runs under this
# profile; HYPOTHESIS_PROFILE=default restores Hypothesis' own timing checks for a local run.
hypothesis_settings.register_profile(
    "tiergate", deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
hypothesis_settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "tiergate"))


def tiergate_cli(env: Mapping[str, str]) -> Callable[..., subprocess.CompletedProcess[str]]:
    """``tiergate ARGS`` as a user runs it: a fresh interpreter with ``env``, output captured."""

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "tiergate", *args],
            capture_output=True,
            text=True,
            env=dict(env),
            timeout=120,
            check=False,
        )

    return run


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


def save_tiny_distilbert(
    checkpoint: Path,
    *,
    num_labels: int = 2,
    initializer_range: float = 0.02,
    head_bias: Sequence[float] | None = None,
) -> Path:
    """Save a random two-layer DistilBERT (32 wide, 64-token positions) with the default tokenizer.

    Its weights come from torch's global seed, so seed torch first for a repeatable checkpoint;
    ``head_bias`` sets the classifier's bias (one value per label).
    """
    import torch
    from transformers import AutoTokenizer, DistilBertConfig, DistilBertForSequenceClassification

    tokenizer = AutoTokenizer.from_pretrained(str(base_model_dir()))
    config = DistilBertConfig(
        vocab_size=tokenizer.vocab_size,
        dim=32,
        hidden_dim=64,
        n_layers=2,
        n_heads=2,
        max_position_embeddings=64,
        num_labels=num_labels,
        initializer_range=initializer_range,
    )
    model = DistilBertForSequenceClassification(config)
    if head_bias is not None:
        with torch.no_grad():
            model.classifier.bias.copy_(torch.tensor(list(head_bias)))
    model.save_pretrained(str(checkpoint))
    tokenizer.save_pretrained(str(checkpoint))
    return checkpoint


@pytest.fixture(scope="session")
def make_tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """Build a random two-layer DistilBERT with a 32-token window as a tiergate model directory.

    Called with a name, the label set and 24 labelled examples (18 to train, 6 to validate);
    ``multi_label`` gives it a sigmoid head. A random model's scores sit near ties, so the
    export's agreement with torch is not checked (tests assert closeness themselves).
    """

    def make(
        name: str,
        labels: tuple[str, ...],
        examples: Sequence[LabelledExample],
        *,
        multi_label: bool = False,
        save_checkpoint: bool = False,
    ) -> Path:
        root = tmp_path_factory.mktemp(name)
        checkpoint = root / "distilbert"
        save_tiny_distilbert(checkpoint, num_labels=len(labels))
        options = TrainOptions(
            base_model=checkpoint,
            output=root / "model",
            labels=labels,
            multi_label=multi_label,
            name=name,
            epochs=1,
            batch_size=8,
            max_length=32,
            min_agreement=0.0,
            save_checkpoint=save_checkpoint,
            show_progress=False,
        )
        train_model(options, examples[:18], examples[18:])
        return root / "model"

    return make


@pytest.fixture(scope="session")
def tiny_model(make_tiny_model: Callable[..., Path]) -> Path:
    """A random two-layer DistilBERT with a 32-token window, as a tiergate model directory."""
    examples = [
        LabelledExample(text=f"message number {i} about {word}", labels=(label,), line=i + 1)
        for i, (word, label) in enumerate(
            [("refunds", "billing"), ("passwords", "account"), ("crashes", "bug")] * 8
        )
    ]
    return make_tiny_model(
        "tiny-distilbert", ("account", "billing", "bug"), examples, save_checkpoint=True
    )


@pytest.fixture
def redis_prefix() -> Iterator[str]:
    """A fresh key prefix in the local Redis; every key under it is deleted afterwards."""
    prefix = f"tiergate-test-{uuid.uuid4().hex}"
    yield prefix
    delete_keys(f"{prefix}:*")


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A Redis server of this test's own (started), stopped after the test."""
    directory = tmp_path / "redis"
    directory.mkdir()
    server = RedisServer(directory)
    server.start()
    yield server
    server.stop()


@pytest.fixture
def fake_llm() -> Iterator[FakeLLMServer]:
    """The fake LLM provider, answering 'positive' unless a test scripts otherwise."""
    with FakeLLMServer(positive_answer) as server:
        yield server


@pytest.fixture
def make_cluster(
    trained_model: TrainedModel, tmp_path: Path, fake_llm: FakeLLMServer
) -> Iterator[Callable[..., Cluster]]:
    """Real worker processes (``tests/cluster.py``): a factory of clusters over a broker.

    Each cluster gets its own queues, key prefix and decisions stream; its workers and keys
    are torn down after the test.
    """
    factory = ClusterFactory(trained_model.directory, tmp_path, fake_llm)
    yield factory.make
    factory.close()
