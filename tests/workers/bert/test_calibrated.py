"""Thresholds that travel with a model version (a distilled candidate's policy.yaml)."""

from __future__ import annotations

from pathlib import Path

from tiergate.policies.spec import Escalation, LabelSpec, PolicySpec
from tiergate.workers.bert.calibrated import POLICY_FILE, ModelThresholds, base_version
from tiergate.workers.cascade import Cascade, PolicyBook
from tiergate.workers.schemas import LLMSkip, Message, Tier
from tiergate.workers.testing import FixedScoreClassifier

LABELS = ("negative", "positive")
FAIRLY_SURE = (0.85, 0.15)


def films(version: str = "3", min_probability: float = 0.8) -> PolicySpec:
    """The films policy at ``version``, escalating below ``min_probability``."""
    return PolicySpec(
        name="films",
        version=version,
        labels=[LabelSpec(name=n) for n in LABELS],
        escalation=Escalation(min_probability=min_probability),
    )


def carry(store: Path, model_version: str, spec: PolicySpec) -> None:
    """Write ``spec`` as the thresholds ``model_version`` brings."""
    (store / model_version).mkdir(parents=True, exist_ok=True)
    (store / model_version / POLICY_FILE).write_text(spec.to_yaml(), encoding="utf-8")


def test_a_version_brings_its_calibrated_escalation_for_its_policy(tmp_path):
    """The served spec takes the version's escalation and calibrated version, keeps the rest."""
    carry(tmp_path, "m2", films("3+cal.0123abcd", min_probability=0.9))
    configured = films("3").model_copy(update={"description": "kept"})
    served = ModelThresholds(tmp_path).spec(configured, "m2")
    assert served.escalation.min_probability == 0.9
    assert served.version == "3+cal.0123abcd"
    assert served.description == "kept"


def test_configured_thresholds_apply_without_a_matching_carried_policy(tmp_path):
    """Another version, another policy, another policy version or no store: as configured."""
    carry(tmp_path, "m2", films("2+cal.0123abcd", min_probability=0.9))
    carry(tmp_path, "m3", films("3+cal.0123abcd").model_copy(update={"name": "books"}))
    configured = films("3")
    thresholds = ModelThresholds(tmp_path)
    assert thresholds.spec(configured, "m1") == configured  # brings nothing
    assert thresholds.spec(configured, "m2") == configured  # calibrated for version 2
    assert thresholds.spec(configured, "m3") == configured  # for another policy
    assert ModelThresholds(None).spec(configured, "m2") == configured
    assert base_version("3+cal.0123abcd") == "3"


def test_the_cascade_serves_each_model_with_its_own_thresholds(tmp_path):
    """Version m1 answers a 0.85 message itself; m2, calibrated at 0.9, sends it to the LLM."""
    carry(tmp_path, "m2", films("3+cal.0123abcd", min_probability=0.9))
    message = Message(id="a", text="a fair film", policy="films")

    def decide(model_version: str):
        scorer = FixedScoreClassifier(LABELS, default=FAIRLY_SURE, model_version=model_version)
        cascade = Cascade(scorer, PolicyBook([films()]), thresholds=ModelThresholds(tmp_path))
        return cascade.decide([message])[0]

    before, after = decide("m1"), decide("m2")
    assert (before.tier, before.llm_skipped, before.policy_version) == (Tier.BERT, None, "3")
    assert after.llm_skipped is LLMSkip.NO_PROVIDER  # routed to the LLM (none configured here)
    assert after.policy_version == "3+cal.0123abcd"
