"""``tiergate distill`` over labels the real cascade collected from the fake LLM provider."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tiergate.gateway.cli.distill import continuous
from tiergate.policies.spec import (
    Escalation,
    LabelSpec,
    LearningSpec,
    LLMSpec,
    PolicySpec,
    ProviderRef,
)
from tiergate.workers.bert.classifier import BertClassifier
from tiergate.workers.bert.distill import DistillOptions, Round
from tiergate.workers.bert.versions import ModelVersions
from tiergate.workers.cascade import PolicyBook, build_cascade
from tiergate.workers.labels import open_label_store
from tiergate.workers.llm.testing import FakeLLMServer, first_label_answer, message_of
from tiergate.workers.schemas import Message
from tiergate.workers.settings import Settings

WORDS = {"passwords": "account", "refunds": "billing", "crashes": "bug"}
# The tiny model learns its three keywords in these steps (its default rate is for real models).
LEARN = ["--epochs", "60", "--learning-rate", "5e-3", "--min-onnx-agreement", "0", "--threads", "1"]
# One epoch of distill on the tickets policy: a candidate that learns next to nothing, quickly.
ONE_EPOCH = ["distill", "--policy", "tickets", "--epochs", "1", *LEARN[4:]]


def answer_by_keyword(body: dict[str, Any]) -> dict[str, Any]:
    """The fake LLM labels a ticket by the keyword it mentions."""
    text = message_of(body)
    label = next(label for word, label in WORDS.items() if word in text)
    return {**first_label_answer(body), "label": label}


def tickets(*, auto_promote: bool = False, audit_share: float = 0.0) -> PolicySpec:
    """The tiny model's labels, every message to the fake OpenAI provider, labels collected."""
    return PolicySpec(
        name="tickets",
        version="1",
        labels=[LabelSpec(name=label) for label in ("account", "billing", "bug")],
        escalation=Escalation(min_probability=0.99),
        llm=LLMSpec(providers=[ProviderRef(provider="openai", model="gpt-4o-mini")]),
        learning=LearningSpec(collect=True, auto_promote=auto_promote, audit_share=audit_share),
    )


class Deployment:
    """A data directory serving the tiny model under the tickets policy, and its label feed."""

    def __init__(self, root: Path, model: Path, fake: FakeLLMServer, spec: PolicySpec) -> None:
        self.root = root
        self.model = model
        self.spec = spec
        self.policy_file = root / "tickets.yaml"
        self.policy_file.write_text(spec.to_yaml())
        self.settings = Settings(
            data_dir=root / "data",
            model_dir=model,
            policy_files=[self.policy_file],
            openai_api_key="test-key",
            openai_base_url=fake.openai_base_url,
            llm_max_retries=0,
        )
        self.sent = 0

    def feed(self, count: int) -> None:
        """Send ``count`` new tickets through the real cascade; the LLM labels each one."""
        cascade = build_cascade(self.settings, BertClassifier(self.model), PolicyBook([self.spec]))
        words = list(WORDS)
        messages = [
            Message(text=f"ticket {i} about {words[i % 3]}", policy="tickets")
            for i in range(self.sent, self.sent + count)
        ]
        cascade.decide(messages)
        self.sent += count

    def versions(self) -> ModelVersions:
        """The deployment's model versions."""
        return ModelVersions.from_settings(self.settings)

    def environment(self) -> dict[str, str]:
        """The environment of a ``tiergate`` process serving this deployment."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("TIERGATE_")}
        return env | {
            "TIERGATE_DATA_DIR": str(self.settings.data_dir),
            "TIERGATE_MODEL_DIR": str(self.model),
            "TIERGATE_POLICY_FILES": json.dumps([str(self.policy_file)]),
        }

    def run(self, *args: str) -> subprocess.CompletedProcess[str]:
        """``tiergate ARGS`` in a fresh interpreter with this deployment's environment."""
        return subprocess.run(
            [sys.executable, "-m", "tiergate", *args],
            capture_output=True,
            text=True,
            env=self.environment(),
            timeout=300,
            check=False,
        )


@pytest.fixture
def fake() -> Iterator[FakeLLMServer]:
    """The fake LLM provider, labelling tickets by keyword."""
    with FakeLLMServer(answer_by_keyword) as server:
        yield server


@pytest.fixture
def deployment(tiny_model, tmp_path, fake) -> Callable[..., Deployment]:
    """A factory of deployments of the tiny model (``auto_promote`` as asked)."""

    def make(*, auto_promote: bool = False, audit_share: float = 0.0) -> Deployment:
        spec = tickets(auto_promote=auto_promote, audit_share=audit_share)
        return Deployment(tmp_path, tiny_model, fake, spec)

    return make


def test_distill_adds_a_better_candidate_and_promotes_it(deployment):
    """150 LLM labels train a candidate that passes the gate; --promote makes it current.

    With --llm-accuracy the guarantee covers all messages, which the card and the table say.
    """
    served = deployment()
    served.feed(150)
    result = served.run(
        "distill",
        "--policy",
        "tickets",
        "--target-accuracy",
        "0.7",
        "--llm-accuracy",
        "0.95",
        *LEARN,
        "--promote",
    )
    assert result.returncode == 0, result.stderr
    assert "gate passed" in result.stderr
    assert "over all messages" in " ".join(result.stderr.split())
    versions = served.versions()
    current = versions.current()
    assert current is not None
    block = versions.card(current)["distillation"]
    assert block["llm_accuracy"] == 0.95
    assert block["sources"] == {"llm": 120, "person": 0, "training_file": 0}
    assert block["held_out"]["examples"] == 30
    assert block["held_out_kind"] == "newest labels"
    assert "held-out: the 30 newest labels" in " ".join(result.stderr.split())
    assert block["candidate"]["model_version"] == current
    assert f"promoted {current}" in result.stderr
    assert (versions.path(current) / "policy.yaml").is_file()


def test_promote_is_refused_when_the_gate_fails(deployment):
    """A candidate that learned nothing needs no less LLM: not promoted, exit 1."""
    served = deployment()
    served.feed(60)
    result = served.run(
        *ONE_EPOCH,
        "--promote",
    )
    assert result.returncode == 1, result.stderr
    assert "gate refused" in result.stderr
    versions = served.versions()
    assert versions.current() is None
    assert len(versions.versions()) == 1  # the candidate was still added


def test_an_audit_sample_of_min_audit_labels_judges_the_candidate(deployment):
    """With --min-audit audit labels collected (default 50), all of them are held out."""
    served = deployment(audit_share=0.3)
    served.feed(60)
    store = open_label_store(served.settings)
    try:
        audit = sum(example.audit for example in store.examples("tickets"))
    finally:
        store.close()
    assert 5 <= audit < 50  # about 18 of the 60 texts drawn, fewer than the default 50
    result = served.run(
        *ONE_EPOCH,
        "--min-audit",
        str(audit),
    )
    assert result.returncode == 0, result.stderr
    [version] = served.versions().versions()
    block = served.versions().card(version)["distillation"]
    assert block["held_out_kind"] == "audit sample"
    assert block["held_out"]["examples"] == audit
    assert block["sources"]["llm"] == 60 - audit
    assert f"held-out: the audit sample, {audit} labels" in " ".join(result.stderr.split())


def test_too_few_labels_exit_2(deployment):
    """Under 50 labels nothing trains; the message says how many there are and are needed."""
    served = deployment()
    served.feed(20)
    result = served.run("distill", "--policy", "tickets")
    assert result.returncode == 2
    assert "has 20 usable collected labels; distillation needs at least 50" in result.stderr
    assert "Traceback" not in result.stderr
    assert served.versions().versions() == []


def test_promote_and_every_together_are_a_usage_error(deployment):
    """Continuous mode promotes by the policy, so --promote with --every exits 2."""
    result = deployment().run("distill", "--policy", "tickets", "--every", "10", "--promote")
    assert result.returncode == 2
    assert "learning.auto_promote" in result.stderr


def test_an_llm_that_is_never_right_is_a_usage_error(deployment):
    """--llm-accuracy 0 keeps no guarantee over all messages: exit 2 before anything trains."""
    served = deployment()
    result = served.run("distill", "--policy", "tickets", "--llm-accuracy", "0")
    assert result.returncode == 2
    assert "--llm-accuracy must be above 0" in result.stderr
    assert served.versions().versions() == []


def _learn() -> DistillOptions:
    return DistillOptions(
        target_accuracy=0.6,
        epochs=60,
        learning_rate=5e-3,
        batch_size=16,
        min_onnx_agreement=0.0,
        threads=1,
    )


def _run_rounds(served: Deployment, rounds: int) -> list[Round]:
    """``rounds`` rounds of continuous mode, one per 80 new labels fed while the loop waits."""
    served.feed(80)
    return continuous(
        served.settings,
        "tickets",
        _learn(),
        [],
        None,
        every=80,
        rounds=rounds,
        poll_seconds=0.0,
        sleep=lambda _: served.feed(80),
    )


def test_continuous_mode_distills_per_n_new_labels_and_promotes_when_allowed(deployment):
    """A round per 80 new labels; with auto_promote a candidate is promoted iff the gate passes."""
    served = deployment(auto_promote=True)
    rounds = _run_rounds(served, 2)
    assert [r.labels for r in rounds] == [80, 160]
    assert all(r.report is not None and r.error is None for r in rounds)
    assert rounds[0].report.gate.passed  # the untrained base needs every message sent
    assert rounds[0].promoted
    assert rounds[1].promoted == rounds[1].report.gate.passed
    promoted = [r.report.model_version for r in rounds if r.promoted]
    assert served.versions().current() == promoted[-1]


def test_continuous_mode_does_not_promote_unless_the_policy_allows(deployment):
    """Without auto_promote a candidate that passes the gate is added but not promoted."""
    served = deployment(auto_promote=False)
    [only] = _run_rounds(served, 1)
    assert only.report.gate.passed
    assert not only.promoted
    versions = served.versions()
    assert versions.current() is None
    assert versions.versions() == [only.report.model_version]


def test_continuous_mode_stops_cleanly_on_ctrl_c(deployment):
    """SIGINT while waiting for labels ends the loop with a summary and exit code 0."""
    served = deployment()
    served.feed(5)
    command = [sys.executable, "-m", "tiergate", "distill", "--policy", "tickets"]
    command += ["--every", "100", "--poll-seconds", "0.2"]
    with subprocess.Popen(
        command, stderr=subprocess.PIPE, text=True, env=served.environment()
    ) as process:
        assert process.stderr is not None
        first = process.stderr.readline()  # printed once the loop runs
        assert "after every 100 new labels" in first
        process.send_signal(signal.SIGINT)
        rest = process.stderr.read()
        assert process.wait(timeout=60) == 0, rest
    assert "stopped after 0 rounds, 0 promoted" in rest
    assert "Traceback" not in rest
