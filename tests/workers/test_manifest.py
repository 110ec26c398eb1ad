import json
import pickle
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tiergate.workers.bert.manifest import (
    MANIFEST_FILE,
    ONNX_FILE,
    TOKENIZER_FILE,
    Head,
    ModelManifest,
    read_manifest,
    sha256_file,
    write_manifest,
)
from tiergate.workers.errors import (
    DataFileError,
    InputError,
    ModelError,
    ModelIntegrityError,
    ModelNotFoundError,
    RecordError,
    TiergateError,
)


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    """A model directory with two small runtime files and a manifest that hashes them."""
    directory = tmp_path / "model"
    directory.mkdir()
    (directory / ONNX_FILE).write_bytes(b"not really onnx, only hashed")
    (directory / TOKENIZER_FILE).write_bytes(b'{"version": "1.0"}')
    manifest = ModelManifest(
        name="test-model",
        model_version="test-model-0123abcd",
        labels=("negative", "positive"),
        head=Head.SINGLE_LABEL,
        max_length=128,
        temperature=1.5,
        inputs=("input_ids", "attention_mask"),
        files={name: sha256_file(directory / name) for name in (ONNX_FILE, TOKENIZER_FILE)},
    )
    write_manifest(directory, manifest)
    return directory


def edit_manifest(model_dir: Path, change: Callable[[dict[str, Any]], None]) -> None:
    """Rewrite the manifest's JSON after applying ``change`` to it."""
    path = model_dir / MANIFEST_FILE
    document = json.loads(path.read_text())
    change(document)
    path.write_text(json.dumps(document))


def raised_by_read_manifest(model_dir: Path) -> ModelError:
    """The ModelError that read_manifest raises for ``model_dir``."""
    with pytest.raises(ModelError) as caught:
        read_manifest(model_dir)
    return caught.value


def test_read_manifest_accepts_what_write_manifest_wrote(model_dir):
    """A manifest written by write_manifest over matching files reads back equal."""
    manifest = read_manifest(model_dir)

    assert manifest.name == "test-model"
    assert manifest.labels == ("negative", "positive")
    assert manifest.temperature == 1.5
    assert manifest.multi_label is False
    assert manifest.files[ONNX_FILE] == sha256_file(model_dir / ONNX_FILE)


@pytest.mark.parametrize("name", [ONNX_FILE, TOKENIZER_FILE])
def test_read_manifest_refuses_a_file_with_a_changed_byte(model_dir, name):
    """Changing one byte of a listed file raises ModelIntegrityError naming that file."""
    path = model_dir / name
    data = bytearray(path.read_bytes())
    data[0] ^= 0x01
    path.write_bytes(bytes(data))

    error = raised_by_read_manifest(model_dir)

    assert type(error) is ModelIntegrityError
    assert f"{name} does not match the SHA-256" in str(error)
    assert error.path == str(model_dir)


def test_read_manifest_without_verify_skips_the_hashes(model_dir):
    """With verify=False a changed file is not read, so the manifest still loads."""
    (model_dir / ONNX_FILE).write_bytes(b"swapped")

    assert read_manifest(model_dir, verify=False).name == "test-model"


@pytest.mark.parametrize("name", [ONNX_FILE, TOKENIZER_FILE])
def test_read_manifest_refuses_a_missing_file(model_dir, name):
    """A file the manifest lists but the directory lacks raises ModelNotFoundError naming it."""
    (model_dir / name).unlink()

    error = raised_by_read_manifest(model_dir)

    assert type(error) is ModelNotFoundError
    assert str(error) == f"model at {model_dir}: {name} is missing"


def test_read_manifest_refuses_a_missing_directory(tmp_path):
    """A model directory that does not exist raises ModelNotFoundError."""
    error = raised_by_read_manifest(tmp_path / "absent")

    assert type(error) is ModelNotFoundError
    assert "no such directory" in str(error)


def test_read_manifest_refuses_a_directory_without_a_manifest(model_dir):
    """A directory lacking manifest.json raises ModelNotFoundError naming the manifest."""
    (model_dir / MANIFEST_FILE).unlink()

    error = raised_by_read_manifest(model_dir)

    assert type(error) is ModelNotFoundError
    assert f"{MANIFEST_FILE} is missing" in str(error)


def test_read_manifest_refuses_invalid_json(model_dir):
    """A manifest that is not JSON raises ModelIntegrityError."""
    (model_dir / MANIFEST_FILE).write_text('{"name": "test-model",')

    error = raised_by_read_manifest(model_dir)

    assert type(error) is ModelIntegrityError
    assert f"{MANIFEST_FILE} is invalid" in str(error)


def _duplicate_labels(document: dict[str, Any]) -> None:
    document["labels"] = ["negative", "negative"]


def _blank_label(document: dict[str, Any]) -> None:
    document["labels"] = ["negative", "  "]


def _zero_temperature(document: dict[str, Any]) -> None:
    document["temperature"] = 0


def _onnx_file_unlisted(document: dict[str, Any]) -> None:
    del document["files"][ONNX_FILE]


def _unknown_field(document: dict[str, Any]) -> None:
    document["threshold"] = 0.5


def _future_format(document: dict[str, Any]) -> None:
    document["format_version"] = 2


@pytest.mark.parametrize(
    ("change", "field"),
    [
        pytest.param(_duplicate_labels, "labels", id="duplicate-labels"),
        pytest.param(_blank_label, "labels", id="blank-label"),
        pytest.param(_zero_temperature, "temperature", id="zero-temperature"),
        pytest.param(_onnx_file_unlisted, "files", id="onnx-unlisted"),
        pytest.param(_unknown_field, "threshold", id="unknown-field"),
        pytest.param(_future_format, "format_version", id="future-format"),
    ],
)
def test_read_manifest_refuses_invalid_fields(model_dir, change, field):
    """A manifest whose fields break the schema raises ModelIntegrityError naming the field."""
    edit_manifest(model_dir, change)

    error = raised_by_read_manifest(model_dir)

    assert type(error) is ModelIntegrityError
    assert f"{MANIFEST_FILE} is invalid: {field}" in str(error)


def test_errors_from_read_manifest_survive_pickling(model_dir, tmp_path):
    """Each error read_manifest raises unpickles to the same class, message and fields."""
    (model_dir / TOKENIZER_FILE).write_bytes(b"changed")
    errors = [raised_by_read_manifest(model_dir), raised_by_read_manifest(tmp_path / "absent")]

    for error in errors:
        copy = pickle.loads(pickle.dumps(error))  # noqa: S301 - our own bytes, just made
        assert type(copy) is type(error)
        assert str(copy) == str(error)
        assert (copy.path, copy.reason) == (error.path, error.reason)


@pytest.mark.parametrize(
    "error",
    [
        RecordError(12, "malformed JSON"),
        DataFileError("input: CSV header lacks column 'text'"),
        ModelNotFoundError(Path("/models/default"), "model.onnx is missing"),
        ModelIntegrityError("/models/default", "manifest.json is invalid"),
    ],
    ids=lambda error: type(error).__name__,
)
def test_error_classes_survive_pickling(error):
    """Every workers error unpickles to the same class, message and structured fields."""
    copy = pickle.loads(pickle.dumps(error))  # noqa: S301 - our own bytes, just made

    assert type(copy) is type(error)
    assert str(copy) == str(error)
    assert vars(copy) == vars(error)


def test_record_error_keeps_line_and_reason_through_pickling():
    """A pickled RecordError keeps its line and reason, and its message names the line."""
    copy = pickle.loads(pickle.dumps(RecordError(7, "blank line")))  # noqa: S301 - just made

    assert (copy.line, copy.reason) == (7, "blank line")
    assert str(copy) == "line 7: blank line"


def test_model_error_stores_its_path_as_a_string():
    """A ModelError built from a Path keeps the path as text, so it serialises anywhere."""
    error = ModelNotFoundError(Path("/models/default"), "gone")

    assert error.path == "/models/default"
    assert str(error) == "model at /models/default: gone"


@pytest.mark.parametrize(
    ("error_class", "parent"),
    [
        (RecordError, InputError),
        (DataFileError, InputError),
        (ModelNotFoundError, ModelError),
        (ModelIntegrityError, ModelError),
        (InputError, TiergateError),
        (ModelError, TiergateError),
    ],
)
def test_error_hierarchy(error_class, parent):
    """Each error sits under the parent the CLI and Celery catch it by."""
    assert issubclass(error_class, parent)
