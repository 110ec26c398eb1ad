"""``tiergate distill``: a candidate model from the collected labels, once or every N new labels.

A run reads the policy's collected labels from the label store, warm-starts from the model that
serves now (:meth:`ModelVersions.current_dir`), trains and evaluates the candidate
(:func:`~tiergate.workers.bert.distill.distill`), adds it to the model store as a new version and
prints how it compares with the current model on the held-out labels: the policy's audit sample
when it has ``--min-audit`` labels, else the newest labels. ``--promote`` promotes it
when the gate passes. ``--every N`` repeats that after every N new labels
(:func:`continuous`), promoting on its own only where the policy says
``learning.auto_promote: true``.
"""

from __future__ import annotations

import contextlib
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.markup import escape
from rich.table import Table

from tiergate.gateway.cli.errors import REJECTED, err, fail, guarded
from tiergate.workers.settings import Settings

if TYPE_CHECKING:
    from tiergate.policies.spec import PolicySpec
    from tiergate.workers.bert.dataset import LabelledExample
    from tiergate.workers.bert.distill import DistillOptions, DistillReport, Round


def distill(
    policy: Annotated[str, typer.Option("--policy", help="The policy whose labels to learn.")],
    train_file: Annotated[
        Path | None,
        typer.Option(help="The original training file (.jsonl or .csv), trained on as well."),
    ] = None,
    target_accuracy: Annotated[
        float,
        typer.Option(
            min=0.0, max=1.0, help="The policy's accuracy guarantee, re-calibrated on held-out."
        ),
    ] = 0.9,
    confidence: Annotated[
        float, typer.Option(min=0.5, max=0.999, help="Confidence of the guarantee and intervals.")
    ] = 0.9,
    llm_accuracy: Annotated[
        float | None,
        typer.Option(
            min=0.0,
            max=1.0,
            help="The LLM's measured accuracy; with it the guarantee covers all messages.",
        ),
    ] = None,
    epochs: Annotated[int, typer.Option(min=1, help="Passes over the training data.")] = 2,
    learning_rate: Annotated[float, typer.Option(min=0.0)] = 3e-5,
    person_weight: Annotated[
        float, typer.Option(min=0.0, help="Loss weight of a person's label (an LLM's weighs 1).")
    ] = 2.0,
    holdout_fraction: Annotated[
        float,
        typer.Option(
            min=0.01,
            max=0.9,
            help="Without an audit sample: share of the newest labels held out to evaluate.",
        ),
    ] = 0.2,
    min_audit: Annotated[
        int,
        typer.Option(
            min=1, help="Fewest audit-sample labels that are held out (all of them) to evaluate."
        ),
    ] = 50,
    min_onnx_agreement: Annotated[
        float, typer.Option(min=0.0, max=1.0, help="As for `tiergate train`.")
    ] = 0.97,
    threads: Annotated[
        int | None, typer.Option(min=1, help="Training threads (default: one per core).")
    ] = None,
    output: Annotated[
        Path | None,
        typer.Option("--output", "-o", help="Also keep the candidate's directory here."),
    ] = None,
    promote: Annotated[
        bool, typer.Option("--promote", help="Promote the candidate when the gate passes.")
    ] = False,
    every: Annotated[
        int | None,
        typer.Option(min=1, help="Continuous mode: distill after every N new labels."),
    ] = None,
    poll_seconds: Annotated[
        float, typer.Option(min=0.1, help="Continuous mode: how often to count the labels.")
    ] = 30.0,
) -> None:
    """Train a candidate model from the labels the cascade collected, and judge it.

    The candidate warm-starts from the model serving now and learns from the policy's
    collected labels (people's weighing --person-weight times an LLM's), plus --train-file.
    A slice of the labels is held out, never trained on: the policy's audit sample
    (learning.audit_share, a uniform sample of the traffic) when it has at least --min-audit
    labels, else the newest --holdout-fraction of the labels. On it the card records both
    models' accuracy with an interval and the LLM share the policy needs for --target-accuracy
    with each (over all messages with --llm-accuracy, the LLM's answers counted right at that
    rate), and the policy is re-calibrated for the candidate (policy.yaml in its directory),
    valid for the traffic when the audit sample judged.
    The candidate is added to the model store as a new version; --promote promotes it when the
    gate passes (exit 1 when the gate refuses). Fewer than 50 usable labels exit 2.

    --every N runs until Ctrl-C: a round after every N new labels, promoting on its own only
    when the gate passes and the policy has learning.auto_promote: true.
    """
    from tiergate.workers.bert.distill import DistillOptions  # noqa: PLC0415

    if every is not None and promote:
        raise fail(
            "--promote applies to a single run; with --every the policy's "
            "learning.auto_promote decides"
        )
    if llm_accuracy == 0.0:
        raise fail("--llm-accuracy must be above 0 (an LLM never right keeps no guarantee)")
    options = DistillOptions(
        target_accuracy=target_accuracy,
        epochs=epochs,
        learning_rate=learning_rate,
        person_weight=person_weight,
        holdout_fraction=holdout_fraction,
        min_audit=min_audit,
        confidence=confidence,
        llm_accuracy=llm_accuracy,
        min_onnx_agreement=min_onnx_agreement,
        show_progress=True,
        threads=threads,
    )
    settings = Settings()
    extra = _training_file(settings, train_file) if train_file is not None else []
    if every is None:
        result = guarded(
            lambda: distill_once(
                settings, policy, options, extra, output, may_promote=lambda _: promote
            )
        )
        if promote and not result.promoted:
            raise typer.Exit(REJECTED)
        return
    done: list[Round] = []
    with contextlib.suppress(KeyboardInterrupt):  # Ctrl-C ends the loop; the summary follows
        err.print(f"distilling policy {policy!r} after every {every} new labels (Ctrl-C stops)")
        continuous(
            settings,
            policy,
            options,
            extra,
            output,
            every=every,
            poll_seconds=poll_seconds,
            on_round=done.append,
        )
    promoted = sum(r.promoted for r in done)
    err.print(
        f"stopped after {len(done)} round{'' if len(done) == 1 else 's'}, {promoted} promoted"
    )


def _training_file(settings: Settings, path: Path) -> list[LabelledExample]:
    """The examples of ``path``, with the serving model's labels and head."""
    from tiergate.workers.bert.dataset import Columns, load_labelled  # noqa: PLC0415
    from tiergate.workers.bert.manifest import read_manifest  # noqa: PLC0415
    from tiergate.workers.bert.versions import ModelVersions  # noqa: PLC0415

    manifest = guarded(lambda: read_manifest(ModelVersions.from_settings(settings).current_dir()))
    return guarded(
        lambda: load_labelled(
            path,
            columns=Columns(),
            multi_label=manifest.multi_label,
            known_labels=manifest.labels,
        )
    )


def distill_once(
    settings: Settings,
    policy: str,
    options: DistillOptions,
    extra: Sequence[LabelledExample],
    output: Path | None,
    *,
    may_promote: Callable[[PolicySpec], bool],
) -> Round:
    """One candidate: distilled from the serving model, added to the store, maybe promoted.

    Promoted when the gate passes and ``may_promote(policy)`` says so. Prints the figures on
    standard error. Raises what :func:`~tiergate.workers.bert.distill.distill` raises.
    """
    from tiergate.workers.bert.distill import Round, distill  # noqa: PLC0415
    from tiergate.workers.bert.manifest import read_manifest  # noqa: PLC0415
    from tiergate.workers.bert.versions import ModelVersions  # noqa: PLC0415
    from tiergate.workers.cascade import load_policy_book  # noqa: PLC0415
    from tiergate.workers.labels import open_label_store  # noqa: PLC0415

    versions = ModelVersions.from_settings(settings)
    base = versions.current_dir()
    manifest = read_manifest(base)
    spec = load_policy_book(
        settings, manifest.labels, multi_label=manifest.multi_label, on_no_provider=lambda _: None
    ).get(policy)
    store = open_label_store(settings)
    try:
        examples = store.examples(policy)
    finally:
        store.close()
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=settings.data_dir, prefix=".distill-") as scratch:
        target = output if output is not None else Path(scratch) / "candidate"
        report = distill(
            base, examples, target, spec=spec, options=options, extra_training=extra, progress=_say
        )
        version = versions.add(target)
    promoted = report.gate.passed and may_promote(spec)
    if promoted:
        versions.promote(version)
    print_report(report, version, versions.path(version), promoted=promoted)
    return Round(labels=len(examples), report=report, promoted=promoted)


def continuous(
    settings: Settings,
    policy: str,
    options: DistillOptions,
    extra: Sequence[LabelledExample],
    output: Path | None,
    *,
    every: int,
    rounds: int | None = None,
    poll_seconds: float = 30.0,
    sleep: Callable[[float], None] = time.sleep,
    on_round: Callable[[Round], None] = lambda _: None,
) -> list[Round]:
    """Distill ``policy`` after every ``every`` new labels, for ``rounds`` rounds (None: forever).

    Each round is :func:`distill_once`, promoting only when the gate passes and the policy
    (as its file says at that round) has ``learning.auto_promote``. A round that fails (say, a
    policy file broken meanwhile) is printed and logged, and the loop goes on. ``on_round``
    hears every round as it ends. KeyboardInterrupt (Ctrl-C) stops it.
    """
    from tiergate.policies.spec import PolicyError  # noqa: PLC0415
    from tiergate.workers.bert.distill import Round, run_continuously  # noqa: PLC0415
    from tiergate.workers.errors import TiergateError  # noqa: PLC0415
    from tiergate.workers.labels import open_label_store  # noqa: PLC0415

    def count() -> int:
        store = open_label_store(settings)
        try:
            return store.count(policy)
        finally:
            store.close()

    def one_round(labels: int) -> Round:
        err.print(f"[bold]round[/]: {labels} labels collected", highlight=False)
        try:
            result = distill_once(
                settings,
                policy,
                options,
                extra,
                output,
                may_promote=lambda spec: spec.learning.auto_promote,
            )
        except (TiergateError, PolicyError) as exc:
            err.print(f"[bold red]round failed:[/] {escape(str(exc))}", highlight=False)
            result = Round(labels=labels, report=None, promoted=False, error=str(exc))
        on_round(result)
        return result

    return run_continuously(
        every,
        count=count,
        distill_round=one_round,
        rounds=rounds,
        poll_seconds=poll_seconds,
        sleep=sleep,
    )


def _say(step: str) -> None:
    err.print(f"• {escape(step)}", highlight=False, soft_wrap=True)


def print_report(report: DistillReport, version: str, directory: Path, *, promoted: bool) -> None:
    """The candidate against the current model on the held-out labels, and the verdict."""
    block = report.card["distillation"]
    held = block["held_out"]
    judged_on = (
        f"the audit sample, {held['examples']} labels"
        if block["held_out_kind"] == "audit sample"
        else f"the {held['examples']} newest labels"
    )
    table = Table(
        title=f"held-out: {judged_on} ({held['from']} to {held['to']})", header_style="bold"
    )
    table.add_column("model")
    table.add_column("version")
    table.add_column(f"accuracy ({block['confidence']:.0%} interval)", justify="right")
    scope = " over all messages" if block.get("llm_accuracy") is not None else ""
    table.add_column(f"LLM share for {block['target_accuracy']:.1%}{scope}", justify="right")
    for name, score in (("current", report.current), ("candidate", report.candidate)):
        table.add_row(
            name,
            score.model_version,
            f"{score.accuracy:.1%} [{score.ci_low:.1%}, {score.ci_high:.1%}]",
            f"{score.llm_share:.1%}",
        )
    err.print(table)
    sources = block["sources"]
    err.print(
        f"learned from {sources['llm']} LLM labels, {sources['person']} people's labels and "
        f"{sources['training_file']} training-file examples",
        highlight=False,
        soft_wrap=True,
    )
    if report.gate.passed:
        verdict = "[bold green]gate passed[/]"
    else:
        verdict = "[bold red]gate refused[/]: " + escape("; ".join(report.gate.reasons))
    err.print(verdict, highlight=False, soft_wrap=True)
    err.print(
        f"model version {version} added at {directory}; its re-calibrated policy "
        f"{report.policy.name!r} version {report.policy.version} is {directory / 'policy.yaml'}",
        highlight=False,
        soft_wrap=True,
    )
    if promoted:
        err.print(f"promoted {version}: every worker loads it between two batches")
    elif report.gate.passed:
        err.print(f"not promoted; `tiergate model promote {version}` promotes it", highlight=False)
