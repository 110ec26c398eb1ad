"""Cascade evaluation: the curve, its reported points, and the simulated LLM."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tiergate.policies.evaluate import (
    bert_answer,
    confidence_of,
    evaluate_cascade,
    simulate_llm,
)
from tiergate.policies.prediction import Prediction
from tiergate.policies.routing import Target, decide
from tiergate.policies.spec import Escalation, Generation, LabelSpec, PolicySpec

LABELS = ("a", "b", "c")


def _spec(*, multi_label: bool = False, **changes) -> PolicySpec:
    spec = PolicySpec(
        name="p",
        version="1",
        multi_label=multi_label,
        labels=[LabelSpec(name=n) for n in LABELS],
    )
    return spec.model_copy(update=changes)


def _single(top: str, probability: float) -> Prediction:
    rest = (1.0 - probability) / (len(LABELS) - 1)
    return Prediction(
        labels=LABELS,
        probabilities=tuple(probability if label == top else rest for label in LABELS),
        multi_label=False,
        chunks=1,
        model_version="test",
    )


def _multi(*probabilities: float) -> Prediction:
    return Prediction(
        labels=LABELS, probabilities=probabilities, multi_label=True, chunks=1, model_version="test"
    )


def synthetic(seed: int, n: int):
    """Calibrated single-label predictions and gold answers."""
    rng = np.random.default_rng(seed)
    predictions, gold = [], []
    for c, right, top in zip(
        rng.uniform(0.34, 1.0, n), rng.random(n), rng.integers(0, 3, n), strict=True
    ):
        label = LABELS[top]
        predictions.append(_single(label, float(c)))
        gold.append(label if right < c else LABELS[(top + 1) % 3])
    return predictions, gold


def accuracy_of(answers, gold) -> float:
    """Share of answers equal to gold; a missing answer (None) is wrong."""
    return sum(a is not None and a == g for a, g in zip(answers, gold, strict=True)) / len(gold)


@st.composite
def labelled_single(draw):
    """Small single-label sets with an LLM answer per message and repeated confidences."""
    size = draw(st.integers(1, 30))
    rows = draw(
        st.lists(
            st.tuples(
                st.sampled_from(LABELS),
                st.sampled_from([0.4, 0.6, 0.8, 0.95]),
                st.sampled_from(LABELS),
                st.sampled_from((*LABELS, None)),
            ),
            min_size=size,
            max_size=size,
        )
    )
    predictions = [_single(top, p) for top, p, _, _ in rows]
    return predictions, [row[2] for row in rows], [row[3] for row in rows]


def test_curve_endpoints_are_bert_only_and_llm_only():
    """Share 0 has BERT's accuracy and no cost; share 1 has the LLM's accuracy and full cost."""
    predictions, gold = synthetic(1, 500)
    llm = simulate_llm(gold, LABELS, 0.9, seed=1)
    evaluation = evaluate_cascade(predictions, gold, llm, 0.002, _spec())
    bert = [bert_answer(p, _spec()) for p in predictions]
    assert evaluation.bert_only == evaluation.curve[0]
    assert evaluation.llm_only == evaluation.curve[-1]
    assert evaluation.bert_only.accuracy == pytest.approx(accuracy_of(bert, gold))
    assert evaluation.bert_only.llm_share == 0.0
    assert evaluation.bert_only.cost_per_1000 == 0.0
    assert evaluation.llm_only.accuracy == pytest.approx(accuracy_of(llm, gold))
    assert evaluation.llm_only.llm_share == 1.0
    assert evaluation.llm_only.cost_per_1000 == pytest.approx(2.0)
    assert len(evaluation.curve) == 101
    assert [p.llm_share for p in evaluation.curve] == pytest.approx([i / 100 for i in range(101)])


@settings(max_examples=60)
@given(labelled_single())
def test_with_a_perfect_llm_accuracy_never_falls_along_the_curve(data):
    """Sending more messages to an always-right LLM never lowers accuracy."""
    predictions, gold, _ = data
    evaluation = evaluate_cascade(predictions, gold, list(gold), 0.01, _spec(), points=11)
    accuracies = [point.accuracy for point in evaluation.curve]
    assert accuracies == sorted(accuracies)
    assert evaluation.llm_only.accuracy == 1.0


def test_cost_is_linear_in_the_share_sent():
    """With one price per call, cost per 1,000 is 1,000 x price x share at every point."""
    predictions, gold = synthetic(2, 300)
    evaluation = evaluate_cascade(predictions, gold, list(gold), 0.004, _spec(), points=31)
    for point in evaluation.curve:
        assert point.cost_per_1000 == pytest.approx(4.0 * point.llm_share)


def test_curve_sends_the_least_confident_first():
    """The curve's threshold rises with the share, and messages below it are the ones sent."""
    predictions, gold = synthetic(3, 200)
    evaluation = evaluate_cascade(predictions, gold, list(gold), 0.001, _spec(), points=21)
    thresholds = [p.threshold for p in evaluation.curve if p.threshold is not None]
    assert thresholds == sorted(thresholds)
    assert evaluation.llm_only.threshold is None
    for point in evaluation.curve[:-1]:
        below = sum(confidence_of(p, _spec()) < point.threshold for p in predictions)
        assert below == round(point.llm_share * 200)  # the synthetic confidences never tie


@pytest.mark.parametrize("multi_label", [False, True])
def test_operating_point_agrees_with_counting_decide_routes(multi_label):
    """The operating point's share, cost and accuracy are those of routing each message."""
    rng = np.random.default_rng(4)
    if multi_label:
        spec = _spec(
            multi_label=True,
            escalation=Escalation.model_validate({"band": {"low": 0.35, "high": 0.65}}),
            generation=Generation(labels=["c"]),
        )
        predictions = [_multi(*map(float, rng.uniform(0, 1, 3))) for _ in range(300)]
        gold = [frozenset(x for x in LABELS if rng.random() < 0.4) for _ in range(300)]
    else:
        spec = _spec(
            escalation=Escalation(min_probability=0.7, min_margin=0.3),
            generation=Generation(labels=["c"]),
        )
        predictions, gold = synthetic(4, 300)
    llm = simulate_llm(gold, LABELS, 0.85, seed=4)
    costs = [float(c) for c in rng.uniform(0.001, 0.003, 300)]
    evaluation = evaluate_cascade(predictions, gold, llm, costs, spec)

    sent = spent = right = 0
    for prediction, answer, llm_answer, cost in zip(predictions, gold, llm, costs, strict=True):
        route = decide(prediction, spec)
        final = bert_answer(prediction, spec)
        if route.target is Target.LLM:
            sent += 1
            spent += cost
            final = llm_answer
            if route.labels:  # only borderline labels were put to the LLM
                kept = {x for x in prediction.labels_above(0.5) if x not in route.labels}
                final = frozenset(kept | (set(llm_answer) & set(route.labels)))
        right += final == answer
    point = evaluation.operating_point
    assert point.llm_share == pytest.approx(sent / 300)
    assert point.accuracy == pytest.approx(right / 300)
    assert point.cost_per_1000 == pytest.approx(1000 * spent / 300)
    assert sum(evaluation.operating_routes.values()) == 300
    assert 0 < sent < 300


def brute_force_matched_share(predictions, gold, llm, spec) -> float:
    """The smallest k whose cascade is within one point of LLM only, by trying every k."""
    n = len(predictions)
    order = sorted(range(n), key=lambda i: confidence_of(predictions[i], spec))
    llm_right = sum(a == g for a, g in zip(llm, gold, strict=True))
    for k in range(n + 1):
        sent = set(order[:k])
        answers = [llm[i] if i in sent else bert_answer(predictions[i], spec) for i in range(n)]
        right = sum(a is not None and a == g for a, g in zip(answers, gold, strict=True))
        if 100 * right >= 100 * llm_right - n:
            return k / n
    raise AssertionError("k = n always matches")


@settings(max_examples=80)
@given(labelled_single(), st.integers(2, 7))
def test_matched_share_is_the_smallest_over_every_k(data, points):
    """The matched-accuracy share is the minimal k / n, found over every k, not sampled ones."""
    predictions, gold, llm = data
    evaluation = evaluate_cascade(predictions, gold, llm, 0.01, _spec(), points=points)
    expected = brute_force_matched_share(predictions, gold, llm, _spec())
    assert evaluation.matched_accuracy_llm_share == pytest.approx(expected)
    llm_cost = evaluation.llm_only.cost_per_1000
    assert evaluation.cost_saving_vs_llm_only == pytest.approx(
        1 - evaluation.matched_point.cost_per_1000 / llm_cost
    )
    assert evaluation.matched_point.accuracy >= evaluation.llm_only.accuracy - 0.01 - 1e-12


def test_missing_llm_answers_count_as_wrong_and_are_reported():
    """A message with no LLM answer is wrong wherever the LLM answers it, and is counted."""
    predictions = [_single("a", 0.9), _single("b", 0.5)]
    evaluation = evaluate_cascade(predictions, ["a", "b"], [None, "b"], [0.01, 0.01], _spec())
    assert evaluation.missing_llm_answers == 1
    assert evaluation.llm_only.accuracy == 0.5
    assert evaluation.bert_only.accuracy == 1.0
    assert evaluation.matched_accuracy_llm_share == 0.0
    assert evaluation.cost_saving_vs_llm_only == 1.0


def test_free_llm_has_no_cost_saving_and_evaluation_serialises():
    """With a free LLM the saving is undefined (None); to_dict survives a JSON round trip."""
    predictions, gold = synthetic(5, 50)
    evaluation = evaluate_cascade(predictions, gold, list(gold), 0.0, _spec(), points=5)
    assert evaluation.cost_saving_vs_llm_only is None
    data = json.loads(json.dumps(evaluation.to_dict()))
    assert data["n"] == 50
    assert len(data["curve"]) == 5
    assert data["matched_accuracy_llm_share"] == evaluation.matched_accuracy_llm_share
    assert set(data["operating_point"]) == {"llm_share", "accuracy", "cost_per_1000", "threshold"}


def test_an_evaluation_without_a_price_reports_every_cost_as_unknown():
    """With no price per call the evaluation is unpriced: every cost serialises as None."""
    predictions, gold = synthetic(6, 50)
    priced = evaluate_cascade(predictions, gold, list(gold), 0.002, _spec(), points=5)
    unpriced = evaluate_cascade(predictions, gold, list(gold), None, _spec(), points=5)
    assert (priced.priced, unpriced.priced) == (True, False)
    assert priced.to_dict()["llm_only"]["cost_per_1000"] == pytest.approx(2.0)
    data = json.loads(json.dumps(unpriced.to_dict()))
    assert data["priced"] is False
    points = [data[key] for key in ("bert_only", "llm_only", "operating_point", "matched_point")]
    assert {point["cost_per_1000"] for point in points + data["curve"]} == {None}
    assert data["cost_saving_vs_llm_only"] is None
    assert data["llm_only"]["accuracy"] == priced.llm_only.accuracy


def test_per_class_figures_for_bert_only_and_the_operating_point():
    """Each label's precision, recall and support, for BERT's answers and the policy's, by hand.

    BERT never answers c; the policy sends the two unsure messages to the LLM, which gets one
    c right and has no answer for the other (it then predicts no label).
    """
    predictions = [
        _single("a", 0.9),
        _single("a", 0.9),
        _single("b", 0.9),
        _single("a", 0.5),  # gold c: the LLM answers c
        _single("b", 0.5),  # gold c: no LLM answer
    ]
    gold = ["a", "b", "b", "c", "c"]
    spec = _spec(escalation=Escalation(min_probability=0.7))
    evaluation = evaluate_cascade(predictions, gold, ["a", "a", "a", "c", None], 0.01, spec)
    bert, policy = evaluation.per_class_bert_only, evaluation.per_class_operating_point
    # BERT: a predicted 3 times (1 right), b twice (1 right), c never
    assert (bert["a"].precision, bert["a"].recall, bert["a"].predicted) == (1 / 3, 1.0, 3)
    assert (bert["b"].precision, bert["b"].recall, bert["b"].support) == (0.5, 0.5, 2)
    assert (bert["c"].precision, bert["c"].recall, bert["c"].f1) == (None, 0.0, 0.0)
    # policy: a twice (1 right), b once (right), c once (right); the missing answer counts for none
    assert (policy["a"].precision, policy["a"].recall) == (0.5, 1.0)
    assert (policy["b"].precision, policy["b"].recall) == (1.0, 0.5)
    assert (policy["c"].precision, policy["c"].recall, policy["c"].support) == (1.0, 0.5, 2)
    document = json.loads(json.dumps(evaluation.to_dict()))
    assert document["per_class"]["bert_only"]["c"] == {
        "precision": None,
        "recall": 0.0,
        "f1": 0.0,
        "support": 2,
        "predicted": 0,
    }
    assert document["per_class"]["operating_point"]["c"]["recall"] == 0.5


def test_per_class_figures_of_a_multi_label_policy_count_each_flag():
    """Multi-label per-label figures count every flagged label of BERT's answer sets."""
    predictions = [_multi(0.9, 0.1, 0.1), _multi(0.9, 0.9, 0.1), _multi(0.1, 0.1, 0.1)]
    gold = [frozenset({"a"}), frozenset({"a"}), frozenset({"b", "c"})]
    evaluation = evaluate_cascade(predictions, gold, gold, 0.0, _spec(multi_label=True))
    bert = evaluation.per_class_bert_only
    assert (bert["a"].precision, bert["a"].recall, bert["a"].support) == (1.0, 1.0, 2)
    assert (bert["b"].precision, bert["b"].recall, bert["b"].predicted) == (0.0, 0.0, 1)
    assert (bert["c"].support, bert["c"].predicted, bert["c"].recall) == (1, 0, 0.0)


def test_mismatched_inputs_are_rejected():
    """LLM answers or costs of the wrong length, negative costs and one point are errors."""
    predictions, gold = synthetic(6, 4)
    with pytest.raises(ValueError, match="LLM answers"):
        evaluate_cascade(predictions, gold, gold[:3], 0.01, _spec())
    with pytest.raises(ValueError, match="LLM costs"):
        evaluate_cascade(predictions, gold, gold, [0.01] * 3, _spec())
    with pytest.raises(ValueError, match="non-negative"):
        evaluate_cascade(predictions, gold, gold, -1.0, _spec())
    with pytest.raises(ValueError, match="2 points"):
        evaluate_cascade(predictions, gold, gold, 0.01, _spec(), points=1)


# --- the simulated LLM --------------------------------------------------------------------------


@pytest.mark.parametrize("accuracy", [0.0, 0.6, 0.9, 1.0])
def test_simulated_llm_hits_its_accuracy_and_is_wrong_with_other_labels(accuracy):
    """A simulated LLM is right at its accuracy (within sampling error) and wrong otherwise."""
    gold = [LABELS[i % 3] for i in range(4000)]
    answers = simulate_llm(gold, LABELS, accuracy, seed=9)
    assert accuracy_of(answers, gold) == pytest.approx(accuracy, abs=0.025)
    assert set(answers) <= set(LABELS)


def test_simulated_llm_is_deterministic_for_a_seed():
    """The same seed gives the same answers; another seed gives different ones."""
    gold = [LABELS[i % 3] for i in range(200)]
    assert simulate_llm(gold, LABELS, 0.7, seed=1) == simulate_llm(gold, LABELS, 0.7, seed=1)
    assert simulate_llm(gold, LABELS, 0.7, seed=1) != simulate_llm(gold, LABELS, 0.7, seed=2)


def test_simulated_multi_label_llm_answers_sets():
    """For label sets the answer is the exact gold set at the accuracy, else a different set."""
    rng = np.random.default_rng(0)
    gold = [frozenset(x for x in LABELS if rng.random() < 0.5) for _ in range(3000)]
    answers = simulate_llm(gold, LABELS, 0.8, seed=3)
    assert all(isinstance(a, frozenset) and a <= set(LABELS) for a in answers)
    assert accuracy_of(answers, gold) == pytest.approx(0.8, abs=0.025)
    with pytest.raises(ValueError, match="two labels"):
        simulate_llm(["a"], ["a"], 0.5, seed=0)
