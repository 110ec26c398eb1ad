"""The tiergate CLI end to end, as a user runs it: a real process over a real ONNX model."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import pytest

from tiergate.workers.bert.manifest import ONNX_FILE


def tiergate(
    *args: str,
    model: Path | None,
    data_dir: Path,
    stdin: bytes | None = None,
    missing: Sequence[str] = (),
) -> subprocess.CompletedProcess[str]:
    """Run the CLI in a fresh interpreter, as a user would; ``missing`` modules fail to import."""
    env = {
        name: value
        for name, value in os.environ.items()
        if not name.endswith("_API_KEY") and not name.startswith("TIERGATE_")
    }
    env["TIERGATE_DATA_DIR"] = str(data_dir)
    if model is not None:
        env["TIERGATE_MODEL_DIR"] = str(model)
    command = [sys.executable, "-m", "tiergate", *args]
    if missing:  # a module set to None in sys.modules raises ImportError, as if not installed
        hide = "".join(f"sys.modules[{name!r}] = None; " for name in missing)
        program = f"import runpy, sys; {hide}runpy.run_module('tiergate', run_name='__main__')"
        command = [sys.executable, "-c", program, *args]
    return subprocess.run(
        command,
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

    def _run(
        *args: str,
        stdin: bytes | None = None,
        model: Path | None = trained_model.directory,
        missing: Sequence[str] = (),
    ):
        return tiergate(
            *args, model=model, data_dir=tmp_path / "data", stdin=stdin, missing=missing
        )

    return _run


def test_classify_texts_as_arguments(run, trained_model):
    """Texts given as arguments get one decision each, in order, under the model's policy.

    With no LLM provider configured, a message the policy routes to the LLM is answered by the
    BERT tier and says so.
    """
    result = run("classify", "An utterly delightful film.", "A dull, lifeless mess.")
    assert result.returncode == 0, result.stderr
    decisions = _lines(result.stdout)
    assert [d["id"] for d in decisions] == ["arg-1", "arg-2"]
    assert [d["label"] for d in decisions] == ["positive", "negative"]
    for decision in decisions:
        assert decision["tier"] == "bert"
        assert decision["policy"] == "rotten-tomatoes"
        assert decision["model_version"] == trained_model.card.model_version
        assert sum(decision["scores"].values()) == pytest.approx(1.0, abs=1e-6)
        confident = max(decision["scores"].values()) >= 0.8
        assert decision["reason"] == ("confident" if confident else "low_confidence")
        assert decision["llm_skipped"] == (None if confident else "no_provider")
    assert "2 messages: 2 answered, 0 rejected" in result.stderr
    assert "answered by bert 2 (100%), llm 0 (0%)" in result.stderr


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


def test_extra_fields_follow_the_message_rule(run, tmp_path):
    """Extra scalar fields travel as metadata; an extra list is rejected in place, named.

    A metadata key of the same name wins over an extra field, and a column that --text-field
    passed over is metadata too.
    """
    path = tmp_path / "in.jsonl"
    path.write_text(
        '{"id": "a", "review": "A fine film.", "lang": "en", "metadata": {"lang": "fr"}}\n'
        '{"id": "b", "review": "Dull.", "tags": ["x", "y"]}\n'
        '{"id": "c", "review": "Lovely.", "text": "a column of its own", "stars": 4}\n'
    )
    out = tmp_path / "out.jsonl"
    result = run("classify", "-i", str(path), "-o", str(out), "--text-field", "review")
    assert result.returncode == 1, result.stderr
    first, second, third = _lines(out.read_text())
    assert first["metadata"] == {"lang": "fr"}
    assert second["line"] == 2
    assert "'tags'" in second["error"]
    assert "must be a JSON scalar" in second["error"]
    assert third["metadata"] == {"text": "a column of its own", "stars": 4}


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
    """The demo runs the cascade on the held-out sample: tier shares, and a cache hit."""
    result = run("demo")
    assert result.returncode == 0, result.stderr
    assert "expected" in result.stdout
    assert "a local simulated LLM" in result.stderr
    assert "answered by bert" in result.stderr
    assert "answered from the cache" in result.stderr
    matched, total = result.stderr.split(" match the held-out label")[0].split()[-1].split("/")
    assert int(total) == 20
    assert int(matched) >= 12


def _policy_file(tmp_path: Path, **escalation: float) -> Path:
    """The default model's policy with other thresholds, written to a file."""
    from tiergate.policies.spec import Escalation, example_policy

    spec = example_policy("rotten-tomatoes")
    changed = spec.with_escalation(Escalation(**escalation), version="test")
    path = tmp_path / "policy.yaml"
    path.write_text(changed.to_yaml())
    return path


def test_policy_option_routes_everything_when_the_threshold_is_one(run, tmp_path):
    """A policy demanding certainty sends every message towards the LLM (skipped: no key)."""
    policy = _policy_file(tmp_path, min_probability=1.0)
    result = run("classify", "--policy", str(policy), "A fine film.", "Two men rob a bank.")
    assert result.returncode == 0, result.stderr
    decisions = _lines(result.stdout)
    assert {(d["reason"], d["llm_skipped"], d["policy_version"]) for d in decisions} == {
        ("low_confidence", "no_provider", "test")
    }
    assert "LLM step skipped: no_provider 2" in result.stderr


def test_repeated_run_is_answered_from_the_cache_unless_disabled(run, tmp_path):
    """The second run of the same text is a cache hit; --no-cache recomputes it."""
    policy = ("--policy", str(_policy_file(tmp_path, min_probability=0.0)))
    first = _lines(run("classify", *policy, "A warm, funny film.").stdout)[0]
    second = _lines(run("classify", *policy, "A  warm, funny film. ").stdout)[0]
    uncached = _lines(run("classify", *policy, "--no-cache", "A warm, funny film.").stdout)[0]
    assert (first["cached"], second["cached"], uncached["cached"]) == (False, True, False)
    assert second["label"] == first["label"]


def test_unknown_policy_in_a_record_is_rejected_in_place(run, tmp_path):
    """A record naming a policy that is not loaded is reported on its line; the rest answered."""
    data = tmp_path / "in.jsonl"
    data.write_text(
        json.dumps({"id": "a", "text": "Lovely."})
        + "\n"
        + json.dumps({"id": "b", "text": "Awful.", "policy": "nope"})
        + "\n"
    )
    result = run("classify", "-i", str(data))
    assert result.returncode == 1
    lines = _lines(result.stdout)
    assert lines[0]["id"] == "a"
    assert lines[1]["line"] == 2
    assert "unknown policy 'nope'" in lines[1]["error"]


def test_policy_that_does_not_fit_the_model_is_a_usage_error(run, tmp_path):
    """A policy whose labels differ from the model's exits 2 naming the mismatch."""
    from tiergate.policies.spec import example_policy

    path = tmp_path / "tickets.yaml"
    path.write_text(example_policy("ticket-routing").to_yaml())
    result = run("classify", "--policy", str(path), "hello")
    assert result.returncode == 2
    assert "does not match the model's labels" in result.stderr
    assert "Traceback" not in result.stderr


def _labelled_file(tmp_path: Path, examples) -> Path:
    path = tmp_path / "labelled.jsonl"
    path.write_text(
        "".join(
            json.dumps({"id": f"v{i}", "text": e.text, "label": e.labels[0]}) + "\n"
            for i, e in enumerate(examples)
        )
    )
    return path


def test_calibrate_for_llm_share_writes_a_new_policy_version(run, trained_model, tmp_path):
    """Goal (b): the new policy sends at most the asked share of the data to the LLM."""
    from tiergate.policies.spec import load_policy

    data = _labelled_file(tmp_path, trained_model.validation)
    out = tmp_path / "calibrated.yaml"
    result = run("calibrate", str(data), "--llm-share", "0.25", "-o", str(out))
    assert result.returncode == 0, result.stderr
    spec = load_policy(out)
    assert spec.version.startswith("1+cal.")
    assert "sent to LLM" in result.stderr
    routed = _lines(run("classify", "--no-cache", "--policy", str(out), "-i", str(data)).stdout)
    share = sum(d["reason"] != "confident" for d in routed) / len(routed)
    assert share <= 0.25


def test_calibrate_for_accuracy_reports_the_bound_or_refuses(run, trained_model, tmp_path):
    """Goal (a): a reachable target writes a policy with its bound; 100% is refused, exit 1."""
    data = _labelled_file(tmp_path, trained_model.validation)
    out = tmp_path / "calibrated.yaml"
    result = run("calibrate", str(data), "--target-accuracy", "0.8", "-o", str(out))
    assert result.returncode == 0, result.stderr
    assert "error upper bound" in result.stderr
    impossible = run("calibrate", str(data), "--target-accuracy", "1.0", "-o", str(out) + "x")
    assert impossible.returncode == 1
    assert "no threshold reaches the goal" in impossible.stderr
    assert not Path(str(out) + "x").exists()
    both = run("calibrate", str(data), "--llm-share", "0.1", "--target-accuracy", "0.9", "-o", "x")
    assert both.returncode == 2


def test_eval_with_a_simulated_llm_writes_json_and_a_plot(run, trained_model, tmp_path):
    """The simulated evaluation reports BERT-only, LLM-only, the policy and the matched share."""
    data = _labelled_file(tmp_path, trained_model.test)
    report, plot = tmp_path / "eval.json", tmp_path / "eval.png"
    result = run(
        "eval", str(data), "--simulate-accuracy", "0.95", "--json", str(report), "--plot", str(plot)
    )
    assert result.returncode == 0, result.stderr
    document = json.loads(report.read_text())
    assert document["simulated"] is True
    assert document["bert_only"]["llm_share"] == 0.0
    assert document["llm_only"]["llm_share"] == 1.0
    assert 0.0 <= document["matched_point"]["llm_share"] <= 1.0
    assert plot.read_bytes().startswith(b"\x89PNG")
    assert "simulated LLM" in result.stderr
    assert "LLM only" in result.stdout


def test_eval_reports_each_labels_figures(run, trained_model, tmp_path):
    """`tiergate eval` writes and prints each label's precision, recall, F1 and support."""
    data = _labelled_file(tmp_path, trained_model.test)
    report = tmp_path / "eval.json"
    result = run("eval", str(data), "--simulate-accuracy", "0.95", "--json", str(report))
    assert result.returncode == 0, result.stderr
    per_class = json.loads(report.read_text())["per_class"]
    counts = {}
    for example in trained_model.test:
        counts[example.labels[0]] = counts.get(example.labels[0], 0) + 1
    for point in ("bert_only", "operating_point"):
        figures = per_class[point]
        assert {label: f["support"] for label, f in figures.items() if f["support"]} == counts
        assert all(0.0 <= f["f1"] <= 1.0 for f in figures.values())
    assert "per label" in result.stdout


def test_eval_replays_recorded_answers_by_id(run, trained_model, tmp_path):
    """Recorded answers that are all right make LLM-only accuracy 100%; missing ids count wrong."""
    examples = trained_model.test[:40]
    data = _labelled_file(tmp_path, examples)
    replay = tmp_path / "replay.jsonl"
    replay.write_text(
        "".join(
            json.dumps({"id": f"v{i}", "label": e.labels[0], "cost_usd": 0.001}) + "\n"
            for i, e in enumerate(examples[:-4])
        )
    )
    report = tmp_path / "eval.json"
    result = run(
        "eval",
        str(data),
        "--replay",
        str(replay),
        "--json",
        str(report),
        "--plot",
        str(tmp_path / "p.png"),
    )
    assert result.returncode == 0, result.stderr
    document = json.loads(report.read_text())
    assert document["missing_llm_answers"] == 4
    assert document["llm_only"]["accuracy"] == pytest.approx(36 / 40)
    assert document["llm_only"]["cost_per_1000"] == pytest.approx(1000 * 0.001)
    assert document["simulated"] is False


def test_eval_plot_without_matplotlib_names_the_extra_to_install(run, trained_model, tmp_path):
    """Without matplotlib, --plot exits 2 before any work, naming the `plot` extra, in one line.

    Without --plot, eval needs no matplotlib: it writes the JSON report and no plot.
    """
    data = _labelled_file(tmp_path, trained_model.test[:40])
    report, plot = tmp_path / "eval.json", tmp_path / "eval.png"
    args = ("eval", str(data), "--simulate-accuracy", "0.95", "--json", str(report))
    refused = run(*args, "--plot", str(plot), missing=["matplotlib"])
    assert refused.returncode == 2
    assert refused.stderr == "error: --plot needs matplotlib: pip install 'tiergate[plot]'\n"
    assert not report.exists()
    assert not plot.exists()
    plain = run(*args, missing=["matplotlib"])
    assert plain.returncode == 0, plain.stderr
    assert json.loads(report.read_text())["simulated"] is True
    assert not plot.exists()


def test_the_cli_loads_no_matplotlib_until_a_plot_is_drawn():
    """Importing the CLI and its commands leaves matplotlib unimported."""
    probe = "import sys, tiergate.gateway.cli; print('matplotlib' in sys.modules)"
    loaded = subprocess.run(
        [sys.executable, "-c", probe], check=True, capture_output=True, text=True
    ).stdout
    assert loaded.strip() == "False"


def test_eval_rejects_a_replay_label_outside_the_policy(run, trained_model, tmp_path):
    """A recorded answer naming an unknown label is a usage error naming the line."""
    data = _labelled_file(tmp_path, trained_model.test[:5])
    replay = tmp_path / "replay.jsonl"
    replay.write_text(json.dumps({"id": "v0", "label": "maybe"}) + "\n")
    result = run("eval", str(data), "--replay", str(replay))
    assert result.returncode == 2
    assert "line 1" in result.stderr
    assert "maybe" in result.stderr


def test_policy_check_validates_files_against_the_model(run, tmp_path):
    """A fitting policy is summarised; a broken or non-fitting one exits 2 naming the problem."""
    good = _policy_file(tmp_path, min_probability=0.7)
    result = run("policy", "check", str(good))
    assert result.returncode == 0, result.stderr
    assert "rotten-tomatoes" in result.stdout
    assert "p < 0.7" in result.stdout
    broken = tmp_path / "broken.yaml"
    broken.write_text("name: x\nversion: '1'\nlabels: []\n")
    bad = run("policy", "check", str(broken))
    assert bad.returncode == 2
    assert "labels" in bad.stderr
    assert "Traceback" not in bad.stderr
    moderation = tmp_path / "moderation.yaml"
    moderation.write_text(run("policy", "show", "moderation").stdout)
    assert run("policy", "check", "--no-against-model", str(moderation)).returncode == 0
    assert run("policy", "check", str(moderation)).returncode == 2


def test_policy_examples_lists_the_shipped_policies(run):
    """The shipped policies are listed by name; an unknown name for show exits 2."""
    result = run("policy", "examples")
    assert result.returncode == 0, result.stderr
    for name in ("rotten-tomatoes", "ticket-routing", "moderation"):
        assert name in result.stdout
    assert run("policy", "show", "nope").returncode == 2


def _summary_cost(stderr: str) -> str:
    """The dollar figure of the closing summary's ``LLM cost $...``."""
    return stderr.split("LLM cost $", 1)[1].split(maxsplit=1)[0]


def test_identical_messages_answered_by_one_llm_call_are_paid_for_once(
    trained_model, fake_llm, tmp_path
):
    """Two copies of a routed text cost one call, in the decisions and in the summary."""
    env = {
        name: value
        for name, value in os.environ.items()
        if not name.endswith("_API_KEY") and not name.startswith("TIERGATE_")
    }
    env |= {
        "TIERGATE_DATA_DIR": str(tmp_path / "data"),
        "TIERGATE_MODEL_DIR": str(trained_model.directory),
        "TIERGATE_OPENAI_API_KEY": "test-key",
        "TIERGATE_OPENAI_BASE_URL": fake_llm.openai_base_url,
        # A price high enough that one call shows in the summary's four decimals.
        "TIERGATE_LLM_PRICES": '{"gpt-4o-mini": {"input_per_mtok": 100, "output_per_mtok": 100}}',
    }
    policy = _policy_file(tmp_path, min_probability=1.0)
    texts = ["A fine film.", "A fine film."]
    result = subprocess.run(
        [sys.executable, "-m", "tiergate", "classify", "--policy", str(policy), *texts],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    decisions = _lines(result.stdout)
    assert [d["tier"] for d in decisions] == ["llm", "llm"]
    assert fake_llm.calls == 1
    costs = sorted(d["llm"]["cost_usd"] for d in decisions)
    assert costs[0] == 0.0
    assert costs[1] > 0.0001
    assert _summary_cost(result.stderr) == f"{costs[1]:.4f}"


def test_submitting_answered_messages_again_reports_no_llm_cost(make_cluster, fake_llm, tmp_path):
    """A second `tiergate submit` of answered ids gets their decisions without paying again."""
    from cluster import default_test_policy

    cluster = make_cluster(policy=default_test_policy(min_probability=1.0))
    cluster.start_worker("bert")
    cluster.start_worker("llm")
    data = tmp_path / "in.jsonl"
    data.write_text(
        "".join(
            json.dumps({"id": f"r-{i}", "text": f"Review {i}: a film about a town."}) + "\n"
            for i in range(24)
        )
    )

    def submit(path: Path = data) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            # The bound includes the workers' start (cold) on a loaded machine.
            [sys.executable, "-m", "tiergate", "submit", str(path), "--timeout", "300"],
            env=cluster.env,
            capture_output=True,
            text=True,
            timeout=600,
            check=False,
        )

    first = submit()
    assert first.returncode == 0, first.stderr
    assert float(_summary_cost(first.stderr)) > 0
    calls = fake_llm.calls
    second = submit()
    assert second.returncode == 0, second.stderr
    assert {d["tier"] for d in _lines(second.stdout)} == {"llm"}
    assert _summary_cost(second.stderr) == "0.0000"
    assert "24 answered earlier" in second.stderr
    assert fake_llm.calls == calls
    # An answered id with another text is refused, not given the earlier text's decision.
    other = tmp_path / "other.jsonl"
    other.write_text(json.dumps({"id": "r-0", "text": "Another film entirely."}) + "\n")
    reused = submit(other)
    assert reused.returncode == 1, reused.stderr
    assert "rejected r-0: id 'r-0' was answered before for another text" in reused.stderr
    assert _lines(reused.stdout) == [
        {"id": "r-0", "error": "id 'r-0' was answered before for another text"}
    ]
    assert fake_llm.calls == calls


def test_calibrate_explains_a_target_the_data_cannot_certify(run, trained_model, tmp_path):
    """Under 176 messages cannot certify 95%: exit 1 naming what they certify and what would."""
    data = _labelled_file(tmp_path, trained_model.validation)
    size = len(trained_model.validation)
    assert size < 176
    out = tmp_path / "calibrated.yaml"
    result = run("calibrate", str(data), "--target-accuracy", "0.95", "-o", str(out))
    assert result.returncode == 1
    assert not out.exists()
    stated = f"target 95.0% at 95.0% confidence is not certified by these {size} messages"
    assert stated in result.stderr
    assert "Highest target they certify: " in result.stderr
    assert "validation messages would certify 95.0%" in result.stderr or (
        "No amount of validation data certifies 95.0%" in result.stderr
    )
    # entering the test takes 176 accepted answers, so no threshold was tested or shown as one
    assert "none: each keeps under 176 answers" in result.stderr
    assert "error upper bound" not in result.stderr


def test_calibrate_per_label_writes_overrides_that_classify_honours(run, trained_model, tmp_path):
    """--per-label: the label groups are shown; the policy written loads and routes with them."""
    from tiergate.policies.spec import load_policy

    data = _labelled_file(tmp_path, trained_model.validation)
    out = tmp_path / "per-label.yaml"
    result = run("calibrate", str(data), "--target-accuracy", "0.6", "--per-label", "-o", str(out))
    assert result.returncode == 0, result.stderr
    assert "label groups" in result.stderr
    spec = load_policy(out)
    assert spec.version.startswith("1+cal.")
    rules = spec.escalation
    assert rules.per_label
    for label in spec.label_names:
        assert f"{label} (own threshold)" in result.stderr or label not in rules.per_label
    if set(rules.per_label) != set(spec.label_names):
        assert "kept the global threshold" in result.stderr
    routed = _lines(run("classify", "--no-cache", "--policy", str(out), "-i", str(data)).stdout)
    assert len(routed) == len(trained_model.validation)
    for decision in routed:
        scores = sorted(decision["scores"].values(), reverse=True)
        top = max(decision["scores"], key=decision["scores"].get)
        kept = scores[0] >= rules.min_probability_for(top) and (
            scores[0] - scores[1] >= rules.min_margin_for(top)
        )
        assert (decision["reason"] == "confident") == kept


def test_calibrate_per_label_outside_its_scope_is_a_usage_error(run, make_tiny_model, tmp_path):
    """--per-label with --llm-share, or on a multi-label model, exits 2 saying where it applies."""
    from tiergate.workers.bert.dataset import LabelledExample

    with_share = run("calibrate", "x.jsonl", "--llm-share", "0.2", "--per-label", "-o", "x.yaml")
    assert with_share.returncode == 2
    assert "--per-label applies to goal (a), --target-accuracy" in with_share.stderr
    labels = ("spam", "abuse")
    examples = [
        LabelledExample(text=f"comment {i} about {word}", labels=flags, line=i + 1)
        for i, (word, flags) in enumerate([("pills", ("spam",)), ("insults", ("abuse",))] * 12)
    ]
    model = make_tiny_model("tiny-flags", labels, examples, multi_label=True)
    data = tmp_path / "flags.jsonl"
    data.write_text(
        "".join(
            json.dumps({"id": f"f{i}", "text": e.text, "labels": list(e.labels)}) + "\n"
            for i, e in enumerate(examples)
        )
    )
    out = tmp_path / "flags.yaml"
    goal = ("--target-accuracy", "0.6", "--per-label")
    multi = run("calibrate", str(data), *goal, "-o", str(out), model=model)
    assert multi.returncode == 2
    assert "--per-label applies to single-label policies" in multi.stderr
    assert "Traceback" not in multi.stderr
    assert not out.exists()


def _llm_share_under(run, policy: Path, data: Path) -> float:
    """The share of ``data`` that ``classify`` sends to the LLM under ``policy``."""
    routed = _lines(run("classify", "--no-cache", "--policy", str(policy), "-i", str(data)).stdout)
    assert routed
    return sum(d["reason"] != "confident" for d in routed) / len(routed)


def test_calibrate_over_all_messages_sends_no_more_to_the_llm(
    run, trained_model, tmp_path, monkeypatch
):
    """--llm-accuracy above the target: the policy sends no more out, the table says the scope."""
    monkeypatch.setenv("COLUMNS", "200")  # wide enough that rich keeps each cell on one line
    data = _labelled_file(tmp_path, trained_model.validation)
    accepted_only, over_all = tmp_path / "accepted.yaml", tmp_path / "over-all.yaml"
    plain = run("calibrate", str(data), "--target-accuracy", "0.8", "-o", str(accepted_only))
    assert plain.returncode == 0, plain.stderr
    scoped = run(
        "calibrate", str(data), "--target-accuracy", "0.8", "--llm-accuracy", "0.95",
        "-o", str(over_all),
    )  # fmt: skip
    assert scoped.returncode == 0, scoped.stderr
    assert "accuracy 80.0% over all messages (LLM at 95.0%) at 95.0% confidence" in scoped.stderr
    assert "expected accuracy, all messages" in scoped.stderr
    assert "over all messages" not in plain.stderr
    assert _llm_share_under(run, over_all, data) <= _llm_share_under(run, accepted_only, data)


@pytest.mark.parametrize(
    ("args", "problem"),
    [
        (("--llm-share", "0.2", "--llm-accuracy", "0.9"), "--llm-accuracy applies to goal (a)"),
        (
            ("--target-accuracy", "0.8", "--per-label", "--llm-accuracy", "0.9"),
            "--llm-accuracy and --per-label cannot be combined",
        ),
        (("--target-accuracy", "0.8", "--llm-accuracy", "0"), "--llm-accuracy must be above 0"),
        (("--target-accuracy", "0.8", "--llm-accuracy", "1.5"), "--llm-accuracy"),
    ],
)
def test_calibrate_llm_accuracy_outside_its_scope_is_a_usage_error(run, tmp_path, args, problem):
    """--llm-accuracy with goal (b), with --per-label, or out of (0, 1] exits 2 naming it."""
    out = tmp_path / "x.yaml"
    result = run("calibrate", "x.jsonl", *args, "-o", str(out))
    assert result.returncode == 2
    assert problem in result.stderr
    assert "Traceback" not in result.stderr
    assert not out.exists()
