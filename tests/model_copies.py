"""Copies of a test model that differ in what the version machinery reads.

``renamed_copy`` gives a second model version cheaply: the same weights (so the same
predictions) under another version name, which every decision and cache key then carries.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from tiergate.workers.bert.manifest import CARD_FILE, read_manifest, write_manifest

# A card whose held-out figures pass the promotion gate (the shape ``tiergate distill`` writes).
GATE_PASSING_CARD: dict[str, Any] = {
    "name": "candidate",
    "distillation": {
        "policy": "rotten-tomatoes",
        "target_accuracy": 0.9,
        "confidence": 0.9,
        "sources": {"llm": 1200, "person": 40, "training_file": 1000},
        "held_out": {"examples": 300},
        "candidate": {
            "model_version": "b",
            "accuracy": 0.83,
            "ci_low": 0.79,
            "ci_high": 0.87,
            "llm_share": 0.31,
        },
        "current": {
            "model_version": "a",
            "accuracy": 0.80,
            "ci_low": 0.75,
            "ci_high": 0.84,
            "llm_share": 0.42,
        },
    },
}


def renamed_copy(
    source: Path, target: Path, version: str, card: dict[str, Any] | None = None
) -> Path:
    """A copy of model ``source`` at ``target`` whose manifest names it ``version``.

    The weights are the same (so are the predictions); the version every decision names is
    not. ``card`` replaces its card (``model.json``) when given.
    """
    shutil.copytree(source, target)
    manifest = read_manifest(target).model_copy(update={"model_version": version})
    write_manifest(target, manifest)
    if card is not None:
        (target / CARD_FILE).write_text(json.dumps(card))
    return target


def relabelled_copy(source: Path, target: Path, labels: tuple[str, ...]) -> Path:
    """A copy of model ``source`` whose manifest gives other label names (same head size)."""
    shutil.copytree(source, target)
    manifest = read_manifest(target)
    write_manifest(
        target,
        manifest.model_copy(update={"labels": labels, "model_version": "relabelled-1"}),
    )
    return target
