"""The ``tiergate`` command line: train and build models, classify messages, run the demo.

Exit codes: 0 when every input was answered; 1 when some input records were rejected (each is
reported on standard error and as an ``error`` line in the output, in place); 2 for a usage
error (bad arguments, a missing or corrupt model, an unreadable file), when nothing is answered.

One module per command or group of commands, registered below: ``classify``, ``submit``,
``train``, ``tuning`` (``calibrate``, ``eval``), ``distill``, ``model``, ``service`` (``worker``,
``serve``), ``dead_letters``, ``policy``, ``demo``, ``feedback`` and ``labels`` (``stats``,
``export``), ``batches`` (``list``). What several of them share lives in
``errors`` (exit codes, standard error, usage errors), ``inputs`` (records into messages),
``output`` (JSON lines, the decision table), ``tally`` (the closing summary) and ``embedded``
(the in-process cascade).
"""

from __future__ import annotations

import os
from typing import Annotated

import typer

from tiergate.gateway.cli import (
    batches,
    classify,
    dead_letters,
    demo,
    distill,
    feedback,
    labels,
    model,
    policy,
    service,
    submit,
    train,
    tuning,
)
from tiergate.workers.logs import configure_logging

app = typer.Typer(
    name="tiergate",
    help="tiergate: a tiered text-classification gateway.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.callback()
def _configure(
    log_level: Annotated[
        str,
        typer.Option(
            envvar="TIERGATE_LOG_LEVEL",
            help="Log level of tiergate's structured logs on standard error.",
        ),
    ] = "WARNING",
) -> None:
    """tiergate: a tiered text-classification gateway."""
    try:
        configure_logging(log_level)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--log-level") from None
    # Processes this command starts (`serve --workers N`) configure their logs from it.
    os.environ["TIERGATE_LOG_LEVEL"] = log_level


# In the order `tiergate --help` lists them: commands, then groups.
app.command()(classify.classify)
app.command()(train.train)
app.command()(tuning.calibrate)
app.command()(distill.distill)
app.command("eval")(tuning.evaluate)
app.command()(service.worker)
app.command()(service.serve)
app.command()(submit.submit)
app.command()(demo.demo)
app.command()(feedback.feedback)
app.add_typer(model.model_app, name="model")
app.add_typer(policy.policy_app, name="policy")
app.add_typer(dead_letters.dead_letters_app, name="dead-letters")
app.add_typer(labels.labels_app, name="labels")
app.add_typer(batches.batches_app, name="batches")


def main() -> None:
    """Entry point for ``python -m tiergate``."""
    app()
