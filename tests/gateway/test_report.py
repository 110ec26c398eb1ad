"""Reports: the evaluation JSON and PNG, and the rich tables of eval and calibrate."""

from __future__ import annotations

import json
import re
import struct
import sys
from dataclasses import replace

import numpy as np
import pytest
from rich.console import Console

from tiergate.gateway.report import (
    calibration_table,
    evaluation_per_class_table,
    evaluation_table,
    per_class_table,
    simulated_title,
    unreached_accuracy,
    write_evaluation,
)
from tiergate.policies.calibrate import (
    LabelGroup,
    PerLabelCalibration,
    ThresholdTest,
    calibrate_for_accuracy,
    calibrate_for_llm_share,
)
from tiergate.policies.class_metrics import per_class_metrics
from tiergate.policies.evaluate import evaluate_cascade, simulate_llm
from tiergate.policies.prediction import Prediction
from tiergate.policies.spec import Escalation, LabelSpec, PolicySpec

LABELS = ("neg", "pos")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def labelled():
    """300 calibrated two-label predictions with gold labels, and a policy."""
    rng = np.random.default_rng(0)
    predictions, gold = [], []
    for c, draw, top in zip(
        rng.uniform(0.5, 1.0, 300), rng.random(300), rng.integers(0, 2, 300), strict=True
    ):
        probabilities = (float(c), 1 - float(c)) if top == 0 else (1 - float(c), float(c))
        predictions.append(
            Prediction(
                labels=LABELS,
                probabilities=probabilities,
                multi_label=False,
                chunks=1,
                model_version="test",
            )
        )
        gold.append(LABELS[top] if draw < c else LABELS[1 - top])
    spec = PolicySpec(
        name="reviews",
        version="3",
        labels=[LabelSpec(name=n) for n in LABELS],
        escalation=Escalation(min_probability=0.8),
    )
    return predictions, gold, spec


@pytest.fixture(scope="module")
def evaluation(labelled):
    """The cascade on the labelled set with a simulated LLM and one missing answer."""
    predictions, gold, spec = labelled
    llm = simulate_llm(gold, LABELS, 0.95, seed=0)
    llm[0] = None
    return evaluate_cascade(predictions, gold, llm, 0.0025, spec)


def render(table) -> str:
    """The table as plain text, the way a terminal shows it."""
    console = Console(record=True, width=120)
    console.print(table)
    return console.export_text()


def test_write_evaluation_writes_json_with_the_reported_fields(tmp_path, evaluation):
    """The JSON holds the title, the simulation flag and every reported point."""
    json_path, png_path = tmp_path / "out" / "eval.json", tmp_path / "out" / "eval.png"
    write_evaluation(evaluation, json_path, png_path, title="reviews v3", simulated=True)
    data = json.loads(json_path.read_text(encoding="utf-8"))
    assert data["title"] == "reviews v3"
    assert data["simulated"] is True
    for field in (
        "bert_only",
        "llm_only",
        "operating_point",
        "matched_point",
        "matched_accuracy_llm_share",
        "cost_saving_vs_llm_only",
        "missing_llm_answers",
        "curve",
    ):
        assert field in data
    assert data["missing_llm_answers"] == 1
    assert data["operating_point"]["llm_share"] == evaluation.operating_point.llm_share
    assert len(data["curve"]) == 101


def test_write_evaluation_draws_a_png_of_sensible_size(tmp_path, evaluation):
    """The plot is a real PNG of the figure's pixel size and more than a blank canvas."""
    png_path = tmp_path / "eval.png"
    write_evaluation(evaluation, tmp_path / "eval.json", png_path, title="t", simulated=False)
    data = png_path.read_bytes()
    assert data.startswith(PNG_SIGNATURE)
    width, height = struct.unpack(">II", data[16:24])  # the IHDR chunk follows the signature
    assert (width, height) == (960, 600)
    assert 20_000 < len(data) < 2_000_000


def test_write_evaluation_without_a_plot_writes_only_the_json(tmp_path, evaluation, monkeypatch):
    """With no PNG path the JSON is written and matplotlib is never imported."""
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # importing it would raise
    write_evaluation(evaluation, tmp_path / "eval.json", None, title="t", simulated=False)
    assert json.loads((tmp_path / "eval.json").read_text(encoding="utf-8"))["title"] == "t"
    assert [path.name for path in tmp_path.iterdir()] == ["eval.json"]


def test_evaluation_table_shows_the_figures(evaluation):
    """The rendered table holds each point's share, accuracy and cost, and the notes."""
    text = render(evaluation_table(evaluation))
    assert "reviews (3): 300 messages" in text
    for name in ("BERT only", "policy", "within 1 pt of LLM", "LLM only"):
        assert name in text
    assert f"{100 * evaluation.bert_only.accuracy:.1f}%" in text
    assert f"{100 * evaluation.operating_point.llm_share:.1f}%" in text
    assert "$2.50" in text  # LLM only at $0.0025 per call
    assert "missing LLM answers: 1" in text


def test_an_unpriced_evaluation_shows_no_dollar_figure(tmp_path, labelled):
    """Without a price the table, the plot's title and the JSON say unpriced, never $0.00."""
    predictions, gold, spec = labelled
    llm = simulate_llm(gold, LABELS, 0.95, seed=0)
    unpriced = evaluate_cascade(predictions, gold, llm, None, spec)
    text = render(evaluation_table(unpriced))
    assert "unpriced" in text
    assert "$" not in text
    json_path, png_path = tmp_path / "eval.json", tmp_path / "eval.png"
    write_evaluation(unpriced, json_path, png_path, title="t", simulated=True)
    data = json.loads(json_path.read_text(encoding="utf-8"))
    assert (data["priced"], data["llm_only"]["cost_per_1000"]) == (False, None)
    assert png_path.read_bytes().startswith(PNG_SIGNATURE)
    assert simulated_title(unpriced).endswith(", unpriced)")


def test_evaluation_json_and_table_give_each_labels_figures(tmp_path, evaluation):
    """The JSON holds per-label figures for BERT only and the policy; the table shows them."""
    json_path = tmp_path / "eval.json"
    write_evaluation(evaluation, json_path, None, title="t", simulated=True)
    per_class = json.loads(json_path.read_text(encoding="utf-8"))["per_class"]
    assert set(per_class) == {"bert_only", "operating_point"}
    for point in per_class.values():
        assert set(point) == set(LABELS)
        assert sum(figures["support"] for figures in point.values()) == 300
    text = render(evaluation_per_class_table(evaluation))
    neg = evaluation.per_class_operating_point["neg"]
    assert "BERT only" in text
    assert "policy" in text
    assert f"{neg.recall:.3f}" in text


def test_per_class_table_marks_a_ratio_without_denominator():
    """A never-predicted label shows precision '-' and recall 0; each row holds its figures."""
    per_class = per_class_metrics([0, 0], [0, 1], ["ham", "spam"])
    text = render(per_class_table("per label", {"validation": per_class}))
    rows = {}
    for line in text.splitlines():
        cells = [cell for cell in re.split(r"[\s│┃]+", line) if cell]
        if cells and cells[0] in {"ham", "spam"}:
            rows[cells[0]] = cells[1:]
    assert rows == {"ham": ["0.500", "1.000", "0.667", "1"], "spam": ["-", "0.000", "0.000", "1"]}


@pytest.mark.parametrize("goal", ["accuracy", "share"])
def test_calibration_table_shows_the_figures(labelled, goal):
    """The rendered calibration table holds the goal, threshold, shares and feasibility."""
    predictions, gold, spec = labelled
    if goal == "accuracy":
        result = calibrate_for_accuracy(predictions, gold, spec, 0.85)
    else:
        result = calibrate_for_llm_share(predictions, gold, spec, 0.4)
    assert result.feasible
    text = render(calibration_table(result))
    assert f"{result.threshold:.4f}" in text
    assert f"{100 * result.llm_share:.1f}%" in text
    assert "min_probability" in text
    if goal == "accuracy":
        assert "accuracy 85.0% at 95.0% confidence" in text
        assert result.error_upper_bound is not None
        assert f"{100 * result.error_upper_bound:.1f}%" in text
    else:
        assert "LLM share 40.0%" in text
    assert "yes" in text


def test_unreached_accuracy_table_shows_only_what_was_tested(labelled):
    """No untested threshold looks tested; the highest certifiable target and the need show."""
    predictions, gold, spec = labelled
    result = calibrate_for_accuracy(predictions, gold, spec, 0.99)
    assert not result.feasible
    assert result.highest_certifiable is not None
    assert result.data_needed is not None
    assert result.data_needed.messages is not None
    text = render(calibration_table(result))
    assert "none: each keeps under 895 answers" in text
    assert f"{result.threshold:.4f}" not in text  # the strictest, untested, candidate
    assert "error upper bound" not in text
    assert "highest certifiable target" in text
    assert f"about {result.data_needed.messages:,}" in text


def test_unreached_accuracy_table_lists_the_thresholds_tested(labelled):
    """A threshold the sequence tested shows with its real accepted and wrong counts."""
    _, _, spec = labelled
    predictions = [
        Prediction(
            labels=LABELS, probabilities=(0.9, 0.1), multi_label=False, chunks=1, model_version="t"
        )
    ] * 1000
    gold = ["neg"] * 900 + ["pos"] * 100
    text = render(calibration_table(calibrate_for_accuracy(predictions, gold, spec, 0.99)))
    assert "min_probability 0.9000" in text
    assert "1000 accepted, 100 wrong" in text
    assert "failed" in text
    assert "no amount at this accuracy" in text


def test_per_label_calibration_table_shows_each_labels_threshold(labelled):
    """Each label's own threshold shows with its counts and bound; the unused global says so."""
    predictions, gold, spec = labelled
    result = calibrate_for_accuracy(predictions, gold, spec, 0.8, per_label=True)
    assert result.feasible
    assert result.per_label is not None
    assert sorted(group.labels for group in result.per_label.own) == [("neg",), ("pos",)]
    text = render(calibration_table(result))
    assert "label groups" in text
    assert "2, each tested at 97.50%" in text
    for group in result.per_label.own:
        assert f"{group.labels[0]} (own threshold)" in text
        test = group.last_test
        assert test is not None
        shown = (
            f"min_probability {group.threshold:.4f}: {group.accepted} of {group.messages[0]} "
            f"accepted, {group.errors} wrong, bound {100 * group.error_upper_bound:.1f}%"
            if group.certified
            else f"not certified (min_probability {test.threshold:.4f}: {test.accepted} accepted"
        )
        assert shown in text
    assert "unused: every label has its own" in text


def test_per_label_table_names_the_labels_that_kept_the_global_threshold(labelled):
    """A pooled label shows why it kept the global threshold; a failed group shows its last test."""
    predictions, gold, spec = labelled
    failed = ThresholdTest(
        threshold=0.91, accepted=69, errors=12, error_upper_bound=0.29, passed=False
    )
    unmet = {"threshold": 1.0, "accepted": 0, "errors": 0, "error_upper_bound": 1.0}
    groups = tuple(
        LabelGroup(
            labels=(label,),
            messages=(count,),
            own_threshold=own,
            **unmet,
            certified=False,
            tested=1,
            last_test=failed,
        )
        for label, count, own in (("pos", 200, True), ("neg", 100, False))
    )
    result = replace(
        calibrate_for_accuracy(predictions, gold, spec, 0.85),
        feasible=False,
        per_label=PerLabelCalibration(groups, group_confidence=0.975, messages_needed=150),
    )
    text = render(calibration_table(result))
    assert "kept the global threshold" in text
    assert "neg: 100 messages (under 150)" in text
    assert "global (neg)" in text
    assert "not certified (min_probability 0.9100: 69 accepted, 12 wrong, bound 29.0%" in text
    assert "200 sent to the LLM" in text
    assert "NO: target not reached" in text
    assert "thresholds tested" not in text
    assert "not certified for any label group" in unreached_accuracy(result)


def test_calibration_table_over_all_messages_shows_the_whole_stream(labelled):
    """The goal names all messages and the LLM's accuracy; the expected accuracy shows."""
    predictions, gold, spec = labelled
    result = calibrate_for_accuracy(predictions, gold, spec, 0.9, llm_accuracy=0.95)
    assert result.feasible
    assert 0.0 < result.accepted_share < 1.0
    assert result.expected_accuracy is not None
    text = render(calibration_table(result))
    assert "accuracy 90.0% over all messages (LLM at 95.0%) at 95.0% confidence" in text
    assert re.search(
        rf"expected accuracy, all messages\W+{100 * result.expected_accuracy:.1f}%", text
    )
    assert f"{result.threshold:.4f}" in text
    allowed = (0.1 - result.llm_share * 0.05) / (1.0 - result.llm_share)
    assert re.search(rf"error allowed at this share\W+{100 * allowed:.1f}%", text)
    accepted_only = render(calibration_table(calibrate_for_accuracy(predictions, gold, spec, 0.9)))
    assert "over all messages" not in accepted_only
    assert "expected accuracy" not in accepted_only


def test_calibration_table_over_all_messages_when_everything_goes_to_the_llm(labelled):
    """No threshold certified and an LLM at the target: no threshold is shown as kept."""
    predictions, gold, spec = labelled
    result = calibrate_for_accuracy(predictions, gold, spec, 0.97, llm_accuracy=0.97)
    assert result.feasible
    assert result.llm_share == 1.0
    text = render(calibration_table(result))
    assert "none: every message sent to the LLM" in text
    assert f"{result.threshold:.4f}" not in text
    assert re.search(r"expected accuracy, all messages\W+97\.0%", text)
    assert "error allowed" not in text


@pytest.mark.parametrize("size", [300, 10])
def test_unreached_over_all_target_says_the_llm_alone_misses_it(labelled, size):
    """An LLM under the target and no threshold certified: the table and the line say so."""
    predictions, gold, spec = labelled
    result = calibrate_for_accuracy(predictions[:size], gold[:size], spec, 0.9, llm_accuracy=0.85)
    assert not result.feasible
    assert result.highest_certifiable is None
    assert result.data_needed is None
    text = render(calibration_table(result))
    assert "accuracy 90.0% over all messages (LLM at 85.0%)" in text
    assert "85.0% accurate: under the target" in text
    assert "NO: target not reached" in text
    assert "highest certifiable target" not in text
    assert "validation messages needed" not in text
    for test in result.tested:
        allowed = (0.1 - (1.0 - test.accepted / size) * 0.15) / (test.accepted / size)
        shown = "none" if allowed <= 0 else f"{100 * allowed:.1f}%"
        assert f"{test.accepted} accepted, {test.errors} wrong" in text
        assert f"failed (allowed {shown})" in text or test.passed
    if not result.tested:
        assert "none: none keeps enough answers to be tested" in text
    line = unreached_accuracy(result)
    assert f"not certified by these {size} messages" in line
    assert "even sending every message to the LLM (85.0% accurate) does not reach 90.0%" in line
