"""``WorkerRuntime``: what a worker builds, and what it tells processes that load no model."""

from __future__ import annotations

from fastapi.testclient import TestClient

from tiergate.gateway.client import TiergateClient
from tiergate.gateway.http import create_app
from tiergate.workers.served_policies import ServedPolicies
from tiergate.workers.settings import Settings
from tiergate.workers.tasks.runtime import WorkerRuntime


def _settings(redis_prefix, model_dir, **overrides) -> Settings:
    return Settings(
        redis_url="redis://127.0.0.1:6379/0",
        broker_url="memory://",
        cache_prefix=redis_prefix,
        model_dir=model_dir,
        **overrides,
    )


def test_a_worker_announces_the_policies_it_serves(redis_prefix, tiny_model, tmp_path):
    """The client of a gateway that cannot read the model learns the worker's policies."""
    cascade, _ = WorkerRuntime(_settings(redis_prefix, tiny_model)).parts()
    gateway_side = TiergateClient.from_settings(_settings(redis_prefix, tmp_path / "no-model"))
    assert gateway_side.policies() == list(cascade.policies)
    assert [spec.label_names for spec in cascade.policies] == [("account", "billing", "bug")]
    announced = ServedPolicies(gateway_side.ledger.client, redis_prefix).read()
    assert announced is not None
    assert announced.model_version == cascade.classifier.model_version


def test_the_distributed_gateway_lists_the_announced_policies_once_a_worker_said(
    redis_prefix, tiny_model, tmp_path
):
    """Before any worker announced, /v1/policies is 503 naming why; afterwards it lists them."""
    settings = _settings(redis_prefix, tmp_path / "no-model")
    app = create_app(settings, client=TiergateClient.from_settings(settings))
    with TestClient(app) as http:
        early = http.get("/v1/policies")
        assert early.status_code == 503
        assert "announced the policies" in early.json()["detail"]
        assert early.headers["Retry-After"] == "5"
        WorkerRuntime(_settings(redis_prefix, tiny_model)).parts()
        listed = http.get("/v1/policies")
    assert listed.status_code == 200
    [policy] = listed.json()["policies"]
    assert [label["name"] for label in policy["labels"]] == ["account", "billing", "bug"]
