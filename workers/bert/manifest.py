"""The model directory's manifest: what the BERT tier needs to load and trust a model.

A model directory holds ``model.onnx``, ``tokenizer.json``, ``manifest.json`` (this schema) and
``model.json`` (the model card: metrics, written by training). The manifest records the SHA-256
of every file the runtime reads, so a truncated copy or a swapped file is refused at load time.
"""

from __future__ import annotations

import hashlib
import json
from enum import StrEnum
from importlib import metadata
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from tiergate.workers.errors import ModelIntegrityError, ModelNotFoundError

MANIFEST_FILE = "manifest.json"
CARD_FILE = "model.json"
ONNX_FILE = "model.onnx"
TOKENIZER_FILE = "tokenizer.json"


class Head(StrEnum):
    """How logits become probabilities."""

    SINGLE_LABEL = "single_label"  # softmax: exactly one label applies
    MULTI_LABEL = "multi_label"  # sigmoid per label: any number apply


class ModelManifest(BaseModel):
    """The contract between training (which writes it) and the BERT tier (which reads it).

    ``model_version`` identifies the exact weights (name plus a digest of ``model.onnx``) and is
    stamped on every prediction and decision. ``max_length`` is the model's window in tokens,
    special tokens included; longer texts are split into overlapping windows, never truncated.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    format_version: Literal[1] = 1
    name: str = Field(min_length=1)
    model_version: str = Field(min_length=1)
    labels: tuple[str, ...] = Field(min_length=1)
    head: Head
    max_length: int = Field(ge=8, le=8192)
    temperature: float = Field(gt=0.0)
    inputs: tuple[str, ...] = Field(min_length=1)
    files: dict[str, str]
    versions: dict[str, str] = Field(default_factory=dict)
    base_model: str = ""

    @field_validator("labels")
    @classmethod
    def _labels_unique(cls, labels: tuple[str, ...]) -> tuple[str, ...]:
        if len(set(labels)) != len(labels):
            raise ValueError("labels must be unique")
        if any(not label.strip() for label in labels):
            raise ValueError("labels must be non-empty strings")
        return labels

    @field_validator("files")
    @classmethod
    def _runtime_files_listed(cls, files: dict[str, str]) -> dict[str, str]:
        missing = {ONNX_FILE, TOKENIZER_FILE} - files.keys()
        if missing:
            raise ValueError(f"files must list {sorted(missing)}")
        outside = [name for name in files if Path(name).name != name or name in {".", ".."}]
        if outside:
            raise ValueError(f"files must be plain names inside the model directory: {outside}")
        return files

    @property
    def multi_label(self) -> bool:
        """Whether the head is multi-label (sigmoid)."""
        return self.head is Head.MULTI_LABEL


def sha256_file(path: Path) -> str:
    """Hex SHA-256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_manifest(model_dir: Path, *, verify: bool = True) -> ModelManifest:
    """Read and validate ``model_dir/manifest.json``; with ``verify``, check every file hash.

    Raises:
        ModelNotFoundError: the directory, the manifest or a listed file is missing.
        ModelIntegrityError: the manifest is not valid JSON or not a valid manifest, or a file's
            SHA-256 differs from the one recorded.
    """
    if not model_dir.is_dir():
        raise ModelNotFoundError(
            model_dir,
            "no such directory (build one with `tiergate model build-default` or `tiergate train`)",
        )
    path = model_dir / MANIFEST_FILE
    if not path.is_file():
        raise ModelNotFoundError(model_dir, f"{MANIFEST_FILE} is missing")
    try:
        manifest = ModelManifest.model_validate_json(path.read_bytes())
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"]) or "manifest"
        raise ModelIntegrityError(
            model_dir, f"{MANIFEST_FILE} is invalid: {where}: {first['msg']}"
        ) from None
    if verify:
        for name, expected in manifest.files.items():
            file = model_dir / name
            if not file.is_file():
                raise ModelNotFoundError(model_dir, f"{name} is missing")
            if sha256_file(file) != expected:
                raise ModelIntegrityError(
                    model_dir, f"{name} does not match the SHA-256 in {MANIFEST_FILE}"
                )
    return manifest


def write_manifest(model_dir: Path, manifest: ModelManifest) -> Path:
    """Write ``manifest.json`` (pretty-printed, keys in schema order)."""
    path = model_dir / MANIFEST_FILE
    path.write_text(json.dumps(manifest.model_dump(mode="json"), indent=2) + "\n")
    return path


RECORDED_PACKAGES = (
    "tiergate",
    "torch",
    "transformers",
    "onnx",
    "onnxruntime",
    "tokenizers",
    "numpy",
)


def package_versions(packages: tuple[str, ...] = RECORDED_PACKAGES) -> dict[str, str]:
    """Installed versions of ``packages`` (``"unknown"`` for one that is not installed)."""
    found = {}
    for package in packages:
        try:
            found[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            found[package] = "unknown"
    return found
