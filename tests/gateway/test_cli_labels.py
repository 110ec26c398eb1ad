"""`tiergate feedback` and `tiergate labels stats|export`, run as a user runs them.

``tiergate classify`` (the tiny test model, a policy that collects labels, the fake LLM) fills
the embedded label store; the commands then correct, count and export what it holds. Also
against Redis, where the distributed workers keep it.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import tiergate_cli
from tiergate.gateway.cli.labels import export_line
from tiergate.policies.spec import (
    Escalation,
    LabelSpec,
    LearningSpec,
    LLMSpec,
    PolicySpec,
    ProviderRef,
)
from tiergate.workers.labels import CollectedExample
from tiergate.workers.llm.testing import FakeLLMServer, first_label_answer

LABELS = ("account", "billing", "bug")  # the tiny test model's (tests/conftest.py)
EMAIL = "jane.doe@example.com"

Run = Callable[..., subprocess.CompletedProcess[str]]


def billing_answer(body: dict[str, Any]) -> dict[str, Any]:
    """The fake LLM always answers 'billing'."""
    return {**first_label_answer(body), "label": "billing"}


@pytest.fixture
def fake() -> Iterator[FakeLLMServer]:
    """The fake LLM provider, answering 'billing'."""
    with FakeLLMServer(billing_answer) as server:
        yield server


@pytest.fixture(params=["sqlite", "redis"])
def run(request, tmp_path: Path, tiny_model: Path, fake: FakeLLMServer, redis_prefix: str) -> Run:
    """The CLI in a fresh interpreter over the tiny model, the fake LLM and one label store."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TIERGATE_")}
    env.update(
        {
            "COLUMNS": "200",
            "TIERGATE_DATA_DIR": str(tmp_path / "data"),
            "TIERGATE_MODEL_DIR": str(tiny_model),
            "TIERGATE_OPENAI_API_KEY": "test-key",
            "TIERGATE_OPENAI_BASE_URL": fake.openai_base_url,
            "TIERGATE_LLM_MAX_RETRIES": "0",
        }
    )
    if request.param == "redis":
        env["TIERGATE_REDIS_URL"] = "redis://127.0.0.1:6379/0"
        env["TIERGATE_CACHE_PREFIX"] = redis_prefix

    return tiergate_cli(env)


@pytest.fixture
def classified(run: Run, tmp_path: Path) -> Run:
    """Three messages classified under a collecting policy that audits (so labels) each one.

    The decisions, as ``classify`` printed them, are left in ``decisions.jsonl``.
    """
    policy = PolicySpec(
        name="support",
        version="4",
        labels=[LabelSpec(name=label) for label in LABELS],
        escalation=Escalation(min_probability=0.99),
        llm=LLMSpec(providers=[ProviderRef(provider="openai", model="gpt-4o-mini")]),
        learning=LearningSpec(collect=True, retain_days=7, audit_share=1.0),
    )
    policy_file = tmp_path / "support.yaml"
    policy_file.write_text(policy.to_yaml(), encoding="utf-8")
    messages = tmp_path / "messages.jsonl"
    texts = {"m1": f"charged twice, mail {EMAIL}", "m2": "the app crashes", "m3": "new password"}
    messages.write_text(
        "".join(json.dumps({"id": i, "text": t}) + "\n" for i, t in texts.items()),
        encoding="utf-8",
    )
    result = run("classify", "--policy", str(policy_file), "--input", str(messages))
    assert result.returncode == 0, result.stderr
    assert {json.loads(line)["tier"] for line in result.stdout.splitlines()} == {"llm"}
    (tmp_path / "decisions.jsonl").write_text(result.stdout, encoding="utf-8")
    return run


def _lines(stdout: str) -> list[dict]:
    return [json.loads(line) for line in stdout.splitlines() if line.strip()]


def test_feedback_corrects_each_line_and_reports_the_rejected(classified, tmp_path):
    """Good lines are stored in place; bad ones are reported by line, and the exit code is 1."""
    corrections = tmp_path / "feedback.jsonl"
    corrections.write_text(
        "\n".join(
            [
                json.dumps({"id": "m2", "label": "bug", "source": "agent-7"}),
                json.dumps({"id": "gone", "label": "bug"}),
                json.dumps({"id": "m3", "label": "spam"}),
                json.dumps({"id": "m3", "label": "account", "labels": ["account"]}),
                "{not json",
                json.dumps({"id": "m3", "labels": ["account"]}),
            ]
        )
        + "\n",
        encoding="utf-8",
    )
    result = classified("feedback", str(corrections))
    assert result.returncode == 1, result.stderr
    lines = _lines(result.stdout)
    assert [line["line"] for line in lines] == [1, 2, 3, 4, 5, 6]
    assert lines[0] == {
        "line": 1,
        "id": "m2",
        "labels": ["bug"],
        "source": "person:agent-7",
        "policy": "support",
    }
    assert "'gone'" in lines[1]["error"]
    assert "'spam'" in lines[2]["error"]
    assert "one of them" in lines[3]["error"]
    assert "malformed JSON" in lines[4]["error"]
    assert lines[5]["labels"] == ["account"]
    assert "corrected 2, rejected 4" in result.stderr


def test_feedback_of_an_unreadable_file_exits_2(classified, tmp_path):
    """A file that does not exist is a usage error, with a one-line message."""
    result = classified("feedback", str(tmp_path / "missing.jsonl"))
    assert result.returncode == 2
    assert "no such file" in result.stderr
    assert "Traceback" not in result.stderr


def test_labels_stats_count_by_label_and_source(classified, tmp_path):
    """After one correction: two LLM labels, one person's, and the agreement figures."""
    corrections = tmp_path / "feedback.jsonl"
    corrections.write_text(json.dumps({"id": "m2", "label": "bug"}) + "\n", encoding="utf-8")
    assert classified("feedback", str(corrections)).returncode == 0
    result = classified("labels", "stats", "--policy", "support", "--json")
    assert result.returncode == 0, result.stderr
    stats = json.loads(result.stdout)
    assert stats["examples"] == 3
    assert stats["by_label"] == {"billing": 2, "bug": 1}
    assert stats["by_kind"] == {"llm": 2, "person": 1}
    assert stats["by_source"]["llm:openai/gpt-4o-mini"] == 2
    assert stats["bert_vs_llm"]["compared"] == 3
    assert stats["llm_vs_person"] == {"compared": 1, "agreed": 0, "rate": 0.0}
    reference = {"m1": "billing", "m2": "bug", "m3": "billing"}
    decisions = _lines((tmp_path / "decisions.jsonl").read_text(encoding="utf-8"))
    bert = {d["id"]: max(d["scores"], key=d["scores"].__getitem__) for d in decisions}
    agreed = sum(bert[i] == label for i, label in reference.items())
    assert (stats["audit"]["examples"], stats["audit"]["agreed"]) == (3, agreed)
    low, high = stats["audit"]["interval"]
    assert low <= stats["audit"]["accuracy"] == agreed / 3 <= high
    table = classified("labels", "stats")
    assert table.returncode == 0, table.stderr
    assert "3 labelled example(s)" in table.stdout
    assert "agreement" in table.stdout
    assert f"BERT tier on 3 audit example(s): {agreed} agreed" in table.stdout
    assert "95% interval" in table.stdout


def test_labels_export_writes_redacted_jsonl(classified, tmp_path):
    """Every labelled example as a JSON line with the redacted text, labels, source and time."""
    out = tmp_path / "export.jsonl"
    result = classified("labels", "export", "--policy", "support", "-o", str(out))
    assert result.returncode == 0, result.stderr
    rows = _lines(out.read_text(encoding="utf-8"))
    assert len(rows) == 3
    assert {row["text"] for row in rows} == {
        "charged twice, mail [EMAIL_1]",
        "the app crashes",
        "new password",
    }
    for row in rows:
        assert set(row) >= {"text", "labels", "source", "time", "policy", "model_version"}
        assert (row["labels"], row["source"], row["policy"]) == (
            ["billing"],
            "llm:openai/gpt-4o-mini",
            "support",
        )
        assert datetime.fromisoformat(row["time"]).tzinfo is not None
        assert row["audit"] is True
    assert EMAIL not in out.read_text(encoding="utf-8")
    other = classified("labels", "export", "--policy", "nobody")
    assert (other.returncode, other.stdout) == (0, "")


def test_an_unaudited_example_exports_audit_false():
    """An example outside the audit sample says so on its export line."""
    example = CollectedExample(
        key="k",
        text="the app crashes",
        labels=["bug"],
        source="person:agent-7",
        policy="support",
        policy_version="4",
        model_version="tiny-1",
        scores={"account": 0.2, "billing": 0.2, "bug": 0.6},
        time=0.0,
    )
    assert json.loads(export_line(example))["audit"] is False
