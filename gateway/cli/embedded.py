"""The embedded cascade the commands run in-process: settings, the BERT classifier, the cascade."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import typer

from tiergate.gateway.cli.errors import guarded
from tiergate.workers.bert.classifier import BertClassifier
from tiergate.workers.cascade import Cascade, open_cascade
from tiergate.workers.settings import Settings

MODEL_OPTION = typer.Option(help="Model directory (default: the default).")


def settings_with_policies(policies: Sequence[Path] | None) -> Settings:
    """The environment's settings, with ``policies`` (when given) as the policy files."""
    settings = Settings()
    if policies:
        settings = settings.model_copy(update={"policy_files": list(policies)})
    return settings


def load_classifier(settings: Settings, model: Path | None) -> BertClassifier:
    """The BERT tier over ``model`` (else the configured one); a bad model exits 2."""
    return guarded(lambda: BertClassifier.from_settings(settings, model))


def open_cascade_or_exit(
    settings: Settings, classifier: BertClassifier, *, use_cache: bool = True
) -> Cascade:
    """:func:`~tiergate.workers.cascade.open_cascade` over ``classifier``; a bad policy exits 2."""
    return guarded(lambda: open_cascade(settings, classifier, use_cache=use_cache))
