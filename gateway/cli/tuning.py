"""``tiergate calibrate`` and ``tiergate eval``: thresholds and their trade-off from labelled data.

Both score a labelled file with the BERT tier first (:func:`score_labelled`), then calibrate
the policy's thresholds or evaluate the cascade's accuracy against its LLM share and cost.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

from tiergate.gateway.cli.embedded import MODEL_OPTION, load_classifier, settings_with_policies
from tiergate.gateway.cli.errors import REJECTED, err, fail, guarded
from tiergate.gateway.cli.inputs import CHUNK
from tiergate.policies.prediction import Prediction
from tiergate.policies.spec import PolicySpec, Task
from tiergate.workers.cascade import policy_book_for
from tiergate.workers.errors import DataFileError, RecordError
from tiergate.workers.records import InputFormat, read_bytes, read_records
from tiergate.workers.settings import Settings


@dataclass(frozen=True)
class Scored:
    """A labelled file scored by the BERT tier, with the policy that will judge it."""

    spec: PolicySpec
    ids: list[str]
    texts: list[str]
    predictions: list[Prediction]
    gold: list[str | frozenset[str]]


def score_labelled(
    data: Path,
    policy: Path | None,
    model: Path | None,
    columns: tuple[str, str, str],
) -> Scored:
    """Score every example of ``data`` with the model, under ``policy`` (or the model's)."""
    from tiergate.workers.bert.dataset import Columns, load_labelled  # noqa: PLC0415

    settings = settings_with_policies([policy] if policy is not None else None)
    classifier = load_classifier(settings, model)
    multi_label = classifier.manifest.multi_label
    book = guarded(lambda: policy_book_for(settings, classifier))
    text, label, labels = columns
    examples = guarded(
        lambda: load_labelled(
            data,
            columns=Columns(text=text, label=label, labels=labels),
            multi_label=multi_label,
            known_labels=classifier.labels,
        )
    )
    texts = [example.text for example in examples]
    with Progress(
        TextColumn("scoring"), BarColumn(), MofNCompleteColumn(), console=err, transient=True
    ) as progress:
        task = progress.add_task("score", total=len(texts))
        predictions: list[Prediction] = []
        for start in range(0, len(texts), CHUNK):
            predictions += classifier.predict(texts[start : start + CHUNK])
            progress.update(task, advance=len(texts[start : start + CHUNK]))
    gold: list[str | frozenset[str]] = [
        frozenset(example.labels) if multi_label else example.labels[0] for example in examples
    ]
    return Scored(book.default, [e.message_id for e in examples], texts, predictions, gold)


_TEXT_COLUMN = typer.Option("--text-column", help="Column of the text.")
_LABEL_COLUMN = typer.Option("--label-column", help="Column of the label.")
_LABELS_COLUMN = typer.Option("--labels-column", help="Column of the label list (multi-label).")


def calibrate(
    data: Annotated[Path, typer.Argument(help="Labelled validation data (.jsonl or .csv).")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Write the new policy here.")],
    target_accuracy: Annotated[
        float | None,
        typer.Option(min=0.0, max=1.0, help="Goal (a): accuracy of the accepted BERT answers."),
    ] = None,
    llm_share: Annotated[
        float | None,
        typer.Option(min=0.0, max=1.0, help="Goal (b): share of messages sent to the LLM."),
    ] = None,
    confidence: Annotated[
        float, typer.Option(min=0.5, max=0.999, help="Confidence of the bound for goal (a).")
    ] = 0.95,
    policy: Annotated[
        Path | None, typer.Option(help="Policy to calibrate (default: the model's).")
    ] = None,
    model: Annotated[Path | None, MODEL_OPTION] = None,
    text_column: Annotated[str, _TEXT_COLUMN] = "text",
    label_column: Annotated[str, _LABEL_COLUMN] = "label",
    labels_column: Annotated[str, _LABELS_COLUMN] = "labels",
) -> None:
    """Choose escalation thresholds from labelled data and write them as a new policy version.

    Goal (a), --target-accuracy: the loosest thresholds whose accepted BERT answers reach the
    target with a one-sided upper confidence bound on their error rate (Clopper-Pearson, tested
    in sequence from the strictest threshold). Goal (b), --llm-share: the thresholds that send
    at most that share of messages to the LLM. Exits 1 without writing when no threshold
    reaches goal (a) on this data, naming the highest target the data certifies and about how
    many validation messages the asked target would need.
    """
    from tiergate.gateway.report import calibration_table, unreached_accuracy  # noqa: PLC0415
    from tiergate.policies.calibrate import (  # noqa: PLC0415
        CalibrationGoal,
        calibrate_for_accuracy,
        calibrate_for_llm_share,
    )

    if (target_accuracy is None) == (llm_share is None):
        raise fail("give exactly one goal: --target-accuracy or --llm-share")
    scored = score_labelled(data, policy, model, (text_column, label_column, labels_column))
    if target_accuracy is not None:
        result = calibrate_for_accuracy(
            scored.predictions, scored.gold, scored.spec, target_accuracy, confidence
        )
    else:
        assert llm_share is not None
        result = calibrate_for_llm_share(scored.predictions, scored.gold, scored.spec, llm_share)
    err.print(calibration_table(result))
    if not result.feasible and result.goal is CalibrationGoal.ACCURACY:
        err.print(
            f"[bold red]no threshold reaches the goal[/]: {unreached_accuracy(result)}",
            highlight=False,
            soft_wrap=True,
        )
        raise typer.Exit(REJECTED)
    if not result.feasible:
        err.print(
            f"[bold red]no threshold reaches the goal[/] on these {result.n} messages; "
            "nothing written (more validation data or a lower target may)",
            highlight=False,
            soft_wrap=True,
        )
        raise typer.Exit(REJECTED)
    new_policy = guarded(lambda: result.policy(scored.spec))
    try:
        output.write_text(new_policy.to_yaml(), encoding="utf-8")
    except OSError as exc:
        raise fail(f"{output}: cannot be written ({exc.strerror})") from None
    err.print(
        f"policy {new_policy.name!r} version {new_policy.version} written to {output}",
        highlight=False,
        soft_wrap=True,
    )


def evaluate(
    data: Annotated[Path, typer.Argument(help="Labelled data (.jsonl or .csv).")],
    replay: Annotated[
        Path | None,
        typer.Option(help="Recorded LLM answers: JSONL of {id, label | labels, cost_usd?}."),
    ] = None,
    simulate_accuracy: Annotated[
        float | None,
        typer.Option(min=0.0, max=1.0, help="Simulate an LLM of this accuracy instead."),
    ] = None,
    cost_per_call: Annotated[
        float | None,
        typer.Option(
            min=0.0,
            help="USD per LLM call (default: the replay's cost_usd, else the policy's first "
            "model priced on these prompts).",
        ),
    ] = None,
    seed: Annotated[int, typer.Option(help="Seed of the simulated LLM.")] = 13,
    json_out: Annotated[Path, typer.Option("--json", help="Write the report here.")] = Path(
        "eval.json"
    ),
    plot: Annotated[
        Path | None,
        typer.Option(help="Also draw the curve here (PNG; needs the 'plot' extra: matplotlib)."),
    ] = None,
    policy: Annotated[
        Path | None, typer.Option(help="Policy to evaluate (default: the model's).")
    ] = None,
    model: Annotated[Path | None, MODEL_OPTION] = None,
    text_column: Annotated[str, _TEXT_COLUMN] = "text",
    label_column: Annotated[str, _LABEL_COLUMN] = "label",
    labels_column: Annotated[str, _LABELS_COLUMN] = "labels",
) -> None:
    """The cascade's accuracy against the share of messages sent to the LLM, and its cost.

    The LLM's answers come from a replay file of recorded answers keyed by message id, or
    from a simulated LLM of the given accuracy (the output says it is a simulation). Reports
    BERT only, LLM only, the policy's operating point and the smallest LLM share within one
    point of LLM-only accuracy, with cost per 1,000 messages; writes JSON and, with --plot, a
    PNG plot (which needs matplotlib: pip install 'tiergate[plot]').
    """
    from tiergate.gateway.report import evaluation_table, write_evaluation  # noqa: PLC0415
    from tiergate.policies.evaluate import evaluate_cascade, simulate_llm  # noqa: PLC0415

    if (replay is None) == (simulate_accuracy is None):
        raise fail("give exactly one source of LLM answers: --replay or --simulate-accuracy")
    if plot is not None and not _matplotlib_installed():
        raise fail("--plot needs matplotlib: pip install 'tiergate[plot]'")
    scored = score_labelled(data, policy, model, (text_column, label_column, labels_column))
    spec = scored.spec
    costs: list[float] | float
    if replay is not None:
        recorded = guarded(lambda: _read_replay(replay, spec))
        answers = [recorded[i][0] if i in recorded else None for i in scored.ids]
        replay_costs = [recorded[i][1] if i in recorded else None for i in scored.ids]
        known_costs = [c for c in replay_costs if c is not None]
        if cost_per_call is not None:
            costs = cost_per_call
        elif known_costs:  # a message without a recorded cost costs the recorded mean
            mean = sum(known_costs) / len(known_costs)
            costs = [mean if c is None else c for c in replay_costs]
        else:
            costs = _typical_call_cost(spec, scored.texts)
        simulated = False
    else:
        assert simulate_accuracy is not None
        answers = list(simulate_llm(scored.gold, spec.label_names, simulate_accuracy, seed))
        costs = (
            cost_per_call if cost_per_call is not None else _typical_call_cost(spec, scored.texts)
        )
        simulated = True
    evaluation = guarded(
        lambda: evaluate_cascade(scored.predictions, scored.gold, answers, costs, spec)
    )
    title = f"tiergate eval: policy {spec.name} v{spec.version} on {data.name}"
    write_evaluation(evaluation, json_out, plot, title=title, simulated=simulated)
    Console().print(evaluation_table(evaluation))
    source = "simulated LLM" if simulated else f"LLM answers replayed from {replay}"
    missing = f" · {evaluation.missing_llm_answers} missing (counted wrong)" if replay else ""
    drawn = f" · plot {plot}" if plot is not None else ""
    err.print(
        f"{evaluation.n} messages · {source}{missing} · report {json_out}{drawn}",
        highlight=False,
        soft_wrap=True,
    )


def _matplotlib_installed() -> bool:
    """Whether matplotlib imports (it comes with the ``plot`` extra, not the core install)."""
    try:
        importlib.import_module("matplotlib")
    except ImportError:
        return False
    return True


def _read_replay(
    path: Path, spec: PolicySpec
) -> dict[str, tuple[str | frozenset[str], float | None]]:
    """Recorded LLM answers by message id: ``{"id", "label" | "labels", "cost_usd"?}`` lines."""
    known = set(spec.label_names)
    recorded: dict[str, tuple[str | frozenset[str], float | None]] = {}
    for item in read_records(read_bytes(path), InputFormat.JSONL, source=str(path)):
        if isinstance(item, RecordError):
            raise DataFileError(f"{path}: {item}")
        fields = item.fields
        answer: str | frozenset[str]
        raw_id = fields.get("id")
        if not isinstance(raw_id, str | int) or isinstance(raw_id, bool):
            raise DataFileError(f"{path}: line {item.line}: 'id' must be a string")
        if spec.multi_label:
            labels = fields.get("labels")
            if not isinstance(labels, list) or not all(isinstance(x, str) for x in labels):
                raise DataFileError(f"{path}: line {item.line}: 'labels' must be a list")
            answer = frozenset(labels)
            unknown = sorted(answer - known)
        else:
            label = fields.get("label")
            if not isinstance(label, str):
                raise DataFileError(f"{path}: line {item.line}: 'label' must be a string")
            answer = label
            unknown = [] if label in known else [label]
        if unknown:
            raise DataFileError(f"{path}: line {item.line}: labels not in the policy {unknown}")
        cost = fields.get("cost_usd")
        if cost is not None and (not isinstance(cost, int | float) or isinstance(cost, bool)):
            raise DataFileError(f"{path}: line {item.line}: 'cost_usd' must be a number")
        recorded[str(raw_id)] = (answer, None if cost is None else float(cost))
    return recorded


def _typical_call_cost(spec: PolicySpec, texts: Sequence[str]) -> float:
    """The mean price of one classification call on these texts with the policy's first model.

    Prompt tokens are estimated at four characters per token and the answer at 20 tokens (a
    label in JSON); a model missing from the price table costs 0.
    """
    from tiergate.workers.llm.prompt import build_prompt  # noqa: PLC0415

    settings = Settings()
    if not spec.llm.providers or not texts:
        return 0.0
    price = settings.llm_prices.get(spec.llm.providers[0].model)
    if price is None:
        return 0.0
    sample = texts[:: max(1, len(texts) // 200)]
    total = 0.0
    for text in sample:
        system, user = build_prompt(text, spec, Task.CLASSIFY, ())
        total += price.cost((len(system) + len(user)) // 4, 20)
    return total / len(sample)
