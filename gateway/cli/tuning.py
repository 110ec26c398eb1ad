"""``tiergate calibrate`` and ``tiergate eval``: thresholds and their trade-off from labelled data.

Both score a labelled file with the BERT tier first (:func:`score_labelled`), then calibrate
the policy's thresholds or evaluate the cascade's accuracy against its LLM share and cost.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

from tiergate.gateway.cli.embedded import (
    MODEL_OPTION,
    load_classifier,
    policy_book_or_exit,
    settings_with_policies,
    warn_no_provider,
)
from tiergate.gateway.cli.errors import REJECTED, err, fail, guarded, warn
from tiergate.gateway.cli.inputs import CHUNK
from tiergate.gateway.cli.policy import PROVIDER_OPTION, chain_text, provider_chain
from tiergate.policies.prediction import Prediction
from tiergate.policies.spec import DEFAULT_PROVIDERS, PolicySpec, Task
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
    *,
    on_no_provider: Callable[[PolicySpec], None] = warn_no_provider,
) -> Scored:
    """Score every example of ``data`` with the model, under ``policy`` (or the model's).

    A policy with no LLM provider is passed to ``on_no_provider`` (a warning line by default).
    """
    from tiergate.workers.bert.dataset import Columns, load_labelled  # noqa: PLC0415

    settings = settings_with_policies([policy] if policy is not None else None)
    classifier = load_classifier(settings, model)
    multi_label = classifier.manifest.multi_label
    book = policy_book_or_exit(settings, classifier, on_no_provider=on_no_provider)
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
    llm_accuracy: Annotated[
        float | None,
        typer.Option(
            min=0.0,
            max=1.0,
            help="Goal (a): guarantee the accuracy over all messages, the LLM's answers counted "
            "right at this rate (its measured accuracy).",
        ),
    ] = None,
    per_label: Annotated[
        bool,
        typer.Option(
            "--per-label",
            help="Goal (a), single-label policies: a threshold per label with enough messages.",
        ),
    ] = False,
    policy: Annotated[
        Path | None,
        typer.Option(
            "--base-policy",
            "--policy",
            help="Policy to calibrate and write with new thresholds (default: the model's).",
        ),
    ] = None,
    provider: Annotated[list[str] | None, PROVIDER_OPTION] = None,
    model: Annotated[Path | None, MODEL_OPTION] = None,
    text_column: Annotated[str, _TEXT_COLUMN] = "text",
    label_column: Annotated[str, _LABEL_COLUMN] = "label",
    labels_column: Annotated[str, _LABELS_COLUMN] = "labels",
) -> None:
    """Choose escalation thresholds from labelled data and write them as a new policy version.

    The written policy keeps the base policy's LLM provider chain; --provider (repeatable)
    replaces it, and a base policy with no provider gets the default chain.

    Goal (a), --target-accuracy: the loosest thresholds whose accepted BERT answers reach the
    target with a one-sided upper confidence bound on their error rate (Clopper-Pearson, tested
    in sequence from the strictest threshold). Goal (b), --llm-share: the thresholds that send
    at most that share of messages to the LLM. Exits 1 without writing when no threshold
    reaches goal (a) on this data, naming the highest target the data certifies and about how
    many validation messages the asked target would need.

    --per-label (goal (a), single-label policies): each label with enough validation messages
    as the BERT top label gets a threshold of its own, the others share the global one, under
    the same guarantee (the error probability is split evenly over the label groups).

    --llm-accuracy A (goal (a)): the target covers every message, the accepted BERT answers with
    the LLM's counted right at the rate A, so a model less accurate than the target may still
    keep answers when the LLM is more accurate; with A at or above the target and no threshold
    certified, every message goes to the LLM.
    """
    from tiergate.gateway.report import calibration_table, unreached_accuracy  # noqa: PLC0415
    from tiergate.policies.calibrate import (  # noqa: PLC0415
        CalibrationGoal,
        calibrate_for_accuracy,
        calibrate_for_llm_share,
    )

    _check_goals(target_accuracy, llm_share, llm_accuracy, per_label=per_label)
    chain = provider_chain(provider or [])
    columns = (text_column, label_column, labels_column)
    # The written policy gets a chain below, so a base policy without one needs no warning.
    scored = score_labelled(data, policy, model, columns, on_no_provider=lambda _: None)
    if per_label and scored.spec.multi_label:
        raise fail(
            "--per-label applies to single-label policies; a multi-label policy is calibrated "
            "with one uncertainty band for every label"
        )
    if target_accuracy is not None:
        result = calibrate_for_accuracy(
            scored.predictions,
            scored.gold,
            scored.spec,
            target_accuracy,
            confidence,
            per_label=per_label,
            llm_accuracy=llm_accuracy,
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
    if chain:
        new_policy = new_policy.with_providers(chain)
    elif not new_policy.llm.providers:
        new_policy = new_policy.with_providers(DEFAULT_PROVIDERS)
        err.print(
            f"policy {new_policy.name!r} had no LLM provider: written with the default chain "
            f"{chain_text(DEFAULT_PROVIDERS)} (--provider NAME:MODEL sets another)",
            highlight=False,
            soft_wrap=True,
        )
    try:
        output.write_text(new_policy.to_yaml(), encoding="utf-8")
    except OSError as exc:
        raise fail(f"{output}: cannot be written ({exc.strerror})") from None
    err.print(
        f"policy {new_policy.name!r} version {new_policy.version} written to {output}",
        highlight=False,
        soft_wrap=True,
    )


def _check_goals(
    target_accuracy: float | None,
    llm_share: float | None,
    llm_accuracy: float | None,
    *,
    per_label: bool,
) -> None:
    """Usage errors of ``calibrate``'s goal options: exactly one goal, each option in its scope."""
    if (target_accuracy is None) == (llm_share is None):
        raise fail("give exactly one goal: --target-accuracy or --llm-share")
    if per_label and llm_share is not None:
        raise fail("--per-label applies to goal (a), --target-accuracy, not to --llm-share")
    if llm_accuracy is not None:
        if llm_share is not None:
            raise fail("--llm-accuracy applies to goal (a), --target-accuracy, not to --llm-share")
        if per_label:
            raise fail(
                "--llm-accuracy and --per-label cannot be combined: per-label thresholds "
                "guarantee the accepted answers, not all messages"
            )
        if llm_accuracy == 0.0:
            raise fail("--llm-accuracy must be above 0")


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
            "--price-per-call",
            "--cost-per-call",
            min=0.0,
            help="USD per LLM call (default: the replay's cost_usd, else the list price of the "
            "policy's first provider's model on these prompts).",
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
    point of LLM-only accuracy, with cost per 1,000 messages, and each label's precision,
    recall, F1 and support for BERT only and at the operating point; writes JSON and, with
    --plot, a PNG plot (which needs matplotlib: pip install 'tiergate[plot]').
    """
    from tiergate.gateway.report import (  # noqa: PLC0415
        evaluation_per_class_table,
        evaluation_table,
        write_evaluation,
    )
    from tiergate.policies.evaluate import evaluate_cascade, simulate_llm  # noqa: PLC0415

    if (replay is None) == (simulate_accuracy is None):
        raise fail("give exactly one source of LLM answers: --replay or --simulate-accuracy")
    if plot is not None and not _matplotlib_installed():
        raise fail("--plot needs matplotlib: pip install 'tiergate[plot]'")
    scored = score_labelled(data, policy, model, (text_column, label_column, labels_column))
    spec = scored.spec
    replay_costs: list[float | None] = []
    if replay is not None:
        recorded = guarded(lambda: _read_replay(replay, spec))
        answers = [recorded[i][0] if i in recorded else None for i in scored.ids]
        replay_costs = [recorded[i][1] if i in recorded else None for i in scored.ids]
        simulated = False
    else:
        assert simulate_accuracy is not None
        answers = list(simulate_llm(scored.gold, spec.label_names, simulate_accuracy, seed))
        simulated = True
    costs, pricing = _call_costs(spec, scored.texts, cost_per_call, replay_costs)
    evaluation = guarded(
        lambda: evaluate_cascade(scored.predictions, scored.gold, answers, costs, spec)
    )
    title = f"tiergate eval: policy {spec.name} v{spec.version} on {data.name}"
    write_evaluation(evaluation, json_out, plot, title=title, simulated=simulated)
    out = Console()
    out.print(evaluation_table(evaluation))
    out.print(evaluation_per_class_table(evaluation))
    source = "simulated LLM" if simulated else f"LLM answers replayed from {replay}"
    missing = f" · {evaluation.missing_llm_answers} missing (counted wrong)" if replay else ""
    drawn = f" · plot {plot}" if plot is not None else ""
    err.print(
        f"{evaluation.n} messages · {source}{missing} · LLM calls {pricing} · report "
        f"{json_out}{drawn}",
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


def _call_costs(
    spec: PolicySpec,
    texts: Sequence[str],
    price_per_call: float | None,
    replay_costs: Sequence[float | None],
) -> tuple[list[float] | float | None, str]:
    """The cost of each LLM call for ``eval``, and where it comes from, in words.

    ``--price-per-call`` first; else the replay's ``cost_usd`` (a message without one costs the
    recorded mean); else the list price of the policy's first provider's model on these texts.
    ``None`` (unpriced, with a warning line) when the policy has no provider or that model has
    no price: the report then says "unpriced" rather than a cost of $0.
    """
    if price_per_call is not None:
        return price_per_call, f"at ${price_per_call:g} each (--price-per-call)"
    known = [cost for cost in replay_costs if cost is not None]
    if known:
        mean = sum(known) / len(known)
        return [mean if cost is None else cost for cost in replay_costs], "at the replay's cost_usd"
    settings = Settings()
    if not spec.llm.providers:
        reason = f"policy {spec.name!r} has no LLM provider to price them at"
    else:
        first = spec.llm.providers[0]
        if first.model in settings.llm_prices:
            typical = _typical_call_cost(spec, texts, settings)
            return typical, f"at {first.provider}/{first.model}'s list price (${typical:.6f} each)"
        reason = f"model {first.model!r} (the policy's first provider) has no known price"
    warn(
        f"LLM calls are unpriced: {reason}. The report shows no cost; give --price-per-call USD, "
        "or a price with TIERGATE_LLM_PRICES, or a provider under the policy's llm.providers"
    )
    return None, "unpriced"


def _typical_call_cost(spec: PolicySpec, texts: Sequence[str], settings: Settings) -> float:
    """The mean price of one classification call on these texts with the policy's first model.

    Prompt tokens are estimated at four characters per token and the answer at 20 tokens (a
    label in JSON). The policy must have a provider whose model ``settings`` has a price for.
    """
    from tiergate.workers.llm.prompt import build_prompt  # noqa: PLC0415

    if not texts:
        return 0.0
    price = settings.llm_prices[spec.llm.providers[0].model]
    sample = texts[:: max(1, len(texts) // 200)]
    total = 0.0
    for text in sample:
        system, user = build_prompt(text, spec, Task.CLASSIFY, ())
        total += price.cost((len(system) + len(user)) // 4, 20)
    return total / len(sample)
