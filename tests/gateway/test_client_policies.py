"""``TiergateClient.policies``: what the workers serve, known without loading the model."""

from __future__ import annotations

import json

import pytest

from tiergate.gateway.client import TiergateClient
from tiergate.policies.spec import example_policy
from tiergate.workers.bert.manifest import MANIFEST_FILE
from tiergate.workers.errors import PoliciesNotAnnouncedError
from tiergate.workers.served_policies import ServedPolicies
from tiergate.workers.settings import Settings


def _client(redis_prefix, model_dir, **overrides) -> TiergateClient:
    settings = Settings(
        redis_url="redis://127.0.0.1:6379/0",
        broker_url="memory://",
        cache_prefix=redis_prefix,
        model_dir=model_dir,
        **overrides,
    )
    return TiergateClient.from_settings(settings)


def _manifest_only(tiny_model, tmp_path, labels):
    """A model directory holding only a manifest with ``labels`` (enough to choose policies)."""
    manifest = json.loads((tiny_model / MANIFEST_FILE).read_text())
    manifest["labels"] = list(labels)
    directory = tmp_path / "model"
    directory.mkdir()
    (directory / MANIFEST_FILE).write_text(json.dumps(manifest))
    return directory


def test_without_announcement_the_policy_that_fits_the_models_labels_is_chosen(
    redis_prefix, tiny_model, tmp_path
):
    """A model with the ticket-routing labels gets the ticket-routing policy, as workers do."""
    tickets = example_policy("ticket-routing")
    model = _manifest_only(tiny_model, tmp_path, tickets.label_names)
    assert [spec.name for spec in _client(redis_prefix, model).policies()] == ["ticket-routing"]


def test_a_model_no_shipped_policy_fits_gets_a_policy_of_its_own_labels(redis_prefix, tiny_model):
    """With labels no shipped policy has, the policy is the model's labels, never the demo's."""
    [spec] = _client(redis_prefix, tiny_model).policies()
    assert spec.label_names == ("account", "billing", "bug")


def test_what_a_worker_announced_wins_over_local_guesses(redis_prefix, tiny_model):
    """The announcement is what the workers serve, whatever this process could read."""
    client = _client(redis_prefix, tiny_model)
    served = [example_policy("moderation"), example_policy("ticket-routing")]
    ServedPolicies(client.ledger.client, redis_prefix).announce(served, "model-v7")
    assert client.policies() == served


def test_with_nothing_to_go_by_the_error_says_what_is_missing(redis_prefix, tmp_path):
    """No announcement, no policy files, no readable model: a transient error that says so."""
    client = _client(redis_prefix, tmp_path / "no-model-here")
    with pytest.raises(PoliciesNotAnnouncedError, match="TIERGATE_POLICY_FILES"):
        client.policies()


def test_an_unreadable_announcement_is_ignored(redis_prefix, tiny_model):
    """An announcement this version cannot read falls back to the local choice."""
    client = _client(redis_prefix, tiny_model)
    client.ledger.client.set(f"{redis_prefix}:served-policies", "{not json")
    assert [spec.label_names for spec in client.policies()] == [("account", "billing", "bug")]
