"""``decide``: routes and reasons, and the properties every policy must keep."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tiergate.policies.prediction import Prediction
from tiergate.policies.routing import BudgetState, Reason, Target, decide, in_audit_sample
from tiergate.policies.spec import (
    Band,
    BudgetSpec,
    Escalation,
    Generation,
    LabelSpec,
    LabelThresholds,
    PolicySpec,
    Task,
    WhenExhausted,
)

LABELS = ("a", "b", "c")


def _spec(**changes) -> PolicySpec:
    base = PolicySpec(name="p", version="1", labels=[LabelSpec(name=n) for n in LABELS])
    return base.model_copy(update=changes)


def _single(*probabilities: float) -> Prediction:
    return Prediction(
        labels=LABELS, probabilities=probabilities, multi_label=False, chunks=1, model_version="m"
    )


def _multi(*probabilities: float) -> Prediction:
    return Prediction(
        labels=LABELS, probabilities=probabilities, multi_label=True, chunks=1, model_version="m"
    )


SPENT = BudgetState(calls_left=0)


def test_confident_answer_stands():
    """A top-1 probability above the threshold keeps the BERT answer."""
    route = decide(_single(0.9, 0.05, 0.05), _spec(escalation=Escalation(min_probability=0.8)))
    assert route.target is Target.BERT
    assert route.reason is Reason.CONFIDENT
    assert not route.wants_llm


def test_low_probability_and_low_margin_escalate_with_their_reasons():
    """Below min_probability is low_confidence; a close runner-up is low_margin."""
    rules = Escalation(min_probability=0.6, min_margin=0.3)
    low = decide(_single(0.5, 0.3, 0.2), _spec(escalation=rules))
    close = decide(_single(0.62, 0.38, 0.0), _spec(escalation=rules))
    assert (low.target, low.reason) == (Target.LLM, Reason.LOW_CONFIDENCE)
    assert (close.target, close.reason) == (Target.LLM, Reason.LOW_MARGIN)


def test_per_label_override_applies_to_the_top_label_only():
    """A stricter threshold on label b escalates b answers but not a answers."""
    rules = Escalation(min_probability=0.5, per_label={"b": LabelThresholds(min_probability=0.95)})
    assert decide(_single(0.9, 0.05, 0.05), _spec(escalation=rules)).target is Target.BERT
    assert decide(_single(0.05, 0.9, 0.05), _spec(escalation=rules)).target is Target.LLM


def test_generation_label_and_task_go_to_the_llm_even_when_confident():
    """A label needing a generated answer, or a reply task, escalates a confident answer."""
    spec = _spec(generation=Generation(labels=["c"]))
    assert decide(_single(0.0, 0.0, 1.0), spec).reason is Reason.LABEL_NEEDS_GENERATION
    route = decide(_single(1.0, 0.0, 0.0), spec, task=Task.REPLY)
    assert (route.target, route.reason) == (Target.LLM, Reason.TASK_NEEDS_GENERATION)


def test_task_that_the_policy_does_not_list_is_not_generation():
    """A policy that lists no generation tasks classifies a reply request like any other."""
    spec = _spec(generation=Generation(tasks=[]))
    assert decide(_single(1.0, 0.0, 0.0), spec, task=Task.REPLY).target is Target.BERT


def test_spent_budget_falls_back_to_flagged_bert_or_deferral():
    """With the budget spent, the route is the BERT answer or deferral, as the policy says."""
    rules = Escalation(min_probability=0.9)
    flagged = decide(_single(0.5, 0.3, 0.2), _spec(escalation=rules), SPENT)
    assert (flagged.target, flagged.budget_exhausted) == (Target.BERT, True)
    assert flagged.reason is Reason.LOW_CONFIDENCE
    deferring = _spec(escalation=rules, budget=BudgetSpec(when_exhausted=WhenExhausted.DEFER))
    assert decide(_single(0.5, 0.3, 0.2), deferring, SPENT).target is Target.DEFER
    assert decide(_single(0.95, 0.05, 0.0), deferring, SPENT).target is Target.BERT


def test_money_or_calls_either_exhausts_the_budget():
    """Either limit being spent counts; unset limits never do."""
    assert BudgetState(usd_left=0.0).exhausted
    assert BudgetState(calls_left=0, usd_left=5.0).exhausted
    assert not BudgetState(calls_left=3, usd_left=None).exhausted
    assert not BudgetState().exhausted


def test_multi_label_escalates_only_the_borderline_labels():
    """Scores inside the band escalate, and only those labels are put to the LLM."""
    spec = _spec(multi_label=True, escalation=Escalation(band=Band(low=0.3, high=0.7)))
    route = decide(_multi(0.95, 0.5, 0.01), spec)
    assert (route.target, route.reason, route.labels) == (
        Target.LLM,
        Reason.UNCERTAIN_LABELS,
        ("b",),
    )
    assert decide(_multi(0.95, 0.1, 0.01), spec).target is Target.BERT


def test_multi_label_per_label_band_widens_one_category():
    """A wider band on one label escalates a score the default band lets stand."""
    rules = Escalation(
        band=Band(low=0.4, high=0.6),
        per_label={"c": LabelThresholds(band=Band(low=0.05, high=0.9))},
    )
    spec = _spec(multi_label=True, escalation=rules)
    assert decide(_multi(0.0, 0.0, 0.1), spec).labels == ("c",)
    assert decide(_multi(0.1, 0.0, 0.0), spec).target is Target.BERT


def test_multi_label_flagged_generation_label_escalates():
    """A flagged multi-label category that needs generated text goes to the LLM."""
    spec = _spec(multi_label=True, generation=Generation(labels=["a"]))
    assert decide(_multi(0.9, 0.0, 0.0), spec).reason is Reason.LABEL_NEEDS_GENERATION
    assert decide(_multi(0.1, 0.0, 0.0), spec).target is Target.BERT


probability = st.floats(min_value=0.0, max_value=1.0, allow_nan=False)


@st.composite
def single_predictions(draw: st.DrawFn) -> Prediction:
    """Single-label predictions whose probabilities sum to one."""
    weights = draw(st.lists(st.floats(0.001, 1.0), min_size=3, max_size=3))
    total = sum(weights)
    return _single(*(w / total for w in weights))


@given(
    st.lists(single_predictions(), min_size=1, max_size=30),
    probability,
    probability,
    probability,
)
def test_raising_a_threshold_never_lowers_the_number_of_escalations(
    predictions, lower, higher, margin
):
    """For any batch, a stricter min_probability escalates a superset of the messages."""
    lower, higher = sorted((lower, higher))

    def escalated(threshold: float) -> set[int]:
        spec = _spec(escalation=Escalation(min_probability=threshold, min_margin=margin))
        return {i for i, p in enumerate(predictions) if decide(p, spec).target is Target.LLM}

    assert escalated(lower) <= escalated(higher)


@given(
    st.lists(st.tuples(probability, probability, probability), min_size=1, max_size=20),
    st.floats(0.0, 0.5),
    st.floats(0.0, 0.5),
)
def test_widening_a_band_never_lowers_the_number_of_escalations(scores, narrow, extra):
    """A multi-label band that contains another escalates a superset of the messages."""
    inner = Band(low=max(0.0, 0.5 - narrow), high=min(1.0, 0.5 + narrow))
    outer = Band(low=max(0.0, inner.low - extra), high=min(1.0, inner.high + extra))

    def escalated(band: Band) -> set[int]:
        spec = _spec(multi_label=True, escalation=Escalation(band=band))
        return {i for i, s in enumerate(scores) if decide(_multi(*s), spec).wants_llm}

    assert escalated(inner) <= escalated(outer)


@given(
    single_predictions(),
    st.sampled_from([Task.REPLY, Task.SUMMARY, Task.EXPLAIN]),
    st.sampled_from(list(WhenExhausted)),
    st.booleans(),
    probability,
)
def test_generation_task_goes_to_the_llm_unless_the_budget_is_spent(
    prediction, task, fallback, spent, threshold
):
    """A generation task always routes to the LLM; with the budget spent, the fallback applies."""
    spec = _spec(
        escalation=Escalation(min_probability=threshold),
        budget=BudgetSpec(when_exhausted=fallback),
    )
    route = decide(prediction, spec, SPENT if spent else BudgetState(calls_left=1), task)
    assert route.reason is Reason.TASK_NEEDS_GENERATION
    if not spent:
        assert route.target is Target.LLM
    else:
        expected = Target.DEFER if fallback is WhenExhausted.DEFER else Target.BERT
        assert (route.target, route.budget_exhausted) == (expected, True)


@given(single_predictions(), probability, probability, st.booleans())
def test_a_spent_budget_never_routes_to_the_llm(prediction, threshold, margin, audited):
    """Whatever the prediction, thresholds or audit draw, a spent budget never yields the LLM."""
    spec = _spec(escalation=Escalation(min_probability=threshold, min_margin=margin))
    route = decide(prediction, spec, SPENT, audited=audited)
    assert route.target is not Target.LLM
    assert route.budget_exhausted == route.wants_llm


@given(single_predictions(), probability, probability)
def test_an_audited_message_always_reaches_the_llm_while_the_budget_lasts(
    prediction, threshold, margin
):
    """Audited, every message goes to the LLM; only a would-be BERT answer is reasoned audit."""
    spec = _spec(escalation=Escalation(min_probability=threshold, min_margin=margin))
    plain = decide(prediction, spec)
    audited = decide(prediction, spec, audited=True)
    assert audited.target is Target.LLM
    expected = Reason.AUDIT if plain.reason is Reason.CONFIDENT else plain.reason
    assert audited.reason is expected


@pytest.mark.parametrize("fallback", list(WhenExhausted))
def test_confident_answers_ignore_the_budget(fallback):
    """A message that does not need the LLM is answered the same whatever the budget."""
    spec = _spec(budget=BudgetSpec(when_exhausted=fallback))
    assert decide(_single(0.9, 0.1, 0.0), spec, SPENT) == decide(_single(0.9, 0.1, 0.0), spec)


def test_an_audited_confident_answer_goes_to_the_llm_for_audit():
    """A single- or multi-label answer that would stand is sent to the LLM when audited."""
    single = decide(
        _single(0.9, 0.05, 0.05), _spec(escalation=Escalation(min_probability=0.8)), audited=True
    )
    assert (single.target, single.reason, single.budget_exhausted) == (
        Target.LLM,
        Reason.AUDIT,
        False,
    )
    assert single.wants_llm
    spec = _spec(multi_label=True, escalation=Escalation(band=Band(low=0.3, high=0.7)))
    multi = decide(_multi(0.95, 0.1, 0.01), spec, audited=True)
    assert (multi.target, multi.reason, multi.labels) == (Target.LLM, Reason.AUDIT, ())


def test_an_audited_message_that_escalates_anyway_keeps_its_own_reason():
    """Audit never hides why a message needed the LLM: low confidence stays low_confidence."""
    spec = _spec(escalation=Escalation(min_probability=0.8))
    audited = decide(_single(0.5, 0.3, 0.2), spec, audited=True)
    assert (audited.target, audited.reason) == (Target.LLM, Reason.LOW_CONFIDENCE)
    assert audited == decide(_single(0.5, 0.3, 0.2), spec)


@pytest.mark.parametrize("fallback", list(WhenExhausted))
def test_an_audited_confident_answer_stands_unflagged_when_the_budget_is_spent(fallback):
    """With the budget spent, the audit is dropped: the BERT answer stands, not flagged."""
    spec = _spec(
        escalation=Escalation(min_probability=0.8), budget=BudgetSpec(when_exhausted=fallback)
    )
    route = decide(_single(0.9, 0.05, 0.05), spec, SPENT, audited=True)
    assert (route.target, route.reason, route.budget_exhausted) == (
        Target.BERT,
        Reason.CONFIDENT,
        False,
    )


def test_an_unaudited_confident_answer_stands():
    """audited=False routes exactly as the default does."""
    spec = _spec(escalation=Escalation(min_probability=0.8))
    route = decide(_single(0.9, 0.05, 0.05), spec, audited=False)
    assert route == decide(_single(0.9, 0.05, 0.05), spec)
    assert (route.target, route.reason) == (Target.BERT, Reason.CONFIDENT)


def test_the_audit_sample_is_a_fixed_draw_per_key():
    """The same key is always in or always out; share 0 takes none, share 1 takes all."""
    keys = [f"key-{i}" for i in range(500)]
    first = [in_audit_sample(k, 0.5) for k in keys]
    assert first == [in_audit_sample(k, 0.5) for k in keys]
    assert 0 < sum(first) < len(keys)
    assert not any(in_audit_sample(k, 0.0) for k in keys)
    assert all(in_audit_sample(k, 1.0) for k in keys)


@pytest.mark.parametrize("share", [0.05, 0.3])
def test_the_audit_sample_takes_its_share_of_distinct_keys(share):
    """Over 20,000 distinct keys the share drawn is within three standard errors of ``share``."""
    n = 20_000
    drawn = sum(in_audit_sample(f"policy:v1:{i:06d}", share) for i in range(n))
    standard_error = (share * (1 - share) / n) ** 0.5
    assert abs(drawn / n - share) < 3 * standard_error


def test_a_smaller_audit_sample_lies_inside_a_larger_one():
    """Raising the share only adds keys: every key in the 0.05 sample is in the 0.3 sample."""
    keys = [f"nested-{i}" for i in range(5_000)]
    small = {k for k in keys if in_audit_sample(k, 0.05)}
    large = {k for k in keys if in_audit_sample(k, 0.3)}
    assert small
    assert small <= large
    assert len(large) > len(small)
