"""The embedded cascade the commands run in-process: settings, the BERT classifier, the cascade."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import typer

from tiergate.gateway.cli.errors import guarded, warn
from tiergate.policies.spec import PolicySpec
from tiergate.workers.bert.classifier import BertClassifier
from tiergate.workers.bert.serving import ServingClassifier
from tiergate.workers.cascade import (
    Cascade,
    PolicyBook,
    build_cascade,
    load_policy_book,
    no_provider_warning,
)
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


def load_serving_classifier(
    settings: Settings, model: Path | None
) -> BertClassifier | ServingClassifier:
    """The BERT tier over ``model`` when given, else over the deployment's current version.

    The current version is followed between batches as a worker follows it: a promotion
    during a long file applies from the next batch on. A bad model exits 2.
    """
    if model is not None:
        return load_classifier(settings, model)
    return guarded(lambda: ServingClassifier.from_settings(settings))


def warn_no_provider(spec: PolicySpec) -> None:
    """The CLI's warning line for a policy whose LLM tier has no provider."""
    warn(no_provider_warning(spec))


def policy_book_or_exit(
    settings: Settings,
    classifier: BertClassifier | ServingClassifier,
    *,
    on_no_provider: Callable[[PolicySpec], None] = warn_no_provider,
) -> PolicyBook:
    """The policies ``settings`` configure for ``classifier``; a bad policy exits 2.

    A policy with no LLM provider is passed to ``on_no_provider`` (a warning line by default).
    """
    return guarded(
        lambda: load_policy_book(
            settings,
            classifier.labels,
            multi_label=classifier.manifest.multi_label,
            on_no_provider=on_no_provider,
        )
    )


def open_cascade_or_exit(
    settings: Settings,
    classifier: BertClassifier | ServingClassifier,
    *,
    use_cache: bool = True,
) -> Cascade:
    """The cascade of :func:`~tiergate.workers.cascade.open_cascade` over ``classifier``.

    A policy that does not fit the model exits 2; one with no LLM provider is a warning line.
    """
    policies = policy_book_or_exit(settings, classifier)
    return guarded(lambda: build_cascade(settings, classifier, policies, use_cache=use_cache))
