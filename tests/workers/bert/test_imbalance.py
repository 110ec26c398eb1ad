"""Imbalanced classes: loss weights, labels the model never predicts, and what training says."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import save_tiny_distilbert
from tiergate.workers.bert.classifier import BertClassifier
from tiergate.workers.bert.dataset import Columns, LabelledExample, load_labelled
from tiergate.workers.bert.manifest import CARD_FILE
from tiergate.workers.bert.temperature import calibrate_temperature
from tiergate.workers.bert.train import (
    TrainOptions,
    balanced_class_weights,
    check_class_weights,
    split_validation,
    train_model,
    training_loss,
)
from tiergate.workers.errors import InputError

LOGITS = [[2.0, 0.5, -1.0], [0.1, 0.3, 0.2], [-0.5, 1.5, 0.0], [1.0, 1.0, 3.0]]
CLASSES = [0, 2, 1, 2]
FLAGS = [[1.0, 0.0, 1.0], [0.0, 0.0, 1.0], [0.0, 1.0, 0.0], [1.0, 1.0, 0.0]]


def _examples(*labels: str | tuple[str, ...]) -> list[LabelledExample]:
    return [
        LabelledExample(
            text=f"text {i}", labels=label if isinstance(label, tuple) else (label,), line=i
        )
        for i, label in enumerate(labels, start=1)
    ]


def test_weighted_cross_entropy_matches_a_hand_computation():
    """Class weights scale each example's NLL by its label's weight, averaged over the weights."""
    import torch

    logits, targets = np.array(LOGITS), np.array(CLASSES)
    weights = np.array([1.0, 3.0, 0.5])
    nll = -(logits - np.log(np.exp(logits).sum(axis=1, keepdims=True)))[range(4), targets]
    by_hand = (weights[targets] * nll).sum() / weights[targets].sum()
    weighted = training_loss(
        torch.tensor(LOGITS),
        torch.tensor(CLASSES),
        torch.tensor(weights, dtype=torch.float32),
        multi_label=False,
    )
    unweighted = training_loss(torch.tensor(LOGITS), torch.tensor(CLASSES), None, multi_label=False)
    assert weighted.item() == pytest.approx(by_hand, rel=1e-6)
    assert unweighted.item() == pytest.approx(nll.mean(), rel=1e-6)
    assert abs(weighted.item() - unweighted.item()) > 0.05


def test_pos_weight_binary_cross_entropy_matches_a_hand_computation():
    """Multi-label weights multiply each label's positive term of the BCE, averaged over cells."""
    import torch

    logits, flags = np.array(LOGITS), np.array(FLAGS)
    pos_weight = np.array([2.0, 1.0, 4.0])
    p = 1 / (1 + np.exp(-logits))
    by_hand = -(pos_weight * flags * np.log(p) + (1 - flags) * np.log(1 - p)).mean()
    weighted = training_loss(
        torch.tensor(LOGITS),
        torch.tensor(FLAGS),
        torch.tensor(pos_weight, dtype=torch.float32),
        multi_label=True,
    )
    unweighted = training_loss(torch.tensor(LOGITS), torch.tensor(FLAGS), None, multi_label=True)
    assert weighted.item() == pytest.approx(by_hand, rel=1e-6)
    assert abs(weighted.item() - unweighted.item()) > 0.05


@pytest.mark.parametrize("multi_label", [False, True])
def test_unweighted_loss_is_the_hugging_face_heads_loss(multi_label):
    """Without weights the loss equals the one the model computes itself from labels=."""
    import torch
    from transformers import DistilBertConfig, DistilBertForSequenceClassification

    torch.manual_seed(3)
    config = DistilBertConfig(
        vocab_size=100,
        dim=16,
        hidden_dim=32,
        n_layers=1,
        n_heads=2,
        num_labels=3,
        problem_type=(
            "multi_label_classification" if multi_label else "single_label_classification"
        ),
    )
    model = DistilBertForSequenceClassification(config).eval()
    ids = torch.randint(0, 100, (4, 7))
    targets = torch.tensor(FLAGS) if multi_label else torch.tensor(CLASSES)
    with torch.no_grad():
        output = model(input_ids=ids, labels=targets)
        ours = training_loss(output.logits, targets, None, multi_label=multi_label)
    assert ours.item() == pytest.approx(output.loss.item(), rel=1e-6)


def test_balanced_weights_follow_scikit_learns_definition():
    """Single-label balanced weights are n / (labels * count); an absent label weighs 1."""
    examples = _examples(*["a"] * 6, *["b"] * 3, "c")
    weights = balanced_class_weights(examples, ["a", "b", "c", "d"], multi_label=False)
    assert weights == pytest.approx({"a": 10 / 24, "b": 10 / 12, "c": 10 / 4, "d": 1.0})


def test_balanced_multi_label_weights_are_negatives_over_positives():
    """A multi-label pos_weight is the label's negatives over its positives."""
    examples = _examples(("x",), ("x", "y"), ("x",), ("z",))
    weights = balanced_class_weights(examples, ["x", "y", "z", "w"], multi_label=True)
    assert weights == pytest.approx({"x": 1 / 3, "y": 3.0, "z": 3.0, "w": 1.0})


@pytest.mark.parametrize(
    ("weights", "message"),
    [
        pytest.param({"nope": 2.0}, "unknown label 'nope'", id="unknown"),
        pytest.param({"a": 0.0}, "'a' must be a positive number", id="zero"),
        pytest.param({"a": -1.0}, "'a' must be a positive number", id="negative"),
        pytest.param({"a": float("inf")}, "'a' must be a positive number", id="infinite"),
    ],
)
def test_check_class_weights_names_the_bad_entry(weights, message):
    """A weight for an unknown label, or one not a positive finite number, is an InputError."""
    with pytest.raises(InputError, match=message):
        check_class_weights(weights, ["a", "b"])


# ---------------------------------------------------------------------------------- the CLI


LABELS = ("common", "other", "rare")


def _tiny_checkpoint(checkpoint: Path, head_bias: list[float]) -> Path:
    """A random two-layer DistilBERT for :data:`LABELS` with the given classifier bias."""
    import torch

    torch.manual_seed(7)
    return save_tiny_distilbert(checkpoint, num_labels=len(LABELS), head_bias=head_bias)


@pytest.fixture(scope="module")
def favours_common(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random model whose head always answers its first label, ``common``."""
    return _tiny_checkpoint(tmp_path_factory.mktemp("base") / "favours-common", [8.0, 0.0, 0.0])


@pytest.fixture(scope="module")
def plain_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random model with an unbiased head, to be trained."""
    return _tiny_checkpoint(tmp_path_factory.mktemp("base") / "plain", [0.0, 0.0, 0.0])


@pytest.fixture(scope="module")
def skewed_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """30 ``common``, 30 ``other`` and 6 ``rare`` short messages as a JSONL file."""
    path = tmp_path_factory.mktemp("data") / "skewed.jsonl"
    counts = {"common": 30, "other": 30, "rare": 6}
    rows = [
        {"text": f"{label} message number {i}", "label": label}
        for label, count in counts.items()
        for i in range(count)
    ]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def train_cli(data: Path, output: Path, base: Path, *options: str) -> subprocess.CompletedProcess:
    """``tiergate train`` in a fresh interpreter, on a 32-token window, one epoch, 0 learning rate.

    With a learning rate of 0 the model keeps its base weights, so what it predicts is known.
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith("TIERGATE_")}
    command = [sys.executable, "-m", "tiergate", "train", str(data), "-o", str(output)]
    command += ["--base", str(base), "--labels", ",".join(LABELS), "--max-length", "32"]
    command += ["--epochs", "1", "--learning-rate", "0", "--validation-split", "0.5"]
    command += ["--batch-size", "8", "--no-checkpoint", *options]
    return subprocess.run(
        command, capture_output=True, text=True, env=env, timeout=600, check=False
    )


@pytest.mark.parametrize(
    ("option", "message"),
    [
        pytest.param("rare=3,nope=2", "unknown label 'nope'", id="unknown-label"),
        pytest.param("rare=0", "'rare' must be a positive number", id="zero"),
        pytest.param("rare=-2", "'rare' must be a positive number", id="negative"),
        pytest.param("rare", "'rare' is not label=weight", id="no-weight"),
        pytest.param("rare=lots", "'rare=lots' is not label=weight", id="not-a-number"),
        pytest.param("rare=3,", "'' is not label=weight", id="empty-item"),
    ],
)
def test_train_rejects_a_bad_class_weight_before_training(
    option, message, skewed_file, favours_common, tmp_path
):
    """A bad --class-weight exits 2 naming the problem, with no stack trace and no model."""
    result = train_cli(skewed_file, tmp_path / "m", favours_common, "--class-weight", option)
    assert result.returncode == 2, result.stderr
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "m").exists()


def test_train_warns_of_labels_never_predicted_and_records_the_weights(
    skewed_file, favours_common, tmp_path
):
    """A model that only answers one label: training warns of the others, and the card says so.

    The card records the balanced weights (computed on the training split) and per-label
    figures, and the run prints a per-label table.
    """
    output = tmp_path / "model"
    result = train_cli(skewed_file, output, favours_common, "--class-weight", "balanced")
    assert result.returncode == 0, result.stderr
    assert "never predicted label 'other'" in result.stderr
    assert "never predicted label 'rare'" in result.stderr
    assert "never predicted label 'common'" not in result.stderr
    assert "per label" in result.stderr
    card = json.loads((output / CARD_FILE).read_text())
    assert card["never_predicted"] == ["other", "rare"]
    rare = card["validation"]["per_class"]["rare"]
    assert rare == {"precision": None, "recall": 0.0, "f1": 0.0, "support": 3, "predicted": 0}
    # the training split holds 15 common, 15 other and 3 rare: balanced = 33 / (3 * count)
    assert card["training"]["class_weights"] == pytest.approx(
        {"common": 33 / 45, "other": 33 / 45, "rare": 33 / 9}
    )
    assert card["validation"]["examples"] == 33


def test_the_temperature_is_fitted_unweighted_after_weighted_training(
    skewed_file, plain_checkpoint, tmp_path
):
    """Balanced loss weights train the model but not its temperature.

    The card's temperature is the unweighted validation NLL's optimum on the served logits;
    the weighted NLL's optimum lies elsewhere, so a leak of the weights would show.
    """
    examples = load_labelled(skewed_file, columns=Columns(), multi_label=False)
    train, validation = split_validation(examples, 0.5, seed=13)
    weights = balanced_class_weights(train, LABELS, multi_label=False)
    options = TrainOptions(
        base_model=plain_checkpoint,
        output=tmp_path / "model",
        labels=LABELS,
        epochs=8,
        batch_size=8,
        learning_rate=5e-3,
        max_length=32,
        min_agreement=0.0,
        save_checkpoint=False,
        show_progress=False,
        class_weights=weights,
    )
    card = train_model(options, train, validation)
    assert card.training["class_weights"] == weights
    classifier = BertClassifier(tmp_path / "model", batch_size=8)
    logits = classifier.run(classifier.encode([e.text for e in validation]).ids).astype(np.float64)
    targets = np.array([LABELS.index(e.labels[0]) for e in validation])
    assert card.temperature == pytest.approx(calibrate_temperature(logits, targets), rel=1e-6)
    per_example = np.array([weights[label] for label in LABELS])[targets]
    grid = np.linspace(0.05, 20.0, 4000)
    weighted_nll = [
        (per_example * _nll(logits / t, targets)).sum() / per_example.sum() for t in grid
    ]
    weighted_optimum = grid[int(np.argmin(weighted_nll))]
    assert abs(np.log(weighted_optimum / card.temperature)) > 0.2


def _nll(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=1, keepdims=True)
    log_p = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    return -log_p[np.arange(len(targets)), targets]
