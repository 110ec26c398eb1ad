"""The BERT tier under ONNX Runtime: windows, batching, calibration, loading and forks."""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

from tiergate.workers.bert.classifier import BertClassifier, Windows
from tiergate.workers.bert.manifest import (
    MANIFEST_FILE,
    ONNX_FILE,
    Head,
    read_manifest,
    sha256_file,
)
from tiergate.workers.bert.temperature import sigmoid, softmax
from tiergate.workers.errors import InputError, ModelIntegrityError, ModelNotFoundError

LONG_TEXT = " ".join(f"word{i} alpha beta gamma" for i in range(60))


def _op_types(directory: Path) -> set[str]:
    return {node.op_type for node in onnx.load(str(directory / ONNX_FILE)).graph.node}


def test_importing_the_tier_does_not_import_torch():
    """Inference imports neither torch nor transformers."""
    code = (
        "import sys, tiergate.workers.bert, tiergate.workers.cascade, tiergate.gateway.cli;"
        "bad = [m for m in ('torch', 'transformers') if m in sys.modules];"
        "print(','.join(bad))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == ""


def test_distilbert_goes_through_the_same_path(tiny_model):
    """A tiny random DistilBERT is exported, fused, quantized and served by the BERT tier."""
    manifest = read_manifest(tiny_model)
    assert manifest.inputs == ("input_ids", "attention_mask")  # DistilBERT has no segment ids
    assert {"MatMulInteger", "DynamicQuantizeLinear"} <= _op_types(tiny_model)  # int8
    classifier = BertClassifier(tiny_model, chunk_overlap=4)
    predictions = classifier.predict(["my password does not work", "refund please"])
    assert [p.labels for p in predictions] == [("account", "billing", "bug")] * 2
    for prediction in predictions:
        assert sum(prediction.probabilities) == pytest.approx(1.0, abs=1e-6)
        assert prediction.model_version == manifest.model_version


def test_minilm_export_fuses_attention(trained_model):
    """The BERT export carries fused (int8) attention and embeddings, fused layer norms."""
    ops = _op_types(trained_model.directory)
    assert {"QAttention", "QEmbedLayerNormalization", "SkipLayerNormalization"} <= ops
    assert {"MatMulInteger", "DynamicQuantizeLinear"} <= ops


def _untruncated_ids(classifier: BertClassifier, text: str) -> list[int]:
    tokenizer = classifier.tokenizer
    tokenizer.no_truncation()
    try:
        return tokenizer.encode(text, add_special_tokens=False).ids
    finally:
        tokenizer.enable_truncation(classifier.manifest.max_length, stride=classifier.chunk_overlap)


def test_texts_longer_than_the_window_are_split_not_truncated(tiny_model):
    """Every token of a long text lands in a window; consecutive windows share the overlap."""
    overlap = 4
    classifier = BertClassifier(tiny_model, chunk_overlap=overlap)
    windows = classifier.encode([LONG_TEXT, "short"])
    full = _untruncated_ids(classifier, LONG_TEXT)
    capacity = classifier.manifest.max_length - 2  # [CLS] and [SEP]
    expected_windows = 1 + -(-(len(full) - capacity) // (capacity - overlap))
    assert windows.counts == [expected_windows, 1]
    assert windows.owner == [0] * expected_windows + [1]
    assert all(len(ids) <= classifier.manifest.max_length for ids in windows.ids)
    rebuilt: list[int] = []
    for index, ids in enumerate(windows.ids[:expected_windows]):
        content = ids[1:-1]
        if index > 0:
            assert content[:overlap] == rebuilt[-overlap:]
            content = content[overlap:]
        rebuilt += content
    assert rebuilt == full


def test_is_long_says_whether_encode_makes_several_windows(tiny_model):
    """is_long is True exactly for the texts encode cuts into more than one window."""
    classifier = BertClassifier(tiny_model, chunk_overlap=4)
    capacity = classifier.manifest.max_length - 2  # [CLS] and [SEP]
    texts = [" ".join(["alpha"] * n) for n in range(capacity - 3, capacity + 4)]
    texts += ["short", LONG_TEXT]
    counts = classifier.encode(texts).counts
    assert counts[3:5] == [1, 2]  # the border between one window and two is among the texts
    assert [classifier.is_long(text) for text in texts] == [count > 1 for count in counts]


def test_text_over_eight_windows_of_characters_is_long(tiny_model):
    """Past 8 x max_length characters a text is long, even one that would fit one window."""
    classifier = BertClassifier(tiny_model, chunk_overlap=4)
    word = "a" * (8 * classifier.manifest.max_length)  # one unknown token, however long
    assert classifier.encode([word, word + "a"]).counts == [1, 1]
    assert not classifier.is_long(word)
    assert classifier.is_long(word + "a")


def test_single_label_windows_are_averaged(tiny_model):
    """A long text's probabilities are the mean of its windows' calibrated softmax."""
    classifier = BertClassifier(tiny_model, chunk_overlap=4)
    windows = classifier.encode([LONG_TEXT])
    logits = classifier.run(windows.ids)
    expected = softmax(logits, classifier.manifest.temperature).mean(axis=0)
    (prediction,) = classifier.predict([LONG_TEXT])
    assert prediction.chunks == len(windows.ids) > 1
    np.testing.assert_allclose(prediction.probabilities, expected, atol=1e-6)


def test_multi_label_windows_take_the_maximum(tiny_model):
    """For a multi-label head each label's probability is its maximum over windows."""
    classifier = BertClassifier(tiny_model, chunk_overlap=4)
    classifier.manifest = classifier.manifest.model_copy(
        update={"head": Head.MULTI_LABEL, "temperature": 2.0}
    )
    logits = np.array([[2.0, -1.0, 0.5], [-3.0, 4.0, 0.0], [0.0, 0.0, -2.0]])
    windows = Windows(ids=[[1], [1], [1]], owner=[0, 0, 1], counts=[2, 1])
    first, second = classifier.calibrate(logits, windows)
    np.testing.assert_allclose(first.probabilities, sigmoid(logits[:2], 2.0).max(axis=0))
    np.testing.assert_allclose(second.probabilities, sigmoid(logits[2:], 2.0)[0])
    assert first.multi_label
    assert (first.chunks, second.chunks) == (2, 1)


def test_temperature_is_applied(tiny_model):
    """Calibration divides logits by the manifest's temperature before the softmax."""
    classifier = BertClassifier(tiny_model, chunk_overlap=4)
    logits = np.array([[3.0, 1.0, 0.0]])
    windows = Windows(ids=[[1]], owner=[0], counts=[1])
    hot = classifier.calibrate(logits, windows, temperature=4.0)[0]
    cold = classifier.calibrate(logits, windows, temperature=0.5)[0]
    np.testing.assert_allclose(hot.probabilities, softmax(logits / 4.0)[0])
    assert cold.top_probability > hot.top_probability


def test_length_sorted_batches_keep_input_order(trained_model):
    """Sorting by length across small sub-batches still returns predictions in input order."""
    texts = [e.text for e in trained_model.test[:24]]
    texts.append(LONG_TEXT)
    batched = BertClassifier(trained_model.directory, batch_size=3).predict(texts)
    alone = BertClassifier(trained_model.directory, batch_size=1)
    for text, prediction in zip(texts, batched, strict=True):
        (single,) = alone.predict([text])
        assert prediction.chunks == single.chunks
        # int8 activations are quantized per batch, so batch-mates move scores a little
        np.testing.assert_allclose(prediction.probabilities, single.probabilities, atol=0.08)
    reversed_predictions = BertClassifier(trained_model.directory, batch_size=3).predict(
        texts[::-1]
    )
    assert [p.top_label for p in reversed_predictions] == [p.top_label for p in batched][::-1]


class _LengthEchoSession:
    """Stands in for the ONNX session: each row's logits are its unpadded length and its id."""

    def run(self, _outputs, feed):
        lengths = feed["attention_mask"].sum(axis=1)
        return [np.stack([lengths, feed["input_ids"][:, 1], np.zeros_like(lengths)], axis=1)]


def test_run_returns_rows_in_input_order(tiny_model):
    """Windows run in length-sorted sub-batches come back aligned with their input rows."""
    classifier = BertClassifier(tiny_model, chunk_overlap=4, batch_size=2)
    classifier._session, classifier._session_pid = _LengthEchoSession(), os.getpid()
    windows = [[101, 7 + i] + [5] * n + [102] for i, n in enumerate([9, 0, 4, 20, 1, 4, 13])]
    logits = classifier.run(windows)
    assert logits[:, 0].tolist() == [len(w) for w in windows]
    assert logits[:, 1].tolist() == [w[1] for w in windows]


@pytest.mark.parametrize(
    ("texts", "problem"),
    [
        ([""], "empty"),
        (["fine", "   \n\t "], r"text 1 is empty"),
        ([42], "not a string"),
        ([None], "not a string"),
    ],
)
def test_unusable_texts_are_refused(tiny_model, texts, problem):
    """Empty, whitespace-only and non-string texts raise an InputError naming the problem."""
    classifier = BertClassifier(tiny_model, chunk_overlap=4)
    with pytest.raises(InputError, match=problem):
        classifier.predict(texts)


def test_no_texts_no_predictions(tiny_model):
    """An empty batch returns no predictions and needs no session."""
    assert BertClassifier(tiny_model, chunk_overlap=4).predict([]) == []


def test_overlap_must_leave_room(tiny_model):
    """An overlap of half the window or more is refused (windows would not advance)."""
    with pytest.raises(InputError, match="chunk_overlap"):
        BertClassifier(tiny_model, chunk_overlap=20)


def test_missing_model_directory(tmp_path):
    """A missing directory is a ModelNotFoundError that says how to build one."""
    with pytest.raises(ModelNotFoundError, match="build-default"):
        BertClassifier(tmp_path / "nowhere")


def test_tampered_model_is_refused(tiny_model, tmp_path):
    """A model file that does not match its manifest hash is refused at load."""
    copy = tmp_path / "copy"
    shutil.copytree(tiny_model, copy)
    onnx_path = copy / ONNX_FILE
    data = bytearray(onnx_path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    onnx_path.write_bytes(bytes(data))
    with pytest.raises(ModelIntegrityError, match=r"model\.onnx does not match"):
        BertClassifier(copy)


def test_corrupt_onnx_with_matching_hash_is_refused(tiny_model, tmp_path):
    """An ONNX file that is not a model gives a ModelIntegrityError, not a crash."""
    copy = tmp_path / "copy"
    shutil.copytree(tiny_model, copy)
    (copy / ONNX_FILE).write_bytes(b"not an onnx model")
    manifest = json.loads((copy / MANIFEST_FILE).read_text())
    manifest["files"][ONNX_FILE] = sha256_file(copy / ONNX_FILE)
    (copy / MANIFEST_FILE).write_text(json.dumps(manifest))
    classifier = BertClassifier(copy, chunk_overlap=4)
    with pytest.raises(ModelIntegrityError, match="ONNX Runtime cannot load it"):
        classifier.warmup()


def _predict_in_child(
    classifier: BertClassifier, texts: list[str], queue: multiprocessing.Queue
) -> None:
    session_before = classifier._session
    prediction = classifier.predict(texts)
    queue.put(
        (
            [p.probabilities for p in prediction],
            classifier._session is not session_before,
        )
    )


def test_session_is_recreated_after_fork(tiny_model):
    """A forked worker builds its own session and predicts exactly as the parent does."""
    classifier = BertClassifier(tiny_model, chunk_overlap=4)
    texts = ["a forked worker", LONG_TEXT]
    parent = [p.probabilities for p in classifier.predict(texts)]
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    child = context.Process(target=_predict_in_child, args=(classifier, texts, queue))
    child.start()
    probabilities, recreated = queue.get(timeout=60)
    child.join(timeout=60)
    assert child.exitcode == 0
    assert recreated
    np.testing.assert_allclose(probabilities, parent, atol=1e-6)
