"""Fine-tuning on real data, ONNX export, and agreement between ONNX and torch."""

from __future__ import annotations

import json
import os
import random
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import save_tiny_distilbert
from tiergate.workers.bert.classifier import BertClassifier
from tiergate.workers.bert.default_model import base_model_dir
from tiergate.workers.bert.manifest import CARD_FILE, read_manifest
from tiergate.workers.bert.train import CHECKPOINT_DIR, base_model_name


def test_training_beats_chance_on_held_out_data(trained_model):
    """750 real snippets are enough to classify held-out ones far above the majority class.

    The card's test accuracy is reproduced exactly by a classifier batching as training did
    (dynamic int8 quantization scales each batch as a whole, so batch composition matters).
    """
    test = trained_model.test
    majority = Counter(e.labels[0] for e in test).most_common(1)[0][1] / len(test)
    batch_size = trained_model.card.training["batch_size"]
    classifier = BertClassifier(trained_model.directory, batch_size=batch_size)
    predictions = classifier.predict([e.text for e in test])
    accuracy = np.mean([p.top_label == e.labels[0] for p, e in zip(predictions, test, strict=True)])
    assert accuracy >= majority + 0.2
    assert trained_model.card.test is not None
    assert trained_model.card.test.accuracy == pytest.approx(accuracy, abs=1e-9)


def test_card_records_metrics_and_versions(trained_model):
    """model.json holds accuracy, macro-F1, ECE before and after temperature, and versions."""
    card = json.loads((trained_model.directory / CARD_FILE).read_text())
    for split in ("validation", "test"):
        metrics = card[split]
        assert 0.0 <= metrics["macro_f1"] <= 1.0
        assert 0.0 <= metrics["ece_after_temperature"] <= 1.0
    assert card["validation"]["examples"] == len(trained_model.validation)
    assert card["training"]["examples"] > 0
    assert card["training"]["seed"] == 13
    assert card["base_model"] == "sentence-transformers/all-MiniLM-L6-v2"
    assert card["rare_labels"] == {}
    assert {"torch", "transformers", "onnxruntime", "tiergate"} <= card["versions"].keys()
    manifest = read_manifest(trained_model.directory)
    assert manifest.model_version == card["model_version"]
    assert manifest.inputs == ("input_ids", "attention_mask", "token_type_ids")
    assert manifest.temperature == pytest.approx(card["temperature"])


def test_temperature_does_not_worsen_validation_calibration(trained_model):
    """The fitted temperature leaves validation ECE no worse than the raw softmax (within noise)."""
    validation = trained_model.card.validation
    assert validation.ece_after_temperature <= validation.ece_before_temperature + 0.02
    assert trained_model.card.temperature != 1.0


def test_onnx_agrees_with_torch(trained_model):
    """The int8 ONNX model picks the same label as the fp32 torch checkpoint on held-out data."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    checkpoint = trained_model.directory / CHECKPOINT_DIR
    tokenizer = AutoTokenizer.from_pretrained(str(checkpoint))
    model = AutoModelForSequenceClassification.from_pretrained(str(checkpoint)).eval()
    texts = [e.text for e in trained_model.test]
    classifier = BertClassifier(trained_model.directory)
    agree, differences = 0, []
    for start in range(0, len(texts), 32):
        batch = texts[start : start + 32]
        encoded = tokenizer(
            batch, padding=True, truncation=True, max_length=128, return_tensors="pt"
        )
        with torch.no_grad():
            logits = model(**encoded).logits.numpy()
        windows = classifier.encode(batch)
        single = [i for i, count in enumerate(windows.counts) if count == 1]
        onnx_logits = classifier.run(windows.ids)[[windows.owner.index(i) for i in single]]
        agree += int((logits[single].argmax(1) == onnx_logits.argmax(1)).sum())
        differences.append(np.abs(logits[single] - onnx_logits).max())
        assert len(single) > 0
    compared = sum(1 for e in trained_model.test if len(tokenizer(e.text)["input_ids"]) <= 128)
    assert agree / compared >= 0.97
    assert trained_model.card.onnx_agreement["argmax_agreement"] >= 0.97


def test_tier_tokenizes_like_the_checkpoint(trained_model):
    """The tier's `tokenizers` windows match the training tokenizer's ids for window-sized texts."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(trained_model.directory / CHECKPOINT_DIR))
    classifier = BertClassifier(trained_model.directory)
    texts = [e.text for e in trained_model.test[:50]] + ["Ünïcödé — naïve café, 100% “quoted”"]
    windows = classifier.encode(texts)
    expected = tokenizer(texts)["input_ids"]
    for index, ids in enumerate(expected):
        if len(ids) <= classifier.manifest.max_length:
            assert windows.ids[windows.owner.index(index)] == ids


def test_card_names_the_base_model():
    """The packaged default is named by its hub name; another checkpoint by its config or folder."""
    assert base_model_name(base_model_dir()) == "sentence-transformers/all-MiniLM-L6-v2"


def test_card_names_a_users_checkpoint(tmp_path):
    """A user's checkpoint is named by its config's hub name, else by its folder."""
    named = tmp_path / "named"
    named.mkdir()
    (named / "config.json").write_text(json.dumps({"_name_or_path": "distilbert-base-uncased"}))
    assert base_model_name(named) == "distilbert-base-uncased"
    local = tmp_path / "my-bert"
    local.mkdir()
    (local / "config.json").write_text(json.dumps({"_name_or_path": str(named)}))
    assert base_model_name(local) == "my-bert"


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random two-layer DistilBERT checkpoint with the default tokenizer, as a user's base.

    Its weights are drawn wide (initializer range 1.0), so its int8 export picks another label
    than torch on a share of messages well above the default gate's 3%.
    """
    import torch

    torch.manual_seed(5)
    checkpoint = tmp_path_factory.mktemp("base") / "tiny-distilbert"
    return save_tiny_distilbert(checkpoint, initializer_range=1.0)


# Framework output a `tiergate train` user cannot act on.
FRAMEWORK_NOISE = (
    "Some weights of",
    "You should probably TRAIN",
    "FutureWarning",
    "DeprecationWarning",
    "UserWarning",
    "huggingface/tokenizers",
    "TOKENIZERS_PARALLELISM",
    "Please consider to run pre-processing",
    "WARNING",
)


def test_train_cli_gate_warnings_and_card(tiny_checkpoint, tmp_path):
    """`tiergate train` on a small file: the ONNX gate's refusal names its option, which passes.

    The run warns of a label with too few training examples, records it in the card, names the
    base checkpoint, and prints none of the frameworks' warnings.
    """
    data = tmp_path / "train.jsonl"
    rng = random.Random(1)
    words = [
        "refund",
        "password",
        "crash",
        "invoice",
        "login",
        "screen",
        "charge",
        "email",
        "error",
        "payment",
        "reset",
    ]
    labels = ["billing", "account"] * 40 + ["bug"] * 3
    rows = [{"text": " ".join(rng.choices(words, k=8)), "label": label} for label in labels]
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    env = {k: v for k, v in os.environ.items() if not k.startswith("TIERGATE_")}
    env.pop("TOKENIZERS_PARALLELISM", None)
    env.pop("PYTHONWARNINGS", None)
    output = tmp_path / "model"

    def train(*options: str) -> subprocess.CompletedProcess[str]:
        command = [sys.executable, "-m", "tiergate", "train", str(data), "-o", str(output)]
        command += ["--base", str(tiny_checkpoint), "--max-length", "32", "--epochs", "1"]
        # learning rate 0 keeps the random weights, whose export disagrees on a few messages
        command += ["--validation-split", "0.5", "--learning-rate", "0", "--overwrite", *options]
        return subprocess.run(
            command, capture_output=True, text=True, env=env, timeout=600, check=False
        )

    refused = train()
    assert refused.returncode == 2, refused.stderr
    assert "--min-onnx-agreement" in refused.stderr
    assert "served ONNX model" in refused.stderr
    suggested = re.search(r"--min-onnx-agreement (0\.\d+)", refused.stderr)
    assert suggested is not None, refused.stderr
    assert not output.exists()

    result = train("--min-onnx-agreement", suggested.group(1))
    assert result.returncode == 0, result.stderr
    assert "warning" in result.stderr
    assert "bug" in result.stderr
    assert "tiny-distilbert" in result.stderr or "written to" in result.stderr
    for noise in FRAMEWORK_NOISE:
        assert noise not in refused.stderr + result.stderr, noise
    card = json.loads((output / CARD_FILE).read_text())
    assert set(card["rare_labels"]) == {"bug"}
    assert card["base_model"] == "tiny-distilbert"
