"""The tiergate CLI end to end, as a user runs it: a real process over a real ONNX model."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from workers.bert.manifest import ONNX_FILE


def tiergate(
    *args: str, model: Path | None, data_dir: Path, stdin: bytes | None = None
) -> subprocess.CompletedProcess[str]:
    """Run the CLI in a fresh interpreter, as a user would."""
    env = {**os.environ, "TIERGATE_DATA_DIR": str(data_dir)}
    if model is not None:
        env["TIERGATE_MODEL_DIR"] = str(model)
    return subprocess.run(
        [sys.executable, "-m", "gateway", *args],
        input=stdin.decode("utf-8", errors="surrogateescape") if stdin is not None else None,
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )


def _lines(stdout: str) -> list[dict]:
    """The JSON lines of an output."""
    return [json.loads(line) for line in stdout.splitlines() if line.strip()]


@pytest.fixture
def run(trained_model, tmp_path):
    """The CLI bound to the trained test model and a scratch data directory."""

    def _run(*args: str, stdin: bytes | None = None, model: Path | None = trained_model.directory):
        return tiergate(*args, model=model, data_dir=tmp_path / "data", stdin=stdin)

    return _run


def test_classify_texts_as_arguments(run, trained_model):
    """Texts given as arguments get one JSON decision each, in order, from the BERT tier."""
    result = run("classify", "An utterly delightful film.", "A dull, lifeless mess.")
    assert result.returncode == 0, result.stderr
    decisions = _lines(result.stdout)
    assert [d["id"] for d in decisions] == ["arg-1", "arg-2"]
    assert [d["label"] for d in decisions] == ["positive", "negative"]
    for decision in decisions:
        assert decision["tier"] == "bert"
        assert decision["reason"] == "bert_only"
        assert decision["model_version"] == trained_model.card.model_version
        assert sum(decision["scores"].values()) == pytest.approx(1.0, abs=1e-6)
    assert "2 messages: 2 answered, 0 rejected" in result.stderr


def test_file_with_bad_lines_accounts_for_every_line(run, tmp_path):
    """Bad JSONL lines are answered in place with their line number; good ones are classified."""
    path = tmp_path / "in.jsonl"
    path.write_bytes(
        b'{"id": "a", "text": "A wonderful, moving story."}\n'
        b'{"id": "b", "text": "   "}\n'
        b'{"id": "c", "text": 12}\n'
        b'{"id": "d", "text": "broken"\n'
        b'{"id": "e", "text": "\xff\xfe"}\n'
        b'{"id": "f", "text": "Terrible.", "channel": "email"}\n'
        b'{"id": "g", "body": "no text field"}\n'
    )
    out = tmp_path / "out.jsonl"
    result = run("classify", "-i", str(path), "-o", str(out))
    assert result.returncode == 1, result.stderr
    lines = _lines(out.read_text())
    assert len(lines) == 7
    assert [line.get("id") for line in lines] == ["a", None, None, None, None, "f", None]
    errors = {line["line"]: line["error"] for line in lines if "error" in line}
    assert "empty or only whitespace" in errors[2]
    assert "string" in errors[3]
    assert "malformed JSON" in errors[4]
    assert "UTF-8" in errors[5]
    assert "missing field 'text'" in errors[7]
    assert lines[5]["metadata"] == {"channel": "email"}
    assert "7 messages: 2 answered, 5 rejected" in result.stderr
    assert "Traceback" not in result.stderr


def test_csv_input_and_missing_column(run, tmp_path):
    """CSV rows are classified; a CSV without the text column is a usage error (exit 2)."""
    good = tmp_path / "in.csv"
    good.write_text('id,text\n1,"A charming, funny film."\n2,"Boring and far too long."\n')
    result = run("classify", "-i", str(good))
    assert result.returncode == 0, result.stderr
    assert [d["id"] for d in _lines(result.stdout)] == ["1", "2"]
    bad = tmp_path / "bad.csv"
    bad.write_text("id,body\n1,hello\n")
    result = run("classify", "-i", str(bad))
    assert result.returncode == 2
    assert "lacks column 'text'" in result.stderr
    assert result.stdout == ""


def test_standard_input_text_lines(run):
    """Plain lines on standard input are messages, ids by line number."""
    result = run("classify", stdin=b"A masterpiece.\nAn awful film.\n")
    assert result.returncode == 0, result.stderr
    assert [d["id"] for d in _lines(result.stdout)] == ["line-1", "line-2"]


def test_table_output(run):
    """--table prints a readable table with the label instead of JSON."""
    result = run("classify", "--table", "A joyous, beautiful film.")
    assert result.returncode == 0, result.stderr
    assert "positive" in result.stdout
    assert not result.stdout.lstrip().startswith("{")


@pytest.mark.parametrize(
    ("args", "problem"),
    [
        (("classify", "  "), "text argument 1 is empty"),
        (("classify", "-i", "/nonexistent/file.jsonl"), "no such file"),
        (("classify", "hi", "-i", "x.jsonl"), "not both"),
    ],
)
def test_usage_errors_exit_2(run, args, problem):
    """Usage errors give one clear line and exit code 2, with no traceback."""
    result = run(*args)
    assert result.returncode == 2
    assert problem in result.stderr
    assert "Traceback" not in result.stderr


def test_missing_model_exit_2(run, tmp_path):
    """Classifying without a model says how to build one."""
    result = run("classify", "hello", model=tmp_path / "no-model")
    assert result.returncode == 2
    assert "build-default" in result.stderr
    assert "Traceback" not in result.stderr


def test_tampered_model_exit_2(run, trained_model, tmp_path):
    """A model whose file hash does not match its manifest is refused."""
    copy = tmp_path / "copy"
    shutil.copytree(trained_model.directory, copy, ignore=shutil.ignore_patterns("checkpoint"))
    with (copy / ONNX_FILE).open("ab") as handle:
        handle.write(b"\0")
    result = run("classify", "hello", model=copy)
    assert result.returncode == 2
    assert "does not match" in result.stderr


def test_model_info(run, trained_model):
    """The model info command prints the verified manifest and the card."""
    result = run("model", "info", str(trained_model.directory))
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout)
    assert info["manifest"]["labels"] == ["negative", "positive", "synopsis"]
    assert info["card"]["test"]["examples"] == len(trained_model.test)


def test_train_rejects_unknown_label_before_training(run, tmp_path):
    """`tiergate train` names an unknown label's line and exits 2 without training."""
    data = tmp_path / "train.jsonl"
    data.write_text('{"text": "a", "label": "x"}\n{"text": "b", "label": "q"}\n')
    result = run("train", str(data), "-o", str(tmp_path / "m"), "--labels", "x,y")
    assert result.returncode == 2
    assert "line 2: unknown label 'q'" in result.stderr
    assert not (tmp_path / "m").exists()


def test_train_rejects_malformed_line(run, tmp_path):
    """A malformed JSONL line in training data is reported with its line number."""
    data = tmp_path / "train.jsonl"
    data.write_text('{"text": "a", "label": "x"}\n{oops\n')
    result = run("train", str(data), "-o", str(tmp_path / "m"))
    assert result.returncode == 2
    assert "line 2: malformed JSON" in result.stderr


def test_demo_classifies_the_bundled_held_out_sample(run):
    """The demo prints a table of the bundled held-out sample and how many match their label."""
    result = run("demo")
    assert result.returncode == 0, result.stderr
    assert "expected" in result.stdout
    matched, total = result.stderr.split(" match the held-out label")[0].split()[-1].split("/")
    assert int(total) == 20
    assert int(matched) >= 12
