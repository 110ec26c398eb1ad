"""``tiergate policy init``, ``check``, ``examples``, ``show``: write, validate and list policies.

``--provider NAME:MODEL`` (:data:`PROVIDER_OPTION`, :func:`provider_chain`) sets an LLM provider
chain here and in ``tiergate calibrate``.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Annotated, Any

import typer
import yaml
from rich.console import Console
from rich.table import Table

from tiergate.gateway.cli.embedded import MODEL_OPTION, load_classifier, warn_no_provider
from tiergate.gateway.cli.errors import err, fail, guarded
from tiergate.policies.spec import (
    DEFAULT_PROVIDERS,
    EXAMPLES,
    PolicySpec,
    ProviderRef,
    example_policy,
    load_policy,
    parse_policy,
)
from tiergate.workers.bert.manifest import ModelManifest, read_manifest
from tiergate.workers.cascade import check_policy_fits_model
from tiergate.workers.llm.provider import PROVIDERS
from tiergate.workers.settings import Settings

policy_app = typer.Typer(help="Write, check and list policy files.", no_args_is_help=True)


def chain_text(providers: Sequence[ProviderRef]) -> str:
    """A provider chain as ``--provider`` values: ``openai:gpt-4o-mini then anthropic:...``."""
    return " then ".join(f"{ref.provider}:{ref.model}" for ref in providers)


PROVIDER_OPTION = typer.Option(
    "--provider",
    help="An LLM provider and model, NAME:MODEL (repeatable; tried in the order given). "
    f"Default: {chain_text(DEFAULT_PROVIDERS)}.",
)


def provider_chain(values: Sequence[str]) -> list[ProviderRef]:
    """``--provider NAME:MODEL`` values as a provider chain, in order; a bad value exits 2.

    The name must be a registered provider; the model is everything after the first colon, so
    a model name with a colon of its own (``llama3:8b``) is kept whole.
    """
    chain = []
    for value in values:
        name, colon, model = (part.strip() for part in value.partition(":"))
        if not colon or not name or not model:
            raise fail(f"--provider {value!r}: give NAME:MODEL, for example openai:gpt-4o-mini")
        if name not in PROVIDERS:
            known = ", ".join(sorted(PROVIDERS))
            raise fail(f"--provider {value!r}: unknown provider {name!r} (known: {known})")
        chain.append(ProviderRef(provider=name, model=model))
    return chain


@policy_app.command("init")
def policy_init(
    model: Annotated[Path | None, MODEL_OPTION] = None,
    output: Annotated[
        Path | None,
        typer.Option("--output", "-o", help="Write the policy here (default: print it)."),
    ] = None,
    name: Annotated[
        str | None, typer.Option(help="The policy's name (default: the model's name).")
    ] = None,
    provider: Annotated[list[str] | None, PROVIDER_OPTION] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing output file.")] = False,
) -> None:
    """Start a policy for a model: its labels, descriptions to fill in, an LLM provider chain.

    The escalation thresholds are placeholders for `tiergate calibrate --base-policy FILE` to
    replace; the policy loads and passes `policy check` as written.
    """
    if output is not None and output.exists() and not overwrite:
        raise fail(f"{output} exists; pass --overwrite to replace it")
    chain = provider_chain(provider or []) or list(DEFAULT_PROVIDERS)
    directory = model if model is not None else Settings().resolved_model_dir
    manifest = guarded(lambda: read_manifest(directory, verify=False))
    text = guarded(lambda: policy_template(manifest, name, chain))
    if output is None:
        print(text, end="")
        return
    try:
        output.write_text(text, encoding="utf-8")
    except OSError as exc:
        raise fail(f"{output}: cannot be written ({exc.strerror})") from None
    err.print(
        f"policy for the {len(manifest.labels)} labels of {manifest.name!r} written to {output}: "
        "describe each label and write the instructions (the LLM reads them), then calibrate it "
        f"with `tiergate calibrate DATA --base-policy {output} ...`",
        highlight=False,
        soft_wrap=True,
    )


def policy_template(
    manifest: ModelManifest, name: str | None, providers: Sequence[ProviderRef]
) -> str:
    """A commented policy YAML for ``manifest``'s labels and head, with ``providers``.

    Label descriptions and the instructions are left empty with a TODO comment; the escalation
    rules are placeholders until calibrated. Raises
    :class:`~tiergate.policies.spec.PolicyError` for a name a policy cannot have.
    """
    if name is None:
        name = re.sub(r"[^A-Za-z0-9_.-]+", "-", manifest.name).strip("-") or "policy"
    multi = manifest.multi_label
    escalation: dict[str, Any] = (
        {"flag_threshold": 0.5, "band": {"low": 0.3, "high": 0.7}}
        if multi
        else {"min_probability": 0.8, "min_margin": 0.0}
    )
    data: dict[str, Any] = {
        "name": name,
        "version": "1",
        "description": f"Messages classified by the model {manifest.name}.",
        "multi_label": multi,
        "labels": [{"name": label, "description": ""} for label in manifest.labels],
        "escalation": escalation,
        "generation": {"labels": [], "tasks": ["reply", "summary", "explain"]},
        "llm": {
            "providers": [ref.model_dump(exclude_none=True) for ref in providers],
            "instructions": "",
        },
    }
    spec = parse_policy(data, source="policy init")
    data["budget"] = spec.budget.model_dump(mode="json")
    body = yaml.safe_dump(data, sort_keys=False, allow_unicode=True, width=10_000)
    kind = "multi-label" if multi else "single-label"
    model_name = " ".join(manifest.name.split())  # one line, whatever the manifest holds
    comments = {
        "  description: ''": "TODO: what this label means (the LLM's prompt shows it)",
        "escalation:": "placeholders until `tiergate calibrate` chooses them",
        "  providers:": "tried in order; one without an API key is skipped",
        "  instructions: ''": "TODO: what the LLM should know about these messages",
        "  usd_per_day: null": "a daily limit in USD, once you know your traffic",
    }
    lines = [
        f"{line}  # {comments[line]}" if line in comments else line for line in body.splitlines()
    ]
    header = [
        f"# A policy for the model {model_name} ({len(manifest.labels)} labels, {kind}).",
        "# 1. Describe each label and write the instructions: the LLM's prompt shows them.",
        "# 2. Calibrate the escalation thresholds on labelled validation data:",
        "#      tiergate calibrate DATA --base-policy THIS_FILE --target-accuracy 0.95 -o NEW_FILE",
        "# 3. API keys come from the environment (OPENAI_API_KEY, ANTHROPIC_API_KEY).",
    ]
    return "\n".join(header + lines) + "\n"


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
        if not spec.llm.providers:
            warn_no_provider(spec)
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
