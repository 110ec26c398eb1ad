"""``tiergate policy check``, ``examples`` and ``show``: validate and list policy files."""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from tiergate.gateway.cli.embedded import MODEL_OPTION, load_classifier
from tiergate.gateway.cli.errors import guarded
from tiergate.policies.spec import EXAMPLES, PolicySpec, example_policy, load_policy
from tiergate.workers.cascade import check_policy_fits_model
from tiergate.workers.settings import Settings

policy_app = typer.Typer(help="Check and list policy files.", no_args_is_help=True)


@policy_app.command("check")
def policy_check(
    files: Annotated[list[Path], typer.Argument(help="Policy files to validate.")],
    model: Annotated[Path | None, MODEL_OPTION] = None,
    against_model: Annotated[
        bool, typer.Option(help="Also check that each policy fits the model's labels and head.")
    ] = True,
) -> None:
    """Validate policy files and show what each one routes; exit 2 at the first bad one."""
    labels: tuple[str, ...] | None = None
    multi_label = False
    if against_model:
        classifier = load_classifier(Settings(), model)
        labels, multi_label = classifier.labels, classifier.manifest.multi_label
    table = _policy_table()
    for path in files:
        spec = guarded(partial(load_policy, path))
        if labels is not None:
            guarded(partial(check_policy_fits_model, spec, labels, multi_label=multi_label))
        table.add_row(*_policy_row(spec))
    Console().print(table)


@policy_app.command("examples")
def policy_examples() -> None:
    """List the policies shipped with tiergate (print one with `policy show NAME`)."""
    table = _policy_table()
    for name in EXAMPLES:
        table.add_row(*_policy_row(example_policy(name)))
    Console().print(table)


@policy_app.command("show")
def policy_show(name: Annotated[str, typer.Argument(help="A shipped policy's name.")]) -> None:
    """Print a shipped policy as YAML, to start your own from."""
    print(guarded(lambda: example_policy(name)).to_yaml(), end="")


def _policy_table() -> Table:
    table = Table(header_style="bold")
    table.add_column("policy", no_wrap=True)
    table.add_column("version", no_wrap=True)
    for column in ("labels", "escalation", "LLM chain", "budget"):
        table.add_column(column)
    return table


def _policy_row(spec: PolicySpec) -> list[str]:
    rules = spec.escalation
    if spec.multi_label:
        band = f"[{rules.band.low:g}, {rules.band.high:g})"
        escalation = f"band {band} around {rules.flag_threshold:g}"
    else:
        escalation = f"p < {rules.min_probability:g}" + (
            f" or margin < {rules.min_margin:g}" if rules.min_margin else ""
        )
    if rules.per_label:
        escalation += f"; {len(rules.per_label)} per-label"
    chain = " > ".join(f"{p.provider}/{p.model}" for p in spec.llm.providers) or "none"
    limits = [
        f"{spec.budget.calls_per_minute}/min" if spec.budget.calls_per_minute else "",
        f"${spec.budget.usd_per_day:g}/day" if spec.budget.usd_per_day is not None else "",
    ]
    budget = ", ".join(x for x in limits if x) or "unlimited"
    kind = "multi" if spec.multi_label else "single"
    return [
        spec.name,
        spec.version,
        f"{len(spec.labels)} ({kind})",
        escalation,
        chain,
        f"{budget}; then {spec.budget.when_exhausted.value}",
    ]
