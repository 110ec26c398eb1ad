"""Policy files: the shipped examples load, and bad files are rejected with a named field."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

from tiergate.policies.spec import (
    DEFAULT_PROVIDERS,
    EXAMPLES,
    PolicyError,
    PolicySpec,
    ProviderRef,
    Task,
    WhenExhausted,
    example_policy,
    load_policy,
    parse_policy,
    parse_policy_text,
)

MINIMAL = {"name": "p", "version": "1", "labels": [{"name": "a"}, {"name": "b"}]}


@pytest.mark.parametrize("name", EXAMPLES)
def test_every_example_policy_loads_and_round_trips_through_yaml(name):
    """Each shipped policy validates, and its YAML dump reads back to an equal spec."""
    spec = example_policy(name)
    assert spec.name == name
    assert parse_policy_text(spec.to_yaml()) == spec


def test_examples_cover_single_label_multi_label_generation_and_both_fallbacks():
    """The examples show a single-label, a multi-label and a generating policy, both fallbacks."""
    tickets, moderation = example_policy("ticket-routing"), example_policy("moderation")
    assert not tickets.multi_label
    assert moderation.multi_label
    assert "refund_request" in tickets.generation.labels
    assert tickets.budget.when_exhausted is WhenExhausted.DEFER
    assert moderation.budget.when_exhausted is WhenExhausted.BERT
    assert "sexual/minors" in moderation.label_names


def test_default_model_policy_matches_the_default_model_labels():
    """The rotten-tomatoes policy names exactly the default model's labels."""
    from tiergate.workers.bert.default_model import LABELS

    assert set(example_policy("rotten-tomatoes").label_names) == set(LABELS)


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"labels": []}, "labels"),
        ({"labels": [{"name": "a"}, {"name": "a"}]}, "listed twice"),
        ({"escalation": {"min_probability": 1.5}}, "escalation.min_probability"),
        ({"escalation": {"per_label": {"zzz": {"min_probability": 0.5}}}}, "zzz"),
        ({"escalation": {"band": {"low": 0.8, "high": 0.2}}}, "band"),
        ({"generation": {"labels": ["nope"]}}, "nope"),
        ({"generation": {"tasks": ["classify"]}}, "generation task"),
        ({"budget": {"when_exhausted": "panic"}}, "budget.when_exhausted"),
        ({"budget": {"usd_per_day": -1}}, "budget.usd_per_day"),
        ({"colour": "blue"}, "colour"),
        ({"name": "has space"}, "name"),
        ({"learning": {"collect": True, "audit_share": 1.5}}, "learning.audit_share"),
        ({"learning": {"collect": True, "audit_share": -0.1}}, "learning.audit_share"),
        ({"learning": {"audit_share": 0.2}}, "audit_share"),
    ],
)
def test_invalid_policy_is_rejected_naming_the_problem(change, field):
    """A bad field gives a PolicyError whose message names the field or value."""
    with pytest.raises(PolicyError) as caught:
        parse_policy({**MINIMAL, **change}, source="p.yaml")
    assert field in str(caught.value)
    assert str(caught.value).startswith("p.yaml: ")


def test_audit_share_reads_from_yaml_and_defaults_to_no_audit():
    """learning.audit_share parses from a policy file; a policy that omits it audits nothing."""
    text = yaml.safe_dump({**MINIMAL, "learning": {"collect": True, "audit_share": 0.25}})
    assert parse_policy_text(text).learning.audit_share == 0.25
    assert parse_policy_text(yaml.safe_dump(MINIMAL)).learning.audit_share == 0.0
    collecting = yaml.safe_dump({**MINIMAL, "learning": {"collect": True}})
    assert parse_policy_text(collecting).learning.audit_share == 0.0


def test_an_audit_sample_without_collection_is_rejected_saying_why():
    """audit_share above zero with collect off is a PolicyError naming audit_share and collect."""
    with pytest.raises(PolicyError, match="audit_share") as caught:
        parse_policy({**MINIMAL, "learning": {"audit_share": 0.1}}, source="p.yaml")
    assert "collect" in str(caught.value)
    off = parse_policy({**MINIMAL, "learning": {"audit_share": 0.0}}, source="p.yaml")
    assert not off.learning.collect


def test_load_policy_reports_missing_file_bad_yaml_and_non_mapping(tmp_path: Path):
    """File-level problems are PolicyErrors naming the file, never a raw traceback."""
    with pytest.raises(PolicyError, match="no such policy file"):
        load_policy(tmp_path / "missing.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("name: [unclosed\n")
    with pytest.raises(PolicyError, match="not valid YAML at line"):
        load_policy(broken)
    listing = tmp_path / "list.yaml"
    listing.write_text("- a\n- b\n")
    with pytest.raises(PolicyError, match="must be a mapping"):
        load_policy(listing)
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(b"\xff\xfe\x00")
    with pytest.raises(PolicyError, match="not UTF-8"):
        load_policy(binary)


def test_unknown_example_lists_the_known_ones():
    """Asking for an example that does not exist names the ones that do."""
    with pytest.raises(PolicyError, match="ticket-routing"):
        example_policy("nope")


def test_policy_for_model_labels_lets_every_answer_stand():
    """A policy built from a model's labels has no escalation thresholds."""
    spec = PolicySpec.for_labels(("x", "y"), multi_label=False)
    assert spec.label_names == ("x", "y")
    assert spec.escalation.min_probability == 0.0
    assert Task.REPLY in spec.generation.tasks


@pytest.mark.parametrize("name", EXAMPLES)
def test_the_default_provider_chain_is_the_shipped_policies_chain(name):
    """Every shipped policy tries the default chain: OpenAI's small model, then Anthropic's."""
    assert tuple(example_policy(name).llm.providers) == DEFAULT_PROVIDERS
    assert [ref.provider for ref in DEFAULT_PROVIDERS] == ["openai", "anthropic"]


def test_with_providers_replaces_the_chain_in_order_and_keeps_the_rest():
    """A new chain replaces the old one, in the order given; name, version, labels stay."""
    spec = example_policy("rotten-tomatoes")
    chain = [
        ProviderRef(provider="anthropic", model="m1"),
        ProviderRef(provider="openai", model="m2"),
    ]
    changed = spec.with_providers(chain)
    assert changed.llm.providers == chain
    assert changed.llm.instructions == spec.llm.instructions
    assert (changed.name, changed.version, changed.labels) == (spec.name, spec.version, spec.labels)


_yaml_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=12,
)


@given(st.dictionaries(st.sampled_from([*MINIMAL, "escalation", "budget", "llm"]), _yaml_values))
def test_fuzzed_policy_documents_either_validate_or_raise_policy_error(document):
    """Arbitrary YAML-shaped data never escapes the loader as anything but PolicyError."""
    text = yaml.safe_dump(document)
    outcome: PolicySpec | PolicyError
    try:
        outcome = parse_policy_text(text)
    except PolicyError as exc:
        outcome = exc
    assert isinstance(outcome, PolicySpec | PolicyError)
    assert str(outcome) if isinstance(outcome, PolicyError) else outcome.labels
