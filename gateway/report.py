"""Reports of ``tiergate eval`` and ``tiergate calibrate``: JSON, a PNG plot, and rich tables.

The math lives in :mod:`tiergate.policies.evaluate` and :mod:`tiergate.policies.calibrate`; this
module only writes and draws what they computed. matplotlib (the ``plot`` extra) is imported only
when :func:`write_evaluation` draws a plot (it is slow to import and only ``eval --plot`` needs
it), and draws on an Agg canvas of its own, so no global pyplot state or display is involved.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from rich.markup import escape
from rich.table import Table

from tiergate.policies.calibrate import (
    CalibrationGoal,
    CalibrationResult,
    LabelGroup,
    ThresholdTest,
    accepted_needed,
    allowed_accepted_error,
)
from tiergate.policies.class_metrics import ClassMetrics
from tiergate.policies.evaluate import CurvePoint, Evaluation


def simulated_title(evaluation: Evaluation) -> str:
    """``simulated LLM (accuracy x%, $y per call)``, from the LLM-only point of ``evaluation``.

    The accuracy is what the simulated LLM scored on this set; the price is the mean cost of
    one call, or ``unpriced`` when no price was known.
    """
    accuracy = _percent(evaluation.llm_only.accuracy)
    per_call = evaluation.llm_only.cost_per_1000 / 1000.0
    price = f"{_dollars(per_call)} per call" if evaluation.priced else "unpriced"
    return f"simulated LLM (accuracy {accuracy}, {price})"


def _dollars(amount: float) -> str:
    """Dollars to the cent, or three significant figures below a dollar (a call is far less)."""
    return f"${amount:,.2f}" if amount >= 1.0 or amount == 0.0 else f"${amount:.3g}"


def write_evaluation(
    evaluation: Evaluation, json_path: Path, png_path: Path | None, *, title: str, simulated: bool
) -> None:
    """Write ``evaluation`` as JSON and, unless ``png_path`` is ``None``, as a plot.

    The JSON is :meth:`Evaluation.to_dict` plus ``title`` and ``simulated``. The plot, of
    accuracy against the share sent to the LLM, needs matplotlib; it marks BERT only, LLM only,
    the policy's operating point and the matched-accuracy point, with the cost per 1,000
    messages on a second axis; when ``simulated`` is true its title says that the LLM answers
    were simulated (see :func:`simulated_title`). Parent folders are created.
    """
    full_title = f"{title}\n{simulated_title(evaluation)}" if simulated else title
    document: dict[str, Any] = {"title": title, "simulated": simulated, **evaluation.to_dict()}
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")
    if png_path is None:
        return
    png_path.parent.mkdir(parents=True, exist_ok=True)
    _plot(evaluation, png_path, full_title)


def _plot(evaluation: Evaluation, png_path: Path, title: str) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: PLC0415 (slow import)
    from matplotlib.figure import Figure  # noqa: PLC0415

    figure = Figure(figsize=(8, 5), dpi=120, layout="constrained")
    FigureCanvasAgg(figure)
    accuracy_axis = figure.add_subplot()
    shares = [100 * p.llm_share for p in evaluation.curve]
    accuracy_axis.plot(
        shares, [100 * p.accuracy for p in evaluation.curve], color="tab:blue", label="cascade"
    )
    marks: list[tuple[str, CurvePoint, str, str]] = [
        ("BERT only", evaluation.bert_only, "o", "tab:gray"),
        ("LLM only", evaluation.llm_only, "s", "tab:red"),
        ("policy", evaluation.operating_point, "*", "tab:green"),
        ("within 1 pt of LLM", evaluation.matched_point, "D", "tab:purple"),
    ]
    for label, point, marker, colour in marks:
        accuracy_axis.plot(
            100 * point.llm_share,
            100 * point.accuracy,
            marker=marker,
            markersize=9,
            linestyle="none",
            color=colour,
            clip_on=False,  # BERT only and LLM only sit on the plot's edges
            zorder=3,
            label=f"{label}: {_percent(point.accuracy)} at {_percent(point.llm_share)}",
        )
    accuracy_axis.set_xlabel("messages sent to the LLM (%)")
    accuracy_axis.set_ylabel("accuracy (%)")
    accuracy_axis.set_xlim(0, 100)
    accuracy_axis.grid(visible=True, alpha=0.3)
    handles, labels = accuracy_axis.get_legend_handles_labels()
    if evaluation.priced:  # an unpriced evaluation has no cost to draw
        cost_axis = accuracy_axis.twinx()
        cost_axis.plot(
            shares,
            [p.cost_per_1000 for p in evaluation.curve],
            color="tab:orange",
            linestyle="--",
            label="LLM cost per 1,000",
        )
        cost_axis.set_ylabel("LLM cost per 1,000 messages (USD)")
        cost_axis.set_ylim(bottom=0)
        cost_handles, cost_labels = cost_axis.get_legend_handles_labels()
        handles, labels = handles + cost_handles, labels + cost_labels
    accuracy_axis.legend(handles, labels, loc="lower right", fontsize="small")
    accuracy_axis.set_title(title)
    figure.savefig(png_path, format="png")


def evaluation_table(evaluation: Evaluation) -> Table:
    """A table of the reported points: share sent to the LLM, accuracy, cost per 1,000."""
    table = Table(
        title=f"{evaluation.policy} ({evaluation.policy_version}): {evaluation.n} messages",
        header_style="bold",
    )
    table.add_column("point")
    table.add_column("sent to LLM", justify="right")
    table.add_column("accuracy", justify="right")
    table.add_column("cost / 1,000", justify="right")
    rows = [
        ("BERT only", evaluation.bert_only),
        ("policy", evaluation.operating_point),
        ("within 1 pt of LLM", evaluation.matched_point),
        ("LLM only", evaluation.llm_only),
    ]
    for name, point in rows:
        table.add_row(
            name,
            _percent(point.llm_share),
            _percent(point.accuracy),
            _dollars(point.cost_per_1000) if evaluation.priced else "unpriced",
        )
    notes = [] if evaluation.priced else ["LLM calls unpriced: no price per call was known"]
    if evaluation.cost_saving_vs_llm_only is not None:
        notes.append(
            f"saves {_percent(evaluation.cost_saving_vs_llm_only)} of LLM-only cost "
            "within 1 pt of its accuracy"
        )
    if evaluation.missing_llm_answers:
        notes.append(f"missing LLM answers: {evaluation.missing_llm_answers} (counted wrong)")
    table.caption = "\n".join(notes) or None
    return table


def evaluation_per_class_table(evaluation: Evaluation) -> Table:
    """Each label's precision, recall and F1 for BERT only and at the policy's operating point."""
    return per_class_table(
        f"per label: {evaluation.n} messages",
        {
            "BERT only": evaluation.per_class_bert_only,
            "policy": evaluation.per_class_operating_point,
        },
    )


def per_class_table(title: str, groups: Mapping[str, Mapping[str, ClassMetrics]]) -> Table:
    """One row per label; for each group (a split, a cascade point) precision, recall, F1, support.

    A precision or recall with no denominator (a label never predicted, or absent) shows as
    ``-``; a label that is present but never predicted shows recall 0.
    """
    table = Table(title=title, header_style="bold")
    table.add_column("label")
    for group in groups:
        for column in ("precision", "recall", "F1", "support"):
            table.add_column(f"{group}\n{column}", justify="right")
    labels = list(dict.fromkeys(label for per_class in groups.values() for label in per_class))
    for label in labels:
        cells = [escape(label)]
        for per_class in groups.values():
            metrics = per_class.get(label)
            if metrics is None:
                cells += ["", "", "", ""]
                continue
            cells += [
                _share(metrics.precision),
                _share(metrics.recall),
                f"{metrics.f1:.3f}",
                str(metrics.support),
            ]
        table.add_row(*cells)
    return table


def _share(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def calibration_table(result: CalibrationResult) -> Table:
    """A two-column table of a calibration: goal, chosen threshold and what it achieves.

    A calibration over all messages also shows the expected accuracy of the whole stream (the
    LLM's answers at its stated accuracy) and the accepted error allowed at the chosen share.
    """
    table = Table(title="calibration", header_style="bold", show_header=False)
    table.add_column("field")
    table.add_column("value", justify="right")
    goal = (
        _accuracy_goal(result)
        if result.goal is CalibrationGoal.ACCURACY
        else f"LLM share {_percent(result.target)}"
    )
    threshold_name = "band half-width" if result.multi_label else "min_probability"
    split = result.per_label is not None and bool(result.per_label.own)
    if result.goal is CalibrationGoal.ACCURACY and not result.feasible:
        if result.over_all_messages:
            unreached = _unreached_over_all_rows(result)
        elif split:
            unreached = [("feasible", "NO: target not reached")]
        else:
            unreached = _unreached_rows(result)
        rows = [("goal", goal), ("messages", str(result.n)), *_per_label_rows(result), *unreached]
        for field, value in rows:
            table.add_row(field, value)
        return table
    rows = [
        ("goal", goal),
        ("messages", str(result.n)),
        *_per_label_rows(result),
        _threshold_row(result, threshold_name),
        ("accepted (BERT answer stands)", _percent(result.accepted_share)),
        ("sent to LLM", _percent(result.llm_share)),
        (
            "accuracy of accepted",
            "n/a" if result.accepted_accuracy is None else _percent(result.accepted_accuracy),
        ),
    ]
    if result.expected_accuracy is not None:
        rows.append(("expected accuracy, all messages", _percent(result.expected_accuracy)))
    if result.error_upper_bound is not None:
        rows.append(("error upper bound", _percent(result.error_upper_bound)))
    if result.llm_accuracy is not None and result.accepted_share > 0.0:
        allowed = allowed_accepted_error(result.target, result.llm_share, result.llm_accuracy)
        rows.append(("error allowed at this share", _allowed(allowed)))
    rows.append(("feasible", "yes" if result.feasible else "NO: target not reached"))
    for field, value in rows:
        table.add_row(field, value)
    return table


def _accuracy_goal(result: CalibrationResult) -> str:
    """The accuracy goal in words: of accepted answers, or of all messages with the LLM's."""
    confidence = f"at {_percent(result.confidence or 0.0)} confidence"
    if result.llm_accuracy is None:
        return f"accuracy {_percent(result.target)} {confidence}"
    return (
        f"accuracy {_percent(result.target)} over all messages "
        f"(LLM at {_percent(result.llm_accuracy)}) {confidence}"
    )


def _threshold_row(result: CalibrationResult, threshold_name: str) -> tuple[str, str]:
    """The tuned threshold; with label groups, the global one (unused if every label has one)."""
    if result.over_all_messages and result.accepted_share == 0.0:
        return threshold_name, "none: every message sent to the LLM"
    if result.per_label is None or not result.per_label.own:
        return threshold_name, f"{result.threshold:.4f}"
    if result.per_label.pooled is None:
        return f"global {threshold_name}", "unused: every label has its own"
    return f"global {threshold_name}", f"{result.threshold:.4f}"


def _per_label_rows(result: CalibrationResult) -> list[tuple[str, str]]:
    """Which labels got a threshold of their own, what each group certified, who kept the global."""
    split = result.per_label
    if split is None:
        return []
    needed = "any number of" if split.messages_needed is None else f"{split.messages_needed:,}"
    if not split.own:
        return [("per-label thresholds", f"none: a label and the rest each need {needed} messages")]
    tested = sum(1 for group in split.groups if sum(group.messages))
    rows = [("label groups", f"{tested}, each tested at {100 * split.group_confidence:.2f}%")]
    for group in split.groups:
        name = (
            f"{escape(group.labels[0])} (own threshold)"
            if group.own_threshold
            else f"global ({', '.join(escape(label) for label in group.labels)})"
        )
        rows.append((name, _group_outcome(group)))
    pooled = split.pooled
    if pooled is not None:
        reasons = [
            f"{escape(label)}: {count} messages"
            + (
                f" (under {needed})"
                if count < (split.messages_needed or math.inf)
                else " (a split would leave a group too small)"
            )
            for label, count in zip(pooled.labels, pooled.messages, strict=True)
        ]
        rows.append(("kept the global threshold", "; ".join(reasons)))
    return rows


def _group_outcome(group: LabelGroup) -> str:
    messages = sum(group.messages)
    if group.certified:
        return (
            f"min_probability {group.threshold:.4f}: {group.accepted} of {messages} accepted, "
            f"{group.errors} wrong, bound {_percent(group.error_upper_bound)}"
        )
    if not messages:
        return "no messages: all sent to the LLM"
    test = group.last_test
    if test is None:
        return f"nothing tested: all {messages} sent to the LLM"
    return (
        f"not certified (min_probability {test.threshold:.4f}: {_tested(test)}): "
        f"all {messages} sent to the LLM"
    )


_TESTS_SHOWN = 6


def _unreached_rows(result: CalibrationResult) -> list[tuple[str, str]]:
    """Why an accuracy target was not reached: only the thresholds tested, and what would do.

    The strictest candidate the result holds was not tested unless it is among ``tested``, so
    it is not shown. Of a long sequence, the last few tests are shown (all before the last
    passed, or the scan would have stopped there).
    """
    threshold_name = "band half-width" if result.multi_label else "min_probability"
    rows: list[tuple[str, str]] = []
    if not result.tested:
        entry = accepted_needed(0.0, result.target, result.confidence or 0.95)
        rows.append(
            (
                "thresholds tested",
                "none: no finite sample certifies 100%"
                if entry is None
                else f"none: each keeps under {entry:,} answers",
            )
        )
    skipped = max(0, len(result.tested) - _TESTS_SHOWN)
    if skipped:
        rows.append(("thresholds tested", f"{skipped} stricter ones passed"))
    rows.extend(
        (f"{threshold_name} {test.threshold:.4f}", _tested(test))
        for test in result.tested[skipped:]
    )
    highest = result.highest_certifiable
    rows.append(
        ("highest certifiable target", "none" if highest is None else percent_down(highest))
    )
    need = result.data_needed
    rows.append(
        (
            "validation messages needed",
            "no amount at this accuracy"
            if need is None or need.messages is None
            else f"about {need.messages:,}",
        )
    )
    rows.append(("feasible", "NO: target not reached"))
    return rows


def _unreached_over_all_rows(result: CalibrationResult) -> list[tuple[str, str]]:
    """Why an accuracy target over all messages was not reached: the tests, and the LLM alone.

    Such a result is unreached only when the LLM alone misses the target too, so there is no
    highest certifiable target or data estimate to show: more data does not lift the LLM.
    """
    assert result.llm_accuracy is not None
    threshold_name = "band half-width" if result.multi_label else "min_probability"
    rows: list[tuple[str, str]] = []
    if not result.tested:
        rows.append(("thresholds tested", "none: none keeps enough answers to be tested"))
    skipped = max(0, len(result.tested) - _TESTS_SHOWN)
    if skipped:
        rows.append(("thresholds tested", f"{skipped} stricter ones passed"))
    for test in result.tested[skipped:]:
        share = 1.0 - test.accepted / result.n
        allowed = allowed_accepted_error(result.target, share, result.llm_accuracy)
        rows.append(
            (
                f"{threshold_name} {test.threshold:.4f}",
                f"{_tested(test)} (allowed {_allowed(allowed)})",
            )
        )
    rows.append(
        (
            "everything to the LLM",
            f"{_percent(result.llm_accuracy)} accurate: under the target",
        )
    )
    rows.append(("feasible", "NO: target not reached"))
    return rows


def _allowed(error: float) -> str:
    """An allowed error rate of accepted answers; at or below 0 no share of errors passes."""
    return "none" if error <= 0.0 else _percent(min(error, 1.0))


def unreached_accuracy(result: CalibrationResult) -> str:
    """One line on an unreached accuracy target: the data size, what it certifies, what would do.

    The estimate of the messages needed states its assumption: the share accepted at one
    threshold and their accuracy stay as on this data.
    """
    target, confidence = _percent(result.target), _percent(result.confidence or 0.0)
    if result.llm_accuracy is not None:
        llm = _percent(result.llm_accuracy)
        return (
            f"target {target} over all messages (LLM at {llm}) at {confidence} confidence is "
            f"not certified by these {result.n} messages; nothing written. No threshold's "
            f"accepted answers make up the LLM's shortfall, and even sending every message to "
            f"the LLM "
            f"({llm} accurate) does not reach {target}: a more accurate model or LLM, or a "
            "lower target, may."
        )
    if result.per_label is not None and result.per_label.own:
        each = f"{100 * result.per_label.group_confidence:.2f}%"
        return (
            f"target {target} at {confidence} confidence is not certified for any label group "
            f"of these {result.n} messages (each group tested at {each}); nothing written. "
            f"Without --per-label the messages are tested together at {confidence}."
        )
    highest = result.highest_certifiable
    line = (
        f"target {target} at {confidence} confidence is not certified by these {result.n} "
        "messages; nothing written. Highest target they certify: "
        f"{'none' if highest is None else percent_down(highest)}."
    )
    need = result.data_needed
    threshold_name = "band half-width" if result.multi_label else "min_probability"
    if result.target >= 1.0:
        return f"{line} No finite sample certifies 100% accuracy."
    if need is None:
        return line
    at = f"{threshold_name} {need.threshold:.4f}"
    accuracy = percent_down(1.0 - need.error_rate)
    if need.messages is None:
        return (
            f"{line} No amount of validation data certifies {target} at this model's accuracy "
            f"(its most accurate threshold here, {at}, is {accuracy} accurate): improve the "
            "model or lower the target."
        )
    return (
        f"{line} About {need.messages:,} validation messages would certify {target} if the "
        f"{_percent(need.accepted_share)} of messages accepted at {at} stay {accuracy} "
        f"accurate, as here ({need.accepted:,} accepted answers)."
    )


def _tested(test: ThresholdTest) -> str:
    outcome = "passed" if test.passed else "failed"
    bound = _percent(test.error_upper_bound)
    return f"{test.accepted} accepted, {test.errors} wrong, bound {bound}: {outcome}"


def percent_down(share: float) -> str:
    """``share`` as a percentage with one decimal, rounded down (a target it names is reached)."""
    return f"{math.floor(1000 * share + 1e-9) / 10:.1f}%"


def _percent(share: float) -> str:
    return f"{100 * share:.1f}%"
