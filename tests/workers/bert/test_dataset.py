"""Reading labelled training data strictly, and splitting it."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from tiergate.workers.bert.dataset import (
    MIN_TRAINING_EXAMPLES,
    Columns,
    LabelledExample,
    label_set,
    load_labelled,
    rare_labels,
)
from tiergate.workers.bert.default_model import LABELS, load_default_splits, training_subset
from tiergate.workers.bert.train import split_validation
from tiergate.workers.errors import DataFileError, InputError


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def test_jsonl_single_label(tmp_path):
    """Text and label columns become examples with their line numbers."""
    path = _jsonl(tmp_path / "d.jsonl", [{"text": "a", "label": "x"}, {"text": "b", "label": 2}])
    examples = load_labelled(path, columns=Columns(), multi_label=False)
    assert [(e.text, e.labels, e.line) for e in examples] == [("a", ("x",), 1), ("b", ("2",), 2)]
    assert label_set(examples) == ["2", "x"]


def test_csv_with_custom_columns_and_multi_label(tmp_path):
    """CSV multi-label cells separate labels with '|'; column names are configurable."""
    path = tmp_path / "d.csv"
    path.write_text('body,tags\n"hello, world",spam|toxic\nplain,\n')
    columns = Columns(text="body", labels="tags")
    examples = load_labelled(path, columns=columns, multi_label=True)
    assert examples[0].labels == ("spam", "toxic")
    assert examples[1].labels == ()


def test_unknown_label_names_the_line(tmp_path):
    """A label outside the declared set is an error naming the file, line and label."""
    path = _jsonl(tmp_path / "d.jsonl", [{"text": "a", "label": "x"}, {"text": "b", "label": "z"}])
    with pytest.raises(DataFileError, match=r"line 2: unknown label 'z'"):
        load_labelled(path, columns=Columns(), multi_label=False, known_labels=["x", "y"])


def test_missing_column_is_named(tmp_path):
    """A CSV without the label column is refused before reading records."""
    path = tmp_path / "d.csv"
    path.write_text("text,category\nhello,x\n")
    with pytest.raises(DataFileError, match="lacks column 'label'"):
        load_labelled(path, columns=Columns(), multi_label=False)


@pytest.mark.parametrize(
    ("line", "problem"),
    [
        ('{"text": "", "label": "x"}', "empty or only whitespace"),
        ('{"text": 5, "label": "x"}', "must be a string"),
        ('{"text": "a"}', "missing field 'label'"),
        ('{"text": "a", "label": ["x"]}', "must be a label name"),
        ('{"text": "a", "label": "x"', "malformed JSON"),
    ],
)
def test_bad_training_records_stop_training(tmp_path, line, problem):
    """Any bad record is an error with its line number, never skipped."""
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "fine", "label": "x"}\n' + line + "\n")
    with pytest.raises(DataFileError, match=rf"line 2: .*{problem}"):
        load_labelled(path, columns=Columns(), multi_label=False)


def test_undecodable_training_bytes(tmp_path):
    """Bytes that are not UTF-8 are reported with their line."""
    path = tmp_path / "d.jsonl"
    path.write_bytes(b'{"text": "ok", "label": "x"}\n{"text": "\xff", "label": "x"}\n')
    with pytest.raises(DataFileError, match="line 2: not valid UTF-8"):
        load_labelled(path, columns=Columns(), multi_label=False)


def test_missing_and_empty_files(tmp_path):
    """A missing file and a file with no examples are both clear errors."""
    with pytest.raises(DataFileError, match="no such file"):
        load_labelled(tmp_path / "none.jsonl", columns=Columns(), multi_label=False)
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(DataFileError, match="no examples"):
        load_labelled(tmp_path / "empty.jsonl", columns=Columns(), multi_label=False)


def test_validation_split_is_seeded_and_disjoint(tmp_path):
    """The held-out split is the same for the same seed and shares nothing with training."""
    path = _jsonl(tmp_path / "d.jsonl", [{"text": f"t{i}", "label": "x"} for i in range(50)])
    examples = load_labelled(path, columns=Columns(), multi_label=False)
    train, validation = split_validation(examples, 0.2, seed=7)
    again, _ = split_validation(examples, 0.2, seed=7)
    assert len(validation) == 10
    assert {e.text for e in train}.isdisjoint({e.text for e in validation})
    assert train == again
    with pytest.raises(InputError):
        split_validation(examples, 1.5, seed=7)


def _examples(counts):
    """Single-label examples: ``counts`` maps each label to how many it has."""
    labels = [label for label, count in counts.items() for _ in range(count)]
    return [
        LabelledExample(text=f"t{i}", labels=(lab,), line=i + 1) for i, lab in enumerate(labels)
    ]


def test_validation_split_is_stratified_by_label():
    """Each label is held out in proportion; a label seen twice keeps one in training.

    A label seen once stays in training (its head would otherwise learn from nothing).
    """
    examples = _examples({"a": 20, "b": 10, "c": 2, "d": 1})
    for seed in range(20):
        train, validation = split_validation(examples, 0.2, seed=seed)
        held = Counter(e.labels[0] for e in validation)
        kept = Counter(e.labels[0] for e in train)
        assert held["a"] == 4
        assert held["b"] == 2
        assert held["a"] + held["b"] + held["c"] == 7
        assert kept["c"] >= 1
        assert kept["d"] == 1
        assert split_validation(examples, 0.2, seed=seed) == (train, validation)


def test_multi_label_split_is_stratified_by_rarest_label():
    """A multi-label example is placed by its rarest label, so a rare label keeps a training row."""
    examples = [
        LabelledExample(text=f"t{i}", labels=("common",) if i % 4 else ("common", "rare"), line=i)
        for i in range(20)
    ]
    for seed in range(20):
        train, validation = split_validation(examples, 0.25, seed=seed)
        assert sum("rare" in e.labels for e in train) >= 1
        assert sum("rare" in e.labels for e in validation) == 1
        assert len(validation) == 5


def test_rare_labels_counts_labels_below_the_minimum():
    """Labels with fewer than the minimum training examples are named with their counts."""
    examples = _examples({"a": MIN_TRAINING_EXAMPLES, "b": MIN_TRAINING_EXAMPLES - 1, "c": 1})
    assert rare_labels(examples, ["a", "b", "c", "unseen"]) == {
        "b": MIN_TRAINING_EXAMPLES - 1,
        "c": 1,
        "unseen": 0,
    }


def test_default_dataset_is_split_by_movie_without_overlap():
    """The default corpus splits hold disjoint texts, all three labels, and enough test data."""
    splits = load_default_splits()
    texts = [{e.text for e in split} for split in (splits.train, splits.validation, splits.test)]
    assert texts[0].isdisjoint(texts[1])
    assert texts[0].isdisjoint(texts[2])
    assert texts[1].isdisjoint(texts[2])
    assert len(splits.test) >= 1000
    assert {e.labels[0] for e in splits.test} == set(LABELS)
    subset = training_subset(splits.train, 600, seed=1)
    assert len(subset) == pytest.approx(600, abs=3)
    assert {e.labels[0] for e in subset} == set(LABELS)
