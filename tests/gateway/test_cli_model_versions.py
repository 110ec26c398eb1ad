"""``tiergate model add|list|shadow|status|promote|rollback``, run as a user runs them.

Embedded mode: the pointers live in ``<store>/pointers.json``; ``tiergate classify`` follows
them as a worker would and scores a shadow candidate beside the current model.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from model_copies import GATE_PASSING_CARD, renamed_copy
from tests.conftest import tiergate_cli
from tiergate.policies.spec import LearningSpec, PolicySpec
from tiergate.workers.bert.classifier import BertClassifier
from tiergate.workers.bert.manifest import read_manifest
from tiergate.workers.cascade import Cascade, PolicyBook
from tiergate.workers.labels import open_label_store
from tiergate.workers.schemas import Message
from tiergate.workers.settings import Settings

Run = Callable[..., subprocess.CompletedProcess[str]]


@pytest.fixture
def run(tiny_model: Path, tmp_path: Path) -> Run:
    """The CLI in a fresh interpreter over the tiny model, with a scratch data directory."""
    env = {
        name: value
        for name, value in os.environ.items()
        if not name.startswith("TIERGATE_") and not name.endswith("_API_KEY")
    }
    env |= {"TIERGATE_DATA_DIR": str(tmp_path / "data"), "TIERGATE_MODEL_DIR": str(tiny_model)}

    return tiergate_cli(env)


def status(run: Run) -> dict:
    """``tiergate model status`` as JSON."""
    result = run("model", "status")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_add_promote_rollback_from_the_command_line(run, tiny_model, tmp_path) -> None:
    """A refused promotion exits 2 naming why; --force promotes and says so; rollback returns."""
    v1 = read_manifest(tiny_model).model_version
    worse = renamed_copy(tiny_model, tmp_path / "worse", "tiny-worse")  # a card with no figures
    added = run("model", "add", str(worse))
    assert added.returncode == 0, added.stderr
    assert added.stdout.strip() == "tiny-worse"

    refused = run("model", "promote", "tiny-worse")
    assert refused.returncode == 2
    assert "no held-out figures" in refused.stderr
    assert "Traceback" not in refused.stderr
    assert status(run)["current"] is None

    forced = run("model", "promote", "tiny-worse", "--force")
    assert forced.returncode == 0, forced.stderr
    assert "promoted by force" in forced.stderr
    now = status(run)
    assert (now["current"], now["previous"]) == ("tiny-worse", [v1])
    assert now["audit"][-1]["forced"] is True

    listed = run("model", "list").stdout.splitlines()
    assert sorted(listed) == sorted(["tiny-worse\tcurrent", f"{v1}\tprevious 1"])

    back = run("model", "rollback")
    assert back.returncode == 0, back.stderr
    assert status(run)["current"] == v1
    again = run("model", "rollback")
    assert again.returncode == 2
    assert "no previous model version" in again.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("model", "promote", "nope"), "unknown model version 'nope'"),
        (("model", "shadow"), "give a VERSION to shadow, or --clear"),
        (("model", "add", "/no/such/model"), "no such directory"),
    ],
)
def test_bad_input_is_a_one_line_error_and_exit_2(run, args, message) -> None:
    """An unknown version, a missing argument or a missing directory: a message, exit 2."""
    result = run(*args)
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr


def test_a_shadow_candidate_scores_classify_traffic_and_status_shows_it(
    run, tiny_model, tmp_path
) -> None:
    """Status shows the candidate, its figures on the texts classified, and its gate result."""
    v1 = read_manifest(tiny_model).model_version
    candidate = renamed_copy(tiny_model, tmp_path / "v2", "tiny-v2", GATE_PASSING_CARD)
    assert run("model", "add", str(candidate)).returncode == 0
    assert run("model", "shadow", "tiny-v2").returncode == 0
    classified = run("classify", "refunds please", "my password", "it crashes")
    assert classified.returncode == 0, classified.stderr
    decisions = [json.loads(line) for line in classified.stdout.splitlines()]
    assert {d["model_version"] for d in decisions} == {v1}, "the shadow decides nothing"
    now = status(run)
    assert now["candidate"] == "tiny-v2"
    (figures,) = now["shadow"].values()
    assert (figures["scored"], figures["compared"], figures["agreement"]) == (3, 3, 1.0)
    assert now["gate"] == {"passed": True, "reasons": []}
    assert run("model", "shadow", "--clear").returncode == 0
    assert status(run)["candidate"] is None


def test_status_shows_agreement_with_peoples_corrections(run, tiny_model, tmp_path) -> None:
    """People's corrections, kept after the decisions, are scored by candidate and current."""
    manifest = read_manifest(tiny_model)
    spec = PolicySpec.for_labels(manifest.labels, multi_label=False).model_copy(
        update={"learning": LearningSpec(collect=True)}
    )
    store = open_label_store(Settings(data_dir=tmp_path / "data"))
    classifier = BertClassifier(tiny_model)
    texts = ["refunds please", "my password", "it crashes", "thanks a lot"]
    messages = [Message(id=f"m{i}", text=text) for i, text in enumerate(texts)]
    Cascade(classifier, PolicyBook([spec]), labels=store).decide(messages)
    predictions = classifier.predict(texts)
    # The person agrees with the model on every other text and overrules it on the rest.
    for i, (message, prediction) in enumerate(zip(messages, predictions, strict=True)):
        other = next(label for label in manifest.labels if label != prediction.top_label)
        store.correct(message.id, [prediction.top_label if i % 2 else other], source="agent-7")
    candidate = renamed_copy(tiny_model, tmp_path / "v2", "tiny-v2", GATE_PASSING_CARD)
    assert run("model", "add", str(candidate)).returncode == 0
    assert run("model", "shadow", "tiny-v2").returncode == 0
    assert status(run)["people"] == {
        spec.name: {
            "examples": 4,
            "candidate_agreement": 0.5,
            "current_agreement": 0.5,
        }
    }
