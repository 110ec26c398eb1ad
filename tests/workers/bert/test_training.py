"""Fine-tuning on real data, ONNX export, and agreement between ONNX and torch."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest

from tiergate.workers.bert.classifier import BertClassifier
from tiergate.workers.bert.manifest import CARD_FILE, read_manifest
from tiergate.workers.bert.train import CHECKPOINT_DIR


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
