"""``tiergate labels stats|export``: what the label store collected, for audit or training.

Both read the store the settings name (Redis with ``TIERGATE_REDIS_URL``, else the embedded
SQLite file beside the decision cache).
"""

from __future__ import annotations

import json
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from tiergate.gateway.cli.errors import err, guarded
from tiergate.gateway.cli.output import open_output
from tiergate.workers.labels import (
    AUDIT_CONFIDENCE,
    Agreement,
    AuditAccuracy,
    CollectedExample,
    LabelStats,
    open_label_store,
)
from tiergate.workers.settings import Settings

labels_app = typer.Typer(
    help="Inspect and export the labels collected for distillation.", no_args_is_help=True
)

POLICY_OPTION = typer.Option(help="Only this policy's examples (default: every policy).")


@labels_app.command("stats")
def labels_stats(
    policy: Annotated[str | None, POLICY_OPTION] = None,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object, not tables.")] = False,
) -> None:
    """Counts by label and by source, and how often the BERT tier agreed with the LLM/people.

    Agreement compares the BERT tier's own answer (its top label, or its flags) with the
    LLM's label and with people's corrections, over the examples each labelled. Over the
    audit examples (a policy's ``learning.audit_share``, labelled whatever the BERT tier's
    confidence) the same comparison with the reference label is the BERT tier's accuracy on
    unbiased traffic, with its 95% interval.
    """
    store = open_label_store(Settings())
    try:
        stats = guarded(lambda: store.stats(policy))
    finally:
        store.close()
    if as_json:
        sys.stdout.write(stats.model_dump_json() + "\n")
        return
    _print_stats(stats)


@labels_app.command("export")
def labels_export(
    policy: Annotated[str | None, POLICY_OPTION] = None,
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="Write the JSONL here (default stdout).")
    ] = None,
) -> None:
    """The labelled examples as JSONL, oldest first: redacted text, labels, source, time.

    Each line: ``text``, ``labels``, ``source`` (``llm:<provider>/<model>`` or
    ``person:<who>``), ``time`` (ISO 8601, UTC), ``policy``, ``policy_version``,
    ``model_version`` and ``audit`` (the LLM labelled the text in the policy's audit sample:
    the audit lines are a uniform sample of the traffic). A person's label replaces the LLM's
    for the same text.
    """
    store = open_label_store(Settings())
    try:
        examples = guarded(lambda: store.examples(policy))
    finally:
        store.close()
    with open_output(output) as out:
        for example in examples:
            out.write(export_line(example))
    err.print(f"exported {len(examples)} example(s)")


def export_line(example: CollectedExample) -> str:
    """One example as an export JSON line."""
    row = {
        "text": example.text,
        "labels": example.labels,
        "source": example.source,
        "time": datetime.fromtimestamp(example.time, tz=UTC).isoformat(),
        "policy": example.policy,
        "policy_version": example.policy_version,
        "model_version": example.model_version,
        "audit": example.audit,
    }
    return json.dumps(row, ensure_ascii=False) + "\n"


def _print_stats(stats: LabelStats) -> None:
    console = Console()
    scope = f"policy {stats.policy}" if stats.policy else "every policy"
    console.print(
        f"{stats.examples} labelled example(s) and {stats.unlabelled} unlabelled text(s) "
        f"for {scope}"
    )
    for title, counts in (
        ("label", stats.by_label),
        ("source kind", stats.by_kind),
        ("source", stats.by_source),
    ):
        table = Table(title=f"by {title}")
        table.add_column(title, overflow="fold")
        table.add_column("examples", justify="right")
        for name, count in counts.items():
            table.add_row(name, str(count))
        console.print(table)
    agreement = Table(title="agreement")
    for column in ("compared", "with", "examples", "agreed", "rate"):
        agreement.add_column(column, justify="right" if column != "compared" else "left")
    for left, right, counted in (
        ("BERT tier", "LLM", stats.bert_vs_llm),
        ("BERT tier", "people", stats.bert_vs_person),
        ("LLM", "people", stats.llm_vs_person),
    ):
        agreement.add_row(left, right, str(counted.compared), str(counted.agreed), _rate(counted))
    console.print(agreement)
    console.print(_audit_line(stats.audit))


def _rate(counted: Agreement) -> str:
    return "-" if counted.rate is None else f"{counted.rate:.1%}"


def _audit_line(audit: AuditAccuracy) -> str:
    if audit.accuracy is None or audit.interval is None:
        return "no audit examples (a policy's learning.audit_share samples them)"
    low, high = audit.interval
    return (
        f"BERT tier on {audit.examples} audit example(s): {audit.agreed} agreed with the "
        f"reference label, accuracy {audit.accuracy:.1%} "
        f"({AUDIT_CONFIDENCE:.0%} interval {low:.1%} to {high:.1%})"
    )
