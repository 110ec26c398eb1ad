"""Long texts train as they are served: every window, the tier's own windows, the card's counts."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import save_tiny_distilbert
from tiergate.gateway.cli.train import windows_line
from tiergate.workers.bert import train as train_module
from tiergate.workers.bert.classifier import BertClassifier
from tiergate.workers.bert.dataset import LabelledExample
from tiergate.workers.bert.manifest import CARD_FILE, read_manifest
from tiergate.workers.bert.temperature import calibrate_temperature
from tiergate.workers.bert.train import ModelCard, TrainOptions, _Encoder, train_model

LABELS = ("account", "billing")
WINDOW = 32
WORDS = ["refund", "password", "invoice", "login", "charge", "email", "payment", "reset"]


def _examples(lengths: list[int], seed: int) -> list[LabelledExample]:
    """Texts of ``lengths`` words drawn from WORDS, labelled alternately."""
    rng = random.Random(seed)
    return [
        LabelledExample(text=" ".join(rng.choices(WORDS, k=n)), labels=(LABELS[i % 2],), line=i + 1)
        for i, n in enumerate(lengths)
    ]


# Three training texts and two validation texts span several 32-token windows.
TRAIN = _examples([8] * 9 + [50] + [8] * 4 + [70, 90] + [8] * 4, seed=1)
VALIDATION = _examples([8, 60, 8, 8, 80, 8], seed=2)


@dataclass(frozen=True)
class Trained:
    """A tiny model trained with one window strategy, and what its training saw.

    ``collated`` counts every window batched into torch; ``fitted_on`` is the number of logits
    rows and the window counts the temperature was fitted on.
    """

    directory: Path
    card: ModelCard
    collated: Counter[tuple[int, ...]]
    fitted_on: tuple[int, list[int] | None]


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random two-layer DistilBERT checkpoint with the default tokenizer."""
    import torch

    torch.manual_seed(7)
    return save_tiny_distilbert(tmp_path_factory.mktemp("windows-base") / "distilbert")


def _train(base: Path, root: Path, *, all_windows: bool) -> Trained:
    """Train on TRAIN (validated on VALIDATION), recording what training read (see Trained)."""
    collated: Counter[tuple[int, ...]] = Counter()
    fitted_on: list[tuple[int, list[int] | None]] = []
    original = _Encoder.collate

    def recording(self: _Encoder, batch: list[list[int]]) -> dict[str, object]:
        collated.update(tuple(ids) for ids in batch)
        return original(self, batch)

    def fit(logits, targets, *, counts=None, **options):
        fitted_on.append((len(logits), None if counts is None else list(counts)))
        return calibrate_temperature(logits, targets, counts=counts, **options)

    options = TrainOptions(
        base_model=base,
        output=root / "model",
        labels=LABELS,
        name="windows",
        epochs=1,
        batch_size=8,
        max_length=WINDOW,
        min_agreement=0.0,
        save_checkpoint=False,
        show_progress=False,
        all_windows=all_windows,
    )
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(_Encoder, "collate", recording)
        patch.setattr(train_module, "calibrate_temperature", fit)
        card = train_model(options, TRAIN, VALIDATION)
    (once,) = fitted_on
    return Trained(directory=root / "model", card=card, collated=collated, fitted_on=once)


@pytest.fixture(scope="module")
def every_window(tiny_base: Path, tmp_path_factory: pytest.TempPathFactory) -> Trained:
    """The tiny model trained on every window (the default)."""
    return _train(tiny_base, tmp_path_factory.mktemp("every-window"), all_windows=True)


@pytest.fixture(scope="module")
def first_window(tiny_base: Path, tmp_path_factory: pytest.TempPathFactory) -> Trained:
    """The tiny model trained on each text's first window only."""
    return _train(tiny_base, tmp_path_factory.mktemp("first-window"), all_windows=False)


def _served(trained: Trained, examples: list[LabelledExample]) -> list[list[tuple[int, ...]]]:
    """Each text's windows as the BERT tier cuts them when serving the trained model."""
    windows = BertClassifier(trained.directory).encode([e.text for e in examples])
    texts: list[list[tuple[int, ...]]] = [[] for _ in examples]
    for ids, owner in zip(windows.ids, windows.owner, strict=True):
        texts[owner].append(tuple(ids))
    return texts


def test_training_cuts_texts_into_the_windows_the_tier_serves(tiny_base, every_window):
    """Training's windows of short and long texts equal the served classifier's, id for id."""
    from transformers import AutoTokenizer

    encoder = _Encoder(AutoTokenizer.from_pretrained(str(tiny_base)), WINDOW)
    examples = [*TRAIN, *VALIDATION]
    trained = encoder.encode(examples)
    served = BertClassifier(every_window.directory).encode([e.text for e in examples])
    assert trained == served
    assert max(served.counts) >= 3


def test_every_window_of_a_long_text_is_trained(every_window):
    """Each served window of each training text is a training example; the card counts them."""
    served = _served(every_window, TRAIN)
    for windows in served:
        for ids in windows:
            assert every_window.collated[ids] >= 1
    counts = [len(windows) for windows in served]
    training = every_window.card.training
    assert training["window_strategy"] == "all"
    assert training["examples"] == len(TRAIN)
    assert training["windows_trained"] == sum(counts) > len(TRAIN)
    assert training["texts_with_several_windows"] == 3
    assert training["max_windows_per_text"] == max(counts)
    assert training["mean_windows_per_text"] == pytest.approx(sum(counts) / len(TRAIN), abs=1e-3)


def test_first_window_only_trains_each_texts_first_window(first_window):
    """With all_windows off, a long text's later windows are never trained; the card says so."""
    served = _served(first_window, TRAIN)
    later = [ids for windows in served for ids in windows[1:]]
    assert len(later) >= 3
    assert all(first_window.collated[windows[0]] >= 1 for windows in served)
    assert not any(first_window.collated[ids] for ids in later)
    training = first_window.card.training
    assert training["window_strategy"] == "first"
    assert training["windows_trained"] == len(TRAIN)
    assert training["texts_with_several_windows"] == 3


def test_temperature_is_fitted_on_the_served_predictions(every_window):
    """The temperature is fitted to every validation window, aggregated per text as served."""
    classifier = BertClassifier(every_window.directory, batch_size=8)
    windows = classifier.encode([e.text for e in VALIDATION])
    assert every_window.fitted_on == (len(windows.ids), windows.counts)
    assert len(windows.ids) > len(VALIDATION)
    logits = classifier.run(windows.ids)
    targets = np.array([LABELS.index(e.labels[0]) for e in VALIDATION])
    served = calibrate_temperature(logits, targets, counts=windows.counts)
    assert read_manifest(every_window.directory).temperature == pytest.approx(served, rel=1e-9)
    assert every_window.card.temperature == pytest.approx(served, rel=1e-9)


def test_the_training_output_names_the_windows_trained():
    """The card's window record reads as one line, for either strategy."""
    record = {"examples": 1200, "texts_with_several_windows": 312, "windows_trained": 2041}
    assert windows_line({**record, "window_strategy": "all"}) == (
        "312 of 1,200 texts longer than one window: trained on all 2,041 windows"
    )
    first = windows_line({**record, "windows_trained": 1200, "window_strategy": "first"})
    assert first == (
        "312 of 1,200 texts longer than one window: trained on each text's first window only "
        "(1,200 windows)"
    )


def test_train_cli_first_window_only(tiny_base, tmp_path):
    """`tiergate train --first-window-only` trains first windows and prints the windows line."""
    data = tmp_path / "train.jsonl"
    rows = [{"text": e.text, "label": e.labels[0]} for e in [*TRAIN, *VALIDATION]]
    data.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    output = tmp_path / "model"
    env = {k: v for k, v in os.environ.items() if not k.startswith("TIERGATE_")}
    command = [sys.executable, "-m", "tiergate", "train", str(data), "-o", str(output)]
    command += ["--base", str(tiny_base), "--max-length", str(WINDOW), "--epochs", "1"]
    command += ["--min-onnx-agreement", "0", "--no-checkpoint", "--first-window-only"]
    done = subprocess.run(
        command, capture_output=True, text=True, env=env, timeout=600, check=False
    )
    assert done.returncode == 0, done.stderr
    card = json.loads((output / CARD_FILE).read_text(encoding="utf-8"))
    training = card["training"]
    assert training["window_strategy"] == "first"
    assert training["windows_trained"] == training["examples"]
    assert training["texts_with_several_windows"] >= 1
    assert windows_line(training) in " ".join(done.stderr.split())
