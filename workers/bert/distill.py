"""Distillation: a candidate model trained from the current one on the labels the cascade collected.

:func:`distill` warm-starts from the current model's PyTorch checkpoint (``checkpoint/``, which
training keeps) and fine-tunes it on the collected labels (the LLM's answers and people's
corrections, people's weighing ``DistillOptions.person_weight`` times an LLM's in the loss), plus
the original training file when given. It runs training's own pipeline (windows, export, int8
quantization, the temperature fitted on a validation split of the training part), so the
candidate is built exactly as ``tiergate train`` builds a model.

A held-out slice of the collected labels is never trained on (:func:`split_held_out`): both the
candidate and the current model are scored on it. With at least ``DistillOptions.min_audit`` labels
from the policy's audit sample (``learning.audit_share``: texts the LLM labelled whether or not the
BERT tier was confident), the slice is all of them, a uniform sample of the traffic's distinct
texts (drawn per text, not per message); otherwise it is the newest ``holdout_fraction`` of the
labels (by the time each was given), mostly the messages the serving model escalated, its hardest.
For each model, the card records its accuracy there with a two-sided Clopper-Pearson interval, and
the share of that slice the policy would send to the LLM once its thresholds are re-calibrated on
the slice for the policy's accuracy guarantee, with the risk-controlled method of ``tiergate
calibrate`` (:func:`~tiergate.policies.calibrate.calibrate_for_accuracy`). Judged on the audit
sample, the accuracy, the LLM share and the re-calibrated thresholds (``policy.yaml``) hold for the
traffic the policy serves; judged on the newest labels, they hold for that slice, which is no
sample of the traffic. By default the guarantee is on the accepted BERT answers, a message sent to
the LLM counting as answered right, as calibration assumes; with ``DistillOptions.llm_accuracy`` it
covers all messages, those sent to the LLM counted right at that rate. That is the card's
``distillation`` block, which the promotion gate (:func:`~tiergate.workers.bert.versions.gate`)
reads.

:func:`run_continuously` is the loop of ``tiergate distill --every N``: a round after every ``N``
new labels.
"""

from __future__ import annotations

import datetime as dt
import json
import shutil
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

import structlog

from tiergate.policies.calibrate import (
    CalibrationResult,
    accuracy_interval,
    calibrate_for_accuracy,
)
from tiergate.policies.evaluate import Answer, bert_answer
from tiergate.policies.spec import PolicySpec
from tiergate.workers.bert.calibrated import POLICY_FILE
from tiergate.workers.bert.classifier import BertClassifier
from tiergate.workers.bert.dataset import LabelledExample
from tiergate.workers.bert.manifest import CARD_FILE, ModelManifest, read_manifest
from tiergate.workers.bert.train import CHECKPOINT_DIR, TrainOptions, split_validation, train_model
from tiergate.workers.bert.versions import DISTILLATION_BLOCK, GateResult, gate
from tiergate.workers.cache import normalise
from tiergate.workers.errors import InputError, NotEnoughLabelsError

log = structlog.get_logger(__name__)

MIN_LABELS = 50
"""The fewest usable collected labels :func:`distill` accepts: fewer train little and leave a
held-out slice too small to tell two models apart."""

VALIDATION_FRACTION = 0.1  # the share of the training part that fits the temperature, as in train

HeldOutKind = Literal["audit sample", "newest labels"]
AUDIT_SAMPLE: HeldOutKind = "audit sample"
NEWEST_LABELS: HeldOutKind = "newest labels"


class Collected(Protocol):
    """What distillation reads of a collected label (``workers.labels.CollectedExample``)."""

    @property
    def text(self) -> str:
        """The redacted text the label belongs to."""

    @property
    def labels(self) -> Sequence[str]:
        """The reference label(s)."""

    @property
    def time(self) -> float:
        """Unix seconds when the label was given."""

    @property
    def kind(self) -> str:
        """Who gave it: ``"llm"`` or ``"person"``."""

    @property
    def audit(self) -> bool:
        """Whether the text was in the policy's audit sample (labelled, BERT confident or not)."""


@dataclass(frozen=True, kw_only=True)
class DistillOptions:
    """How to distill. ``target_accuracy`` (with ``confidence``) is the policy's guarantee.

    ``llm_accuracy``, the LLM's measured accuracy, makes the guarantee cover all messages, the
    LLM's answers counted right at that rate; None keeps it on the accepted BERT answers.
    ``min_audit`` is the fewest audit-sample labels that make the held-out slice (all of them);
    with fewer, the newest ``holdout_fraction`` is held out (see :func:`split_held_out`).
    """

    target_accuracy: float
    epochs: int = 2
    learning_rate: float = 3e-5
    batch_size: int = 32
    person_weight: float = 2.0  # loss weight of a person's label; an LLM's weighs 1
    holdout_fraction: float = 0.2  # without an audit sample: the newest labels held out
    min_audit: int = 50
    confidence: float = 0.9
    seed: int = 13
    min_onnx_agreement: float = 0.97  # as TrainOptions.min_agreement
    show_progress: bool = False  # training's progress bars on standard error
    threads: int | None = None  # torch's threads (default: one per core), as TrainOptions.threads
    llm_accuracy: float | None = None


@dataclass(frozen=True)
class HeldOutScore:
    """One model on the held-out slice: accuracy with its interval, and the LLM share it needs.

    ``llm_share`` is the share the re-calibrated policy (``calibration``) sends to the LLM;
    1 when no threshold certifies the target with this model (only the LLM can then keep it).
    With ``DistillOptions.llm_accuracy`` the target is over all messages.
    """

    model_version: str
    accuracy: float
    ci_low: float
    ci_high: float
    llm_share: float
    calibration: CalibrationResult

    def figures(self) -> dict[str, Any]:
        """The card's figures of this model (``distillation.candidate`` or ``.current``)."""
        return {
            "model_version": self.model_version,
            "accuracy": self.accuracy,
            "ci_low": self.ci_low,
            "ci_high": self.ci_high,
            "llm_share": self.llm_share,
        }


@dataclass(frozen=True)
class DistillReport:
    """What :func:`distill` wrote: the candidate's card, its re-calibrated policy, the verdict."""

    card: dict[str, Any]
    policy: PolicySpec
    gate: GateResult
    candidate: HeldOutScore
    current: HeldOutScore

    @property
    def model_version(self) -> str:
        """The candidate's model version."""
        return str(self.card["model_version"])


def split_newest(
    collected: Sequence[Collected], fraction: float
) -> tuple[list[Collected], list[Collected]]:
    """``(older, newest)``: the labels ordered by time, the newest ``fraction`` held out.

    The held-out slice has ``round(len * fraction)`` labels, at least one and never all.
    """
    if not 0.0 < fraction < 1.0:
        raise InputError(f"the held-out fraction must be between 0 and 1, not {fraction}")
    ordered = sorted(collected, key=lambda example: example.time)
    held = min(max(1, round(len(ordered) * fraction)), len(ordered) - 1)
    return ordered[: len(ordered) - held], ordered[len(ordered) - held :]


def split_held_out(
    collected: Sequence[Collected], options: DistillOptions
) -> tuple[list[Collected], list[Collected], HeldOutKind]:
    """``(train, held_out, kind)``: the labels to train on, and the slice that judges the models.

    With at least ``options.min_audit`` audit-sample labels, ALL of them are held out and never
    trained on (``"audit sample"``): a uniform sample of the distinct texts, so the accuracy and
    the re-calibrated thresholds measured on it hold for the traffic, and the bigger it is the
    tighter they are; the policy's ``audit_share`` sizes it. Everything else trains. Otherwise,
    or when the audit sample is all there is (nothing would be left to train on), the newest
    ``options.holdout_fraction`` is held out as :func:`split_newest` cuts it (``"newest
    labels"``), audit labels among them or among the trained ones alike. Either way a label
    whose text (normalised as for the cache key) is held out is not trained on: under another
    model or policy version the same text has another cache key, so it can be collected twice.
    The held-out slice is ordered by time.

    Raises:
        InputError: ``min_audit`` under 1, or a held-out fraction outside (0, 1).
    """
    if options.min_audit < 1:
        raise InputError(f"the audit sample must count at least 1 label, not {options.min_audit}")
    audit = sorted((e for e in collected if e.audit), key=lambda example: example.time)
    kind, held_out, rest = AUDIT_SAMPLE, audit, [e for e in collected if not e.audit]
    held_texts = {normalise(example.text) for example in held_out}
    train = [example for example in rest if normalise(example.text) not in held_texts]
    if len(audit) < options.min_audit or not train:
        kind = NEWEST_LABELS
        rest, held_out = split_newest(collected, options.holdout_fraction)
        held_texts = {normalise(example.text) for example in held_out}
        train = [example for example in rest if normalise(example.text) not in held_texts]
    return train, held_out, kind


def _gold(example: Collected, spec: PolicySpec) -> Answer:
    return frozenset(example.labels) if spec.multi_label else example.labels[0]


def score_held_out(
    model_dir: Path, held_out: Sequence[Collected], spec: PolicySpec, options: DistillOptions
) -> HeldOutScore:
    """Score one model on the held-out labels (see :class:`HeldOutScore`)."""
    classifier = BertClassifier(model_dir, batch_size=options.batch_size)
    predictions = classifier.predict([example.text for example in held_out])
    gold = [_gold(example, spec) for example in held_out]
    correct = sum(bert_answer(p, spec) == g for p, g in zip(predictions, gold, strict=True))
    low, high = accuracy_interval(correct, len(gold), options.confidence)
    calibration = calibrate_for_accuracy(
        predictions,
        gold,
        spec,
        options.target_accuracy,
        options.confidence,
        llm_accuracy=options.llm_accuracy,
    )
    # over all messages, a target the LLM alone reaches is already feasible with share 1
    if not calibration.feasible:
        calibration = calibration.sending_everything(spec)
    return HeldOutScore(
        model_version=classifier.model_version,
        accuracy=correct / len(gold),
        ci_low=low,
        ci_high=high,
        llm_share=calibration.llm_share,
        calibration=calibration,
    )


def _usable(collected: Sequence[Collected], spec: PolicySpec) -> tuple[list[Collected], int]:
    """The collected labels this policy can train on, and how many were left out.

    Left out: a label no longer in the policy's set, or (single-label) not exactly one label;
    a multi-label example may have none (no flag applies).
    """
    known = set(spec.label_names)
    usable = [
        example
        for example in collected
        if set(example.labels) <= known and (spec.multi_label or len(example.labels) == 1)
    ]
    return usable, len(collected) - len(usable)


def _training_part(
    older: Sequence[Collected],
    extra: Sequence[LabelledExample],
    options: DistillOptions,
) -> tuple[list[LabelledExample], list[LabelledExample], list[float]]:
    """``(train, validation, train weights)`` from the older labels and the training file.

    Every example is numbered by its ``line`` in the combined list, which maps it back to its
    weight after the stratified validation split.
    """
    texts = [
        (e.text, tuple(e.labels), options.person_weight if e.kind == "person" else 1.0)
        for e in older
    ]
    texts += [(e.text, e.labels, 1.0) for e in extra]
    combined = [
        LabelledExample(text=text, labels=labels, line=i + 1)
        for i, (text, labels, _) in enumerate(texts)
    ]
    train, validation = split_validation(combined, VALIDATION_FRACTION, options.seed)
    weights = [texts[example.line - 1][2] for example in train]
    return train, validation, weights


def _iso(seconds: float) -> str:
    return dt.datetime.fromtimestamp(seconds, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _period(examples: Sequence[Collected]) -> dict[str, str | None]:
    times = [example.time for example in examples]
    return {
        "from": _iso(min(times)) if times else None,
        "to": _iso(max(times)) if times else None,
    }


def distillation_block(
    spec: PolicySpec,
    options: DistillOptions,
    older: Sequence[Collected],
    held_out: Sequence[Collected],
    extra_examples: int,
    scores: tuple[HeldOutScore, HeldOutScore],
    *,
    held_out_kind: HeldOutKind,
) -> dict[str, Any]:
    """The card's ``distillation`` block.

    ``sources`` and ``period`` describe what the candidate learned from: the collected labels
    trained on (the held-out slice excluded) by kind, and the training file's examples.
    ``held_out`` counts the slice both models were scored on and ``held_out_kind`` says which
    it was (:func:`split_held_out`): ``"audit sample"`` or ``"newest labels"``.
    """
    kinds = Counter(example.kind for example in older)
    candidate, current = scores
    return {
        "policy": spec.name,
        "target_accuracy": options.target_accuracy,
        "confidence": options.confidence,
        "llm_accuracy": options.llm_accuracy,
        "sources": {
            "llm": kinds["llm"],
            "person": kinds["person"],
            "training_file": extra_examples,
        },
        "period": _period(older),
        "held_out": {"examples": len(held_out), **_period(held_out)},
        "held_out_kind": held_out_kind,
        "candidate": candidate.figures(),
        "current": current.figures(),
    }


def distill(
    base_model: Path,
    collected: Sequence[Collected],
    output: Path,
    *,
    spec: PolicySpec,
    options: DistillOptions,
    extra_training: Sequence[LabelledExample] = (),
    progress: Callable[[str], None] | None = None,
) -> DistillReport:
    """Train, export and evaluate a candidate from ``base_model`` on ``collected``.

    ``base_model`` is the current model directory; its ``checkpoint/`` is the warm start and its
    labels (in its order) the candidate's. ``collected`` are the policy's labelled examples
    (:class:`~tiergate.workers.labels.CollectedExample`); labels outside the policy are left
    out. Writes a complete model directory to ``output`` (replacing one there): the ONNX model,
    manifest, ``checkpoint/``, the card (``model.json``) with the ``distillation`` block, and
    ``policy.yaml``, the policy re-calibrated with the candidate on the held-out slice (every
    message sent to the LLM when nothing certifies the target). The held-out slice is the audit
    sample when there are at least ``options.min_audit`` audit labels, else the newest labels
    (:func:`split_held_out`). The directory is assembled beside ``output`` and renamed into place
    at the end. ``progress`` hears each step.

    Raises:
        NotEnoughLabelsError: fewer than :data:`MIN_LABELS` usable labels.
        InputError: no checkpoint in ``base_model``, or options or data that cannot train.
        PolicyError: ``spec`` does not fit the model's labels.
        ExportMismatchError: ONNX disagrees with torch beyond ``options.min_onnx_agreement``.
    """
    say = progress or (lambda _: None)
    manifest = read_manifest(base_model)
    checkpoint = _checkpoint(base_model, manifest, spec)
    usable, left_out = _usable(collected, spec)
    if len(usable) < MIN_LABELS:
        raise NotEnoughLabelsError(spec.name, len(usable), MIN_LABELS)
    if left_out:
        say(f"left out {left_out} collected labels outside policy {spec.name!r}'s label set")
    unknown = sorted({label for e in extra_training for label in e.labels} - set(manifest.labels))
    if unknown:
        raise InputError(f"the training file has labels the model lacks: {unknown}")
    older, held_out, kind = split_held_out(usable, options)
    train, validation, weights = _training_part(older, extra_training, options)
    staging = output.with_name(f".{output.name}.distilling")
    shutil.rmtree(staging, ignore_errors=True)
    say(
        f"fine-tuning {manifest.model_version} on {len(older)} collected labels"
        f"{f' and {len(extra_training)} training-file examples' if extra_training else ''}; "
        f"{len(held_out)} held out ({kind})"
    )
    started = time.perf_counter()
    train_options = _train_options(manifest, checkpoint, staging, options)
    try:
        train_model(train_options, train, validation, example_weights=weights)
        say(
            f"scoring the {len(held_out)} held-out labels ({kind}) with the candidate and the "
            "current model"
        )
        candidate = score_held_out(staging, held_out, spec, options)
        current = score_held_out(base_model, held_out, spec, options)
        report = _finish(
            staging,
            spec,
            options,
            (older, held_out, kind),
            len(extra_training),
            (candidate, current),
        )
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if output.exists():
        shutil.rmtree(output)
    staging.rename(output)
    log.info(
        "distill.done",
        policy=spec.name,
        candidate=candidate.model_version,
        current=current.model_version,
        held_out=len(held_out),
        held_out_kind=kind,
        candidate_accuracy=candidate.accuracy,
        current_accuracy=current.accuracy,
        candidate_llm_share=candidate.llm_share,
        current_llm_share=current.llm_share,
        gate_passed=report.gate.passed,
        seconds=round(time.perf_counter() - started, 1),
    )
    return report


def _checkpoint(base_model: Path, manifest: ModelManifest, spec: PolicySpec) -> Path:
    """The base's checkpoint, checked to fit the policy and to keep the base's label order."""
    from tiergate.workers.cascade import check_policy_fits_model  # noqa: PLC0415

    check_policy_fits_model(spec, manifest.labels, multi_label=manifest.multi_label)
    checkpoint = base_model / CHECKPOINT_DIR
    config = checkpoint / "config.json"
    if not config.is_file():
        raise InputError(
            f"{base_model}: no {CHECKPOINT_DIR}/ to warm-start from (train the model with "
            "`tiergate train`, which keeps it)"
        )
    id2label = json.loads(config.read_text(encoding="utf-8")).get("id2label") or {}
    if [id2label.get(str(i)) for i in range(len(manifest.labels))] != list(manifest.labels):
        raise InputError(f"{checkpoint}: its labels are not the model's {list(manifest.labels)}")
    return checkpoint


def _train_options(
    manifest: ModelManifest, checkpoint: Path, staging: Path, options: DistillOptions
) -> TrainOptions:
    """Training's options for a warm start: the base's labels, head, window and name."""
    return TrainOptions(
        base_model=checkpoint,
        output=staging,
        labels=manifest.labels,
        multi_label=manifest.multi_label,
        name=manifest.name,
        epochs=options.epochs,
        batch_size=options.batch_size,
        learning_rate=options.learning_rate,
        max_length=manifest.max_length,
        seed=options.seed,
        threads=options.threads,
        min_agreement=options.min_onnx_agreement,
        show_progress=options.show_progress,
        base_name=manifest.model_version,
        extra_card={"warm_start": manifest.model_version, "person_weight": options.person_weight},
    )


def _finish(
    staging: Path,
    spec: PolicySpec,
    options: DistillOptions,
    split: tuple[Sequence[Collected], Sequence[Collected], HeldOutKind],
    extra_examples: int,
    scores: tuple[HeldOutScore, HeldOutScore],
) -> DistillReport:
    """Add the ``distillation`` block to the staged card, judge it, write the policy."""
    older, held_out, kind = split
    candidate, current = scores
    card = json.loads((staging / CARD_FILE).read_text(encoding="utf-8"))
    card[DISTILLATION_BLOCK] = distillation_block(
        spec, options, older, held_out, extra_examples, scores, held_out_kind=kind
    )
    verdict = gate(card)
    card["gate"] = {"passed": verdict.passed, "reasons": verdict.reasons}
    (staging / CARD_FILE).write_text(json.dumps(card, indent=2) + "\n", encoding="utf-8")
    policy = candidate.calibration.policy(spec)
    (staging / POLICY_FILE).write_text(policy.to_yaml(), encoding="utf-8")
    return DistillReport(
        card=card, policy=policy, gate=verdict, candidate=candidate, current=current
    )


@dataclass(frozen=True)
class Round:
    """One round of continuous distillation: the labels it saw and what came of it."""

    labels: int
    report: DistillReport | None  # None when the round failed (``error`` says why)
    promoted: bool
    error: str | None = None


def run_continuously(
    every: int,
    *,
    count: Callable[[], int],
    distill_round: Callable[[int], Round],
    rounds: int | None = None,
    poll_seconds: float = 30.0,
    sleep: Callable[[float], None] = time.sleep,
) -> list[Round]:
    """Distill after every ``every`` new labels, until ``rounds`` rounds ran (None: forever).

    ``count()`` is the number of collected labels now; a round runs as soon as it is at least
    ``every`` above the count the previous round saw (0 before the first) and at least
    :data:`MIN_LABELS`. ``distill_round(labels)`` builds, judges and maybe promotes one
    candidate; a round that fails is logged and the loop waits for the next ``every`` labels.
    Between polls it sleeps ``poll_seconds``. Stops with KeyboardInterrupt (Ctrl-C) from
    ``sleep`` or a round; the rounds done are in the returned list only on a normal return.
    """
    if every < 1:
        raise InputError(f"--every must be at least 1, not {every}")
    done: list[Round] = []
    seen = 0
    while rounds is None or len(done) < rounds:
        labels = count()
        if labels < max(seen + every, MIN_LABELS):
            log.debug("distill.waiting", labels=labels, next_round_at=max(seen + every, MIN_LABELS))
            sleep(poll_seconds)
            continue
        result = distill_round(labels)
        seen = labels
        done.append(result)
        log.info(
            "distill.round",
            round=len(done),
            labels=labels,
            candidate=None if result.report is None else result.report.model_version,
            gate_passed=None if result.report is None else result.report.gate.passed,
            promoted=result.promoted,
            error=result.error,
        )
    return done
