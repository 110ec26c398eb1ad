"""Distillation: warm start, the held-out slice, people's weight, the card and the gate."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import numpy as np
import pytest

from tiergate.policies.spec import PolicySpec, load_policy
from tiergate.workers.bert.classifier import BertClassifier
from tiergate.workers.bert.dataset import LabelledExample
from tiergate.workers.bert.distill import (
    MIN_LABELS,
    POLICY_FILE,
    DistillOptions,
    Round,
    accuracy_interval,
    distill,
    distillation_block,
    run_continuously,
    score_held_out,
    split_held_out,
    split_newest,
)
from tiergate.workers.bert.manifest import CARD_FILE, read_manifest
from tiergate.workers.bert.train import CHECKPOINT_DIR, training_loss
from tiergate.workers.bert.versions import gate
from tiergate.workers.errors import InputError, NotEnoughLabelsError
from tiergate.workers.labels import CollectedExample

LABELS = ("account", "billing", "bug")
WORDS = {"account": "passwords", "billing": "refunds", "bug": "crashes"}
START = 1_800_000_000.0


def example(
    text: str, labels: list[str], source: str, time: float, *, audit: bool = False
) -> CollectedExample:
    """A collected example of the tickets policy as the label store returns it."""
    return CollectedExample(
        key=f"key-{time}",
        text=text,
        labels=labels,
        source=source,
        policy="tickets",
        policy_version="1",
        model_version="tiny",
        scores={},
        time=time,
        audit=audit,
    )


def collected(n: int, *, flip_before: int = 0, person_every: int = 5) -> list[CollectedExample]:
    """``n`` labels a minute apart, every ``person_every``-th a person's.

    The first ``flip_before`` are labelled with the next label instead of the right one.
    """
    labels = []
    for i in range(n):
        right = LABELS[i % 3]
        given = LABELS[(i + 1) % 3] if i < flip_before else right
        source = "person:agent-7" if i % person_every == 0 else "llm:openai/gpt-4o-mini"
        labels.append(
            example(f"note {i} regarding {WORDS[right]}", [given], source, START + 60 * i)
        )
    return labels


def audited(labels: list[CollectedExample], every: int) -> list[CollectedExample]:
    """``labels`` with every ``every``-th (from the second) in the audit sample."""
    return [
        label.model_copy(update={"audit": True}) if i % every == 1 else label
        for i, label in enumerate(labels)
    ]


def spec() -> PolicySpec:
    """The tickets policy of the tiny model's labels."""
    return PolicySpec.for_labels(LABELS, multi_label=False, name="tickets")


def options(**changes: float) -> DistillOptions:
    """Options for the tiny model: quick, and a target its 30 held-out labels can certify."""
    defaults: dict[str, float] = {
        "target_accuracy": 0.7,
        "epochs": 60,
        "learning_rate": 5e-3,
        "batch_size": 16,
        "min_onnx_agreement": 0.0,
        "threads": 1,  # the tiny model trains fastest on one thread, whatever else runs
    }
    return DistillOptions(**{**defaults, **changes})  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def learned(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, object]:
    """A candidate distilled from the tiny model on 150 right labels, and its report."""
    output = tmp_path_factory.mktemp("distilled") / "learned"
    report = distill(tiny_model, collected(150), output, spec=spec(), options=options())
    return output, report


def test_warm_start_begins_at_the_base_weights(tiny_model, tmp_path):
    """With no training step, the candidate's raw logits are the base model's."""
    output = tmp_path / "candidate"
    distill(tiny_model, collected(60), output, spec=spec(), options=options(epochs=0))
    texts = [f"note {i} regarding {word}" for i, word in enumerate(WORDS.values())]
    base, candidate = BertClassifier(tiny_model), BertClassifier(output)
    base_logits = base.run(base.encode(texts).ids)
    candidate_logits = candidate.run(candidate.encode(texts).ids)
    np.testing.assert_allclose(candidate_logits, base_logits, atol=1e-5)
    assert (output / CHECKPOINT_DIR / "config.json").is_file()
    card = json.loads((output / CARD_FILE).read_text())
    assert card["base_model"] == read_manifest(tiny_model).model_version


def test_newest_labels_are_held_out():
    """The held-out slice is the newest labels by time, whatever order they arrive in."""
    labels = collected(100)
    shuffled = random.Random(3).sample(labels, len(labels))
    older, newest = split_newest(shuffled, 0.2)
    assert [label.time for label in newest] == [label.time for label in labels[80:]]
    assert max(label.time for label in older) < min(label.time for label in newest)
    assert len(older) == 80


def test_an_audit_sample_of_min_audit_labels_is_the_held_out_slice():
    """With min_audit audit labels, all are held out and none trained on; the rest trains."""
    labels = audited(collected(100), 4)  # 25 audit labels, spread over the whole period
    train, held_out, kind = split_held_out(labels, options(min_audit=25))
    assert kind == "audit sample"
    assert {label.key for label in held_out} == {label.key for label in labels if label.audit}
    assert len(held_out) == 25
    assert [label.time for label in held_out] == sorted(label.time for label in held_out)
    assert not any(label.audit for label in train)
    assert len(train) == 75


def test_fewer_audit_labels_than_min_audit_leave_the_newest_held_out():
    """One audit label short of min_audit, the newest fraction is held out as before."""
    labels = audited(collected(100), 4)
    train, held_out, kind = split_held_out(labels, options(min_audit=26))
    older, newest = split_newest(labels, 0.2)
    assert kind == "newest labels"
    assert (train, held_out) == (older, newest)
    assert any(label.audit for label in train)  # audit labels train like any other then


def test_an_audit_sample_that_is_everything_leaves_the_newest_held_out():
    """When every label is an audit label nothing would train: the newest fraction is held out."""
    labels = [label.model_copy(update={"audit": True}) for label in collected(60)]
    train, held_out, kind = split_held_out(labels, options(min_audit=10))
    assert kind == "newest labels"
    assert (len(train), len(held_out)) == (48, 12)


def test_a_held_out_text_collected_again_is_not_trained_on():
    """The same text under another cache key (say, another model version) stays out of training.

    Texts compare as the cache key normalises them, so extra whitespace does not tell them apart.
    """
    labels = audited(collected(60), 6)  # 10 audit labels
    # the audit texts collected again, not audited, after all the others
    again = [
        example(f" {label.text.replace(' ', '  ')}\n", label.labels, "llm:x", START + 6000 + i)
        for i, label in enumerate(label for label in labels if label.audit)
    ]
    train, held_out, kind = split_held_out(labels + again, options(min_audit=10))
    assert kind == "audit sample"
    assert {label.key for label in held_out} == {label.key for label in labels if label.audit}
    assert train == [label for label in labels if not label.audit]  # the repeats left out
    train, newest, kind = split_held_out(labels + again, options(min_audit=11))
    assert kind == "newest labels"
    assert newest[-10:] == again  # the newest 14 of 70: the repeats and 4 others
    assert len(train) == 56 - 10  # the 10 older audit texts, held out as repeats, left out
    assert not {label.text for label in labels if label.audit} & {label.text for label in train}


def test_min_audit_must_be_positive():
    """An audit sample of no labels cannot judge anything: min_audit under 1 is refused."""
    with pytest.raises(InputError, match="at least 1"):
        split_held_out(collected(60), options(min_audit=0))


def test_person_labels_weigh_more_in_the_loss():
    """Per-example weights give sum(e * nll) / sum(e), checked by hand on two examples."""
    import torch

    logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    targets = torch.tensor([0, 0])
    weighted = training_loss(
        logits, targets, None, multi_label=False, example_weights=torch.tensor([1.0, 3.0])
    )
    nll = [
        -math.log(math.exp(2) / (math.exp(2) + 2)),
        -math.log(1 / (math.exp(1) + 2)),
    ]
    assert weighted.item() == pytest.approx((1 * nll[0] + 3 * nll[1]) / 4, rel=1e-6)
    plain = training_loss(logits, targets, None, multi_label=False)
    ones = training_loss(
        logits, targets, None, multi_label=False, example_weights=torch.tensor([1.0, 1.0])
    )
    assert ones.item() == pytest.approx(plain.item(), rel=1e-6)
    assert weighted.item() > plain.item()  # the badly predicted example weighs three times


def test_unit_example_weights_keep_class_weights_and_multi_label_losses():
    """Weights of one leave the class-weighted and the multi-label loss as they were."""
    import torch

    logits = torch.tensor([[2.0, -1.0, 0.5], [0.0, 1.0, -0.5], [1.0, 1.0, 1.0]])
    targets = torch.tensor([0, 2, 1])
    weights = torch.tensor([1.0, 2.0, 0.5])
    ones = torch.ones(3)
    assert training_loss(
        logits, targets, weights, multi_label=False, example_weights=ones
    ).item() == pytest.approx(training_loss(logits, targets, weights, multi_label=False).item())
    flags = torch.tensor([[1.0, 0.0, 1.0], [0.0, 0.0, 1.0], [1.0, 1.0, 0.0]])
    assert training_loss(
        logits, flags, weights, multi_label=True, example_weights=ones
    ).item() == pytest.approx(training_loss(logits, flags, weights, multi_label=True).item())


def test_card_records_what_it_learned_from_and_how_it_did(learned, tiny_model):
    """The distillation block counts sources and periods and holds both models' figures."""
    output, report = learned
    card = json.loads((output / CARD_FILE).read_text())
    block = card["distillation"]
    assert block["policy"] == "tickets"
    assert (block["target_accuracy"], block["confidence"], block["llm_accuracy"]) == (
        0.7,
        0.9,
        None,
    )
    assert block["sources"] == {"llm": 96, "person": 24, "training_file": 0}
    assert block["period"] == {"from": "2027-01-15T08:00:00Z", "to": "2027-01-15T09:59:00Z"}
    assert block["held_out"] == {
        "examples": 30,
        "from": "2027-01-15T10:00:00Z",
        "to": "2027-01-15T10:29:00Z",
    }
    assert block["held_out_kind"] == "newest labels"
    candidate, current = block["candidate"], block["current"]
    assert (
        candidate["model_version"] == card["model_version"] == read_manifest(output).model_version
    )
    assert current["model_version"] == read_manifest(tiny_model).model_version
    for figures in (candidate, current):
        assert figures.keys() == {"model_version", "accuracy", "ci_low", "ci_high", "llm_share"}
        assert figures["ci_low"] <= figures["accuracy"] <= figures["ci_high"]
        assert 0.0 <= figures["llm_share"] <= 1.0
    assert card["gate"] == {"passed": report.gate.passed, "reasons": report.gate.reasons}
    assert gate(card) == report.gate
    assert load_policy(output / POLICY_FILE) == report.policy
    assert report.policy.version.startswith("0+cal.")


def test_a_candidate_that_learned_passes_the_gate(learned):
    """Trained on right labels, the candidate beats the untrained base and needs less LLM."""
    _, report = learned
    assert report.candidate.accuracy > report.current.accuracy
    assert report.candidate.llm_share < report.current.llm_share
    assert report.gate.passed, report.gate.reasons
    assert report.policy.escalation == report.candidate.calibration.escalation


def test_llm_accuracy_calibrates_over_all_messages(learned, tiny_model):
    """With the LLM's accuracy both models are calibrated over all messages; the card says so.

    The LLM right more often than the target leaves room for accepted errors, so neither model
    needs more of the LLM than under the accepted-answers guarantee, and the untrained base,
    which certifies nothing for accepted answers, becomes feasible.
    """
    output, report = learned
    older, held_out = split_newest(collected(150), 0.2)
    over_all = options(llm_accuracy=0.95)
    candidate = score_held_out(output, held_out, spec(), over_all)
    current = score_held_out(tiny_model, held_out, spec(), over_all)
    for score in (candidate, current):
        assert score.calibration.llm_accuracy == 0.95
        assert score.calibration.over_all_messages
        assert score.calibration.feasible
        assert score.llm_share == score.calibration.llm_share
    assert report.candidate.calibration.llm_accuracy is None
    assert not report.current.calibration.feasible
    assert candidate.llm_share <= report.candidate.llm_share
    assert current.llm_share <= report.current.llm_share == 1.0
    block = distillation_block(
        spec(), over_all, older, held_out, 0, (candidate, current), held_out_kind="newest labels"
    )
    assert block["llm_accuracy"] == 0.95
    assert block["candidate"]["llm_share"] == candidate.llm_share


def test_gate_refuses_a_candidate_trained_on_flipped_labels(learned, tmp_path):
    """Trained on wrong labels, the candidate loses accuracy on the held-out ones: refused."""
    base, _ = learned
    labels = collected(150, flip_before=120)  # the 30 newest, held out, stay right
    report = distill(base, labels, tmp_path / "worse", spec=spec(), options=options())
    assert report.candidate.ci_high < report.current.accuracy
    assert not report.gate.passed
    assert any("less accurate" in reason for reason in report.gate.reasons)


def test_too_few_labels_are_refused(tiny_model, tmp_path):
    """Under MIN_LABELS usable labels nothing is trained, and the error says how many."""
    with pytest.raises(NotEnoughLabelsError) as caught:
        distill(
            tiny_model, collected(MIN_LABELS - 1), tmp_path / "c", spec=spec(), options=options()
        )
    assert (caught.value.have, caught.value.need) == (MIN_LABELS - 1, MIN_LABELS)
    assert not (tmp_path / "c").exists()


def test_labels_outside_the_policy_do_not_count(tiny_model, tmp_path):
    """A label the policy no longer has is left out, and may leave too few to distill."""
    labels = collected(MIN_LABELS)
    labels[0] = example("note about a retired label", ["legacy"], "llm:openai/x", START - 60)
    with pytest.raises(NotEnoughLabelsError) as caught:
        distill(tiny_model, labels, tmp_path / "c", spec=spec(), options=options())
    assert caught.value.have == MIN_LABELS - 1


def test_training_file_examples_are_counted_and_the_audit_sample_judges(tiny_model, tmp_path):
    """The training file trains along and the audit sample is held out; the card says both."""
    extra = [
        LabelledExample(text=f"message about {w}", labels=(k,), line=i + 1)
        for i, (k, w) in enumerate(WORDS.items())
    ]
    steps: list[str] = []
    report = distill(
        tiny_model,
        audited(collected(60), 5),  # 12 audit labels, the second to the 57th
        tmp_path / "c",
        spec=spec(),
        options=options(epochs=1, min_audit=12),
        extra_training=extra,
        progress=steps.append,
    )
    block = report.card["distillation"]
    assert block["sources"] == {"llm": 36, "person": 12, "training_file": 3}
    assert block["held_out_kind"] == "audit sample"
    assert block["held_out"] == {
        "examples": 12,
        "from": "2027-01-15T08:01:00Z",
        "to": "2027-01-15T08:56:00Z",
    }
    assert any("12 held out (audit sample)" in step for step in steps)


def test_accuracy_interval_is_exact():
    """The two-sided Clopper-Pearson interval: all right of 10 at 90% tops out at 1."""
    low, high = accuracy_interval(10, 10, 0.9)
    assert high == 1.0
    assert low == pytest.approx(0.05 ** (1 / 10), abs=1e-9)
    low, high = accuracy_interval(5, 10, 0.9)
    assert low < 0.5 < high
    assert low == pytest.approx(1 - high, abs=1e-9)


def test_continuous_mode_distills_after_every_n_new_labels():
    """A round runs each time `every` more labels arrived (and never under MIN_LABELS)."""
    counts = iter([10, 60, 70, 85, 100, 130, 140])
    seen: list[int] = []
    sleeps: list[float] = []

    def one_round(labels: int) -> Round:
        seen.append(labels)
        return Round(labels=labels, report=None, promoted=False)

    rounds = run_continuously(
        30,
        count=lambda: next(counts),
        distill_round=one_round,
        rounds=3,
        poll_seconds=5.0,
        sleep=sleeps.append,
    )
    assert seen == [60, 100, 130]
    assert [r.labels for r in rounds] == seen
    assert sleeps == [5.0, 5.0, 5.0]


def test_a_multi_label_model_distills_with_flagless_examples(make_tiny_model, tmp_path):
    """A multi-label head distills too, an example with no flag included; its policy is banded."""
    flags = ("abuse", "spam")
    kinds = [("insults", ["abuse"]), ("links", ["spam"]), ("insults and links", list(flags))]
    kinds.append(("a kind word", []))
    training = [
        LabelledExample(text=f"post {i} with {words}", labels=tuple(given), line=i + 1)
        for i, (words, given) in enumerate(kinds * 6)
    ]
    model = make_tiny_model(
        "tiny-flags-distill", flags, training, multi_label=True, save_checkpoint=True
    )
    labels = [
        example(f"comment {i} with {words}", given, "llm:openai/x", START + 60 * i)
        for i, (words, given) in enumerate(kinds * 15)
    ]
    policy = PolicySpec.for_labels(flags, multi_label=True, name="tickets")
    report = distill(model, labels, tmp_path / "c", spec=policy, options=options(epochs=1))
    assert report.card["distillation"]["sources"]["llm"] == 48
    assert report.card["distillation"]["held_out"]["examples"] == 12
    assert load_policy(tmp_path / "c" / POLICY_FILE) == report.policy
    assert report.policy.multi_label
