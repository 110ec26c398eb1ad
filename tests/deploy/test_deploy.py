"""The deployment files under deploy/ cross-checked against the code they deploy.

No Docker engine or cluster runs here, so these are file checks: everything parses, and every
setting, command, route, port, metric and queue the files name is one the code has.
"""

from __future__ import annotations

import json
import re
import shlex
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import typer.core
import typer.exceptions
import typer.main
import yaml

from tiergate.gateway.cli import app as cli_app
from tiergate.gateway.http.metrics import DECISION_STEPS, BudgetReading, GatewayMetrics
from tiergate.gateway.http.routes import router
from tiergate.policies.routing import Reason
from tiergate.workers.ledger import DeadLetterKind
from tiergate.workers.schemas import Decision, LLMSkip, LLMUsage, Tier
from tiergate.workers.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
SETTING_ALIASES = {"OPENAI_API_KEY", "ANTHROPIC_API_KEY"}
SETTING_NAMES = {f"TIERGATE_{name.upper()}" for name in Settings.model_fields} | SETTING_ALIASES
BERT_QUEUE = Settings.model_fields["bert_queue"].default
LLM_QUEUE = Settings.model_fields["llm_queue"].default
# Labels Prometheus adds to every scraped series.
TARGET_LABELS = {"job", "instance"}
URL = re.compile(r"http://[\w.-]+:(\d+)(/[\w/]*)")


# ---------------------------------------------------------------------------------- reading


def _yaml_files() -> list[Path]:
    return sorted(p for p in DEPLOY.rglob("*") if p.suffix in {".yml", ".yaml"})


def _documents(path: Path) -> list[Any]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def _compose() -> dict[str, Any]:
    compose: dict[str, Any] = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    return compose


def _k8s_objects() -> list[tuple[Path, dict[str, Any]]]:
    return [
        (path, doc)
        for path in sorted(K8S.rglob("*.yaml"))
        for doc in _documents(path)
        if isinstance(doc, dict) and "kind" in doc and doc["kind"] != "Kustomization"
    ]


def _base_objects() -> list[dict[str, Any]]:
    return [doc for path, doc in _k8s_objects() if K8S / "base" in path.parents]


def _containers(obj: dict[str, Any]) -> list[dict[str, Any]]:
    spec = obj.get("spec", {}).get("template", {}).get("spec", {})
    containers: list[dict[str, Any]] = spec.get("containers", [])
    return containers


def _deployments() -> dict[str, dict[str, Any]]:
    return {obj["metadata"]["name"]: obj for obj in _base_objects() if obj["kind"] == "Deployment"}


def _kustomizations() -> list[Path]:
    return sorted(K8S.rglob("kustomization.yaml"))


@dataclass(frozen=True)
class DockerInstruction:
    """One Dockerfile instruction, continuation lines joined."""

    stage: str
    keyword: str
    argument: str


def _dockerfile() -> list[DockerInstruction]:
    text = (DEPLOY / "Dockerfile").read_text()
    joined = re.sub(r"\\\n\s*", " ", text)
    instructions = []
    stage = ""
    for raw in joined.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        keyword, _, argument = line.partition(" ")
        if keyword.upper() == "FROM":
            stage = argument.split(" AS ")[-1].strip() if " AS " in argument else ""
        instructions.append(DockerInstruction(stage, keyword.upper(), argument.strip()))
    return instructions


def _exec_form(argument: str) -> list[str]:
    words: list[str] = json.loads(argument)
    return words


def _tiergate_commands() -> Iterator[tuple[str, list[str]]]:
    """Every ``tiergate ...`` command line the deployment runs, with where it is."""
    for item in _dockerfile():
        if item.keyword == "CMD":
            yield f"Dockerfile {item.stage}", _exec_form(item.argument)
    for name, service in _compose()["services"].items():
        command = service.get("command")
        if isinstance(command, list) and command[0] == "tiergate":
            yield f"compose {name}", command
    for path, obj in _k8s_objects():
        for container in _containers(obj):
            if "command" in container:
                yield f"{path.relative_to(ROOT)} {container['name']}", container["command"]


def _parse_cli(argv: list[str]) -> tuple[Any, dict[str, Any]]:
    """The CLI command ``argv`` runs and its parsed options; raises on anything unknown."""
    assert argv[0] == "tiergate", argv
    command: Any = typer.main.get_command(cli_app)
    args = argv[1:]
    while isinstance(command, typer.core.TyperGroup):
        assert args, f"{argv} names a group, not a command"
        sub = command.commands.get(args[0])
        assert sub is not None, f"{args[0]!r} is not a tiergate command: {sorted(command.commands)}"
        command, args = sub, args[1:]
    context = command.make_context(command.name or "", list(args))
    return command, dict(context.params)


def _serve_port() -> int:
    ports = set()
    for _, argv in _tiergate_commands():
        command, params = _parse_cli(argv)
        if command.name == "serve":
            ports.add(params["port"])
    assert len(ports) == 1, ports
    return ports.pop()


def _environment_names() -> Iterator[tuple[str, str]]:
    """Every environment variable name set for a tiergate process, with where it is set."""
    for item in _dockerfile():
        if item.keyword == "ENV":
            for name in re.findall(r"(\w+)=", item.argument):
                yield "Dockerfile", name
    for name, service in _compose()["services"].items():
        if "tiergate" in str(service.get("image", "")):
            for variable in service.get("environment", {}):
                yield f"compose {name}", variable
    for path, obj in _k8s_objects():
        where = str(path.relative_to(ROOT))
        if obj["kind"] == "ConfigMap":
            yield from ((where, variable) for variable in obj.get("data", {}))
        for container in _containers(obj):
            yield from ((where, variable["name"]) for variable in container.get("env", []))
    yield from _generated_environment_names()


def _generated_environment_names() -> Iterator[tuple[str, str]]:
    """Names set by kustomize's ConfigMap and Secret generators (literals and env files)."""
    for path in _kustomizations():
        kustomization = yaml.safe_load(path.read_text())
        generators = kustomization.get("configMapGenerator", [])
        generators += kustomization.get("secretGenerator", [])
        for generator in generators:
            for literal in generator.get("literals", []):
                yield str(path.relative_to(ROOT)), literal.partition("=")[0]
            for env_file in generator.get("envs", []):
                for line in (path.parent / env_file).read_text().splitlines():
                    if line.strip() and not line.startswith("#"):
                        yield env_file, line.partition("=")[0]


def _probe_commands() -> Iterator[tuple[str, list[str]]]:
    """Every exec probe and health-check command, with where it is."""
    for name, service in _compose()["services"].items():
        test = service.get("healthcheck", {}).get("test")
        if test:
            yield f"compose {name}", test[1:]
    for path, obj in _k8s_objects():
        for container in _containers(obj):
            for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
                command = container.get(probe, {}).get("exec", {}).get("command")
                if command:
                    yield f"{path.relative_to(ROOT)} {container['name']} {probe}", command
    for item in _dockerfile():
        if item.keyword == "HEALTHCHECK":
            yield f"Dockerfile {item.stage}", _exec_form(item.argument.partition(" CMD ")[2])


def _compose_value(value: Any) -> str:
    """A compose environment value with ``${NAME:-default}`` replaced by its default."""
    return re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", str(value))


# ---------------------------------------------------------------------------------- metrics


@pytest.fixture(scope="module")
def exported() -> dict[str, set[str]]:
    """Every sample name the gateway exports, with its label names, from a real registry."""
    metrics = GatewayMetrics()
    metrics.watch(
        budget_remaining=lambda: [BudgetReading("p", calls_left=3, usd_left=1.0)],
        queue_depths=lambda: {BERT_QUEUE: 1},
        dead_letters=lambda: {DeadLetterKind.GAVE_UP.value: 1},
    )
    decision = Decision(
        id="m-1",
        label="a",
        labels=["a"],
        scores={"a": 1.0},
        tier=Tier.LLM,
        reason=Reason.LOW_CONFIDENCE,
        llm_skipped=LLMSkip.LLM_UNAVAILABLE,
        chunks=1,
        model_version="v",
        policy="p",
        llm=LLMUsage(provider="openai", model="m", input_tokens=1, output_tokens=1, cost_usd=1),
        timings_ms=dict.fromkeys(DECISION_STEPS, 1.0),
    )
    cached = decision.model_copy(update={"cached": True})
    metrics.observe_decisions([decision, cached])
    metrics.observe_request("/healthz", "GET", 200, 0.01)
    metrics.observe_batch(1)
    names: dict[str, set[str]] = {}
    for family in metrics.registry.collect():
        for sample in family.samples:
            names.setdefault(sample.name, set()).update(sample.labels)
    return names


# Known label values: an equality matcher on these labels must name a value the code emits.
LABEL_VALUES = {
    "tier": {tier.value for tier in Tier},
    "reason": {reason.value for reason in Reason},
    "why": {skip.value for skip in LLMSkip},
    "step": set(DECISION_STEPS),
    "queue": {BERT_QUEUE, LLM_QUEUE},
}
# Label values that depend on the metric: a dead letter's reason is its kind.
METRIC_LABEL_VALUES = {
    ("tiergate_dead_letters_total", "reason"): {kind.value for kind in DeadLetterKind},
}


def _promql_expressions() -> Iterator[tuple[str, str, str]]:
    """(where, expression, text whose ``{{ $labels.x }}`` / ``{{x}}`` use its labels)."""
    for group in yaml.safe_load((DEPLOY / "prometheus" / "alerts.yml").read_text())["groups"]:
        for rule in group["rules"]:
            yield rule["alert"], rule["expr"], json.dumps(rule.get("annotations", {}))
    dashboard = json.loads((DEPLOY / "grafana" / "dashboards" / "tiergate.json").read_text())
    for panel in dashboard["panels"]:
        for target in panel["targets"]:
            yield panel["title"], target["expr"], target.get("legendFormat", "")
    for variable in dashboard["templating"]["list"]:
        yield variable["name"], variable["definition"], ""


def _check_expression(where: str, expr: str, text: str, exported: dict[str, set[str]]) -> None:
    used = set(re.findall(r"\btiergate_\w+", expr))
    # Prometheus' own `up` is the only other series a rule may watch.
    assert used or re.fullmatch(r"up\{[^}]*\} == 0", expr.strip()), f"{where}: {expr}"
    available = set(TARGET_LABELS)
    for name in used:
        assert name in exported, f"{where}: {name} is not exported by GatewayMetrics"
        available |= exported[name]
    for name, matchers in re.findall(r"\b(tiergate_\w+)\{([^}]*)\}", expr):
        for label, operator, value in re.findall(r'(\w+)\s*(=~|!~|!=|=)\s*"([^"]*)"', matchers):
            assert label in exported[name] | TARGET_LABELS, f"{where}: {name} has no {label!r}"
            known = METRIC_LABEL_VALUES.get((name, label), LABEL_VALUES.get(label))
            if operator == "=" and known is not None:
                assert value in known, f"{where}: {label}={value!r} never happens"
    for group in re.findall(r"\bby\s*\(([^)]*)\)", expr):
        for label in (part.strip() for part in group.split(",")):
            assert label in available, f"{where}: aggregates by unknown label {label!r}"
    for label in re.findall(r"\$labels\.(\w+)", text) + re.findall(r"\{\{\s*(\w+)\s*\}\}", text):
        assert label in available, f"{where}: refers to label {label!r} its query lacks"


# ---------------------------------------------------------------------------------- tests


@pytest.mark.parametrize("path", _yaml_files(), ids=lambda p: str(p.relative_to(DEPLOY)))
def test_every_yaml_file_parses(path):
    """Every YAML file under deploy/ parses, every document of it, into mappings."""
    documents = _documents(path)
    assert documents
    assert all(isinstance(doc, dict) for doc in documents)


def test_the_dashboard_is_json_with_the_promised_panels():
    """The Grafana dashboard parses and shows tier shares, latency, cache, cost and queues."""
    dashboard = json.loads((DEPLOY / "grafana" / "dashboards" / "tiergate.json").read_text())
    exprs = " ".join(t["expr"] for p in dashboard["panels"] for t in p["targets"])
    for metric in (
        "tiergate_decisions_total",
        "tiergate_decision_step_seconds_bucket",
        "tiergate_cache_hits_total",
        "tiergate_cache_lookups_total",
        "tiergate_llm_cost_usd_total",
        "tiergate_queue_depth",
    ):
        assert metric in exprs
    datasource = yaml.safe_load(
        (DEPLOY / "grafana/provisioning/datasources/prometheus.yml").read_text()
    )["datasources"][0]
    assert {p["datasource"]["uid"] for p in dashboard["panels"]} == {datasource["uid"]}


def test_every_tiergate_variable_is_a_setting():
    """Every TIERGATE_* variable set in the image, compose or Kubernetes is a Settings field."""
    seen = list(_environment_names())
    assert len(seen) > 20
    for where, name in seen:
        if name.startswith("TIERGATE_") or name in SETTING_ALIASES:
            assert name in SETTING_NAMES, f"{where}: {name} is not a tiergate setting"


def test_compose_environments_build_valid_settings(monkeypatch):
    """Each tiergate service's compose environment is accepted by Settings as written."""
    for name, service in _compose()["services"].items():
        if "tiergate" not in str(service.get("image", "")):
            continue
        with monkeypatch.context() as patched:
            for variable, value in service.get("environment", {}).items():
                patched.setenv(variable, _compose_value(value))
            settings = Settings()
        assert settings.redis_url is not None or name == "model-builder", name


def test_kubernetes_configmap_builds_valid_settings(monkeypatch):
    """The base ConfigMap's values are accepted by Settings and name the broker the workers use."""
    (configmap,) = [obj for obj in _base_objects() if obj["kind"] == "ConfigMap"]
    for variable, value in configmap["data"].items():
        monkeypatch.setenv(variable, value)
    settings = Settings()
    assert settings.broker_url is not None
    assert settings.redis_url is not None
    assert (settings.bert_queue, settings.llm_queue) == (BERT_QUEUE, LLM_QUEUE)


def test_every_tiergate_command_is_a_cli_command():
    """Every tiergate command line parses against the real CLI: command, options and choices."""
    commands = list(_tiergate_commands())
    used = set()
    for where, argv in commands:
        try:
            command, params = _parse_cli(argv)
        except typer.exceptions.TyperException as exc:
            pytest.fail(f"{where}: {shlex.join(argv)}: {exc}")
        used.add(command.name)
        if command.name == "worker":
            used.add(f"worker {params['queue'].value}")
    assert {"serve", "build-default", "worker bert", "worker llm"} <= used


def test_every_exec_probe_reads_only_real_settings_and_compiles():
    """Exec probes and health checks compile and read only environment that is a setting."""
    probes = list(_probe_commands())
    assert len(probes) >= 5
    for where, command in probes:
        if command[:2] != ["python", "-c"]:
            continue
        compile(command[2], where, "exec")
        for name in re.findall(r"environ\[['\"](\w+)['\"]\]", command[2]):
            assert name in SETTING_NAMES, f"{where}: reads {name}, which is not a setting"


def test_probe_and_scrape_paths_are_gateway_routes():
    """Every HTTP probe, health check and scrape path is a GET route of the gateway."""
    routes = {route.path for route in router.routes if "GET" in getattr(route, "methods", ())}
    paths = {}
    for where, command in _probe_commands():
        for _, path in URL.findall(" ".join(command)):
            paths[path] = where
    for path, obj in _k8s_objects():
        for container in _containers(obj):
            for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
                http = container.get(probe, {}).get("httpGet")
                if http:
                    paths[http["path"]] = f"{path.name} {probe}"
        annotations = obj.get("spec", {}).get("template", {}).get("metadata", {})
        scrape_path = annotations.get("annotations", {}).get("prometheus.io/path")
        if scrape_path:
            paths[scrape_path] = f"{path.name} annotation"
    prometheus = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    for job in prometheus["scrape_configs"]:
        paths[job["metrics_path"]] = f"prometheus job {job['job_name']}"
    assert {"/healthz", "/readyz", "/metrics"} <= set(paths)
    for path, where in paths.items():
        assert path in routes, f"{where}: {path} is not a route of the gateway"


def test_every_port_is_the_port_the_gateway_serves_on():
    """Exposed, container, probe, service, health-check and scrape ports all equal serve's port."""
    port = _serve_port()
    ports = [
        (f"Dockerfile {item.stage} EXPOSE", int(item.argument))
        for item in _dockerfile()
        if item.keyword == "EXPOSE"
    ]
    for where, command in _probe_commands():
        ports += [(where, int(p)) for p, _ in URL.findall(" ".join(command))]
    gateway = _compose()["services"]["gateway"]
    ports += [("compose gateway", int(str(p).rpartition(":")[2])) for p in gateway["ports"]]
    prometheus = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    for job in prometheus["scrape_configs"]:
        for config in job["static_configs"]:
            ports += [(job["job_name"], int(t.rpartition(":")[2])) for t in config["targets"]]
    deployment = _deployments()["tiergate-gateway"]
    (container,) = _containers(deployment)
    named = {p["name"]: p["containerPort"] for p in container["ports"]}
    ports += [(f"containerPort {name}", number) for name, number in named.items()]
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        ports.append((probe, named[container[probe]["httpGet"]["port"]]))
    annotation = deployment["spec"]["template"]["metadata"]["annotations"]["prometheus.io/port"]
    ports.append(("prometheus.io/port", int(annotation)))
    for obj in _base_objects():
        if obj["kind"] == "Service":
            service = obj["metadata"]["name"]
            ports += [(service, named[p["targetPort"]]) for p in obj["spec"]["ports"]]
    assert len(ports) >= 10
    assert [where for where, number in ports if number != port] == []


def test_alerts_and_dashboard_use_only_exported_metrics(exported):
    """Every metric, label and label value in the alerts and the dashboard is exported."""
    expressions = list(_promql_expressions())
    assert len(expressions) >= 10
    for where, expr, text in expressions:
        _check_expression(where, expr, text, exported)


def test_the_expression_check_catches_a_wrong_metric_or_label(exported):
    """The cross-check rejects a misspelt metric, an unknown label and an impossible value."""
    bad = [
        "rate(tiergate_decision_total[5m])",
        'rate(tiergate_llm_skipped_total{reason="llm_unavailable"}[5m])',
        'rate(tiergate_llm_skipped_total{why="breaker_open"}[5m])',
        "sum by (queue) (rate(tiergate_decisions_total[5m]))",
    ]
    for expr in bad:
        with pytest.raises(AssertionError):
            _check_expression("test", expr, "", exported)


def test_the_alerts_cover_the_five_conditions():
    """Alert rules exist for budget, LLM breaker, growing queue, error rate and dead letters."""
    rules = yaml.safe_load((DEPLOY / "prometheus" / "alerts.yml").read_text())["groups"][0]
    by_name = {rule["alert"]: rule["expr"] for rule in rules["rules"]}
    assert "tiergate_budget_usd_left" in by_name["TiergateBudgetNearlySpent"]
    assert 'why="llm_unavailable"' in by_name["TiergateLLMBreakerOpen"]
    assert "tiergate_queue_depth" in by_name["TiergateQueueGrowing"]
    assert 'status=~"5.."' in by_name["TiergateHighErrorRate"]
    assert re.search(
        r"increase\(tiergate_dead_letters_total\[\w+\]\)", by_name["TiergateDeadLetters"]
    )


def test_the_dead_letter_alert_names_the_reason_and_how_to_look(exported):
    """The dead-letter alert groups by reason, says it, and points to the CLI that reads them."""
    rules = yaml.safe_load((DEPLOY / "prometheus" / "alerts.yml").read_text())["groups"][0]
    (rule,) = [r for r in rules["rules"] if r["alert"] == "TiergateDeadLetters"]
    assert "by (reason)" in rule["expr"]
    assert "$labels.reason" in rule["annotations"]["summary"]
    assert "tiergate dead-letters list" in rule["annotations"]["description"]
    assert "reason" in exported["tiergate_dead_letters_total"]


def test_kustomizations_name_only_files_that_exist():
    """Every resource, patch and generator file a kustomization.yaml names exists."""
    for path in _kustomizations():
        kustomization = yaml.safe_load(path.read_text())
        for resource in kustomization.get("resources", []):
            target = path.parent / resource
            assert target.is_file() or (target / "kustomization.yaml").is_file(), target
        for patch in kustomization.get("patches", []):
            assert (path.parent / patch["path"]).is_file(), patch
        for generator in kustomization.get("secretGenerator", []):
            for env_file in generator.get("envs", []):
                assert (path.parent / env_file).is_file(), env_file
    base = yaml.safe_load((K8S / "base" / "kustomization.yaml").read_text())
    listed = {K8S / "base" / r for r in base["resources"]}
    on_disk = set((K8S / "base").glob("*.yaml")) - {K8S / "base" / "kustomization.yaml"}
    assert listed == on_disk


def test_overlay_patches_target_base_objects():
    """Each overlay patch names an object of the base by kind and name."""
    base = {(obj["kind"], obj["metadata"]["name"]) for obj in _base_objects()}
    overlay = yaml.safe_load((K8S / "overlays" / "example" / "kustomization.yaml").read_text())
    for patch in overlay["patches"]:
        for doc in _documents(K8S / "overlays" / "example" / patch["path"]):
            assert (doc["kind"], doc["metadata"]["name"]) in base, patch["path"]


def test_scalers_and_budgets_target_the_deployments():
    """ScaledObjects, the HPA and the PodDisruptionBudgets select Deployments of the base."""
    deployments = _deployments()
    assert set(deployments) == {"tiergate-gateway", "tiergate-bert-worker", "tiergate-llm-worker"}
    template_labels = {
        name: obj["spec"]["template"]["metadata"]["labels"] for name, obj in deployments.items()
    }
    kinds: dict[str, set[str]] = {}
    for obj in _base_objects():
        kind, spec = obj["kind"], obj.get("spec", {})
        if kind in {"ScaledObject", "HorizontalPodAutoscaler"}:
            kinds.setdefault(kind, set()).add(spec["scaleTargetRef"]["name"])
        elif kind == "PodDisruptionBudget":
            selector = spec["selector"]["matchLabels"]
            wanted = selector.items()
            kinds.setdefault(kind, set()).update(
                name for name, labels in template_labels.items() if wanted <= labels.items()
            )
    assert kinds["ScaledObject"] == {"tiergate-bert-worker", "tiergate-llm-worker"}
    assert kinds["HorizontalPodAutoscaler"] == {"tiergate-gateway"}
    assert kinds["PodDisruptionBudget"] == set(deployments)
    hpa = next(o for o in _base_objects() if o["kind"] == "HorizontalPodAutoscaler")
    assert hpa["spec"]["metrics"][0]["resource"]["name"] == "cpu"


def test_keda_triggers_watch_the_queue_their_workers_consume():
    """Each KEDA Redis trigger reads its worker's queue list in the broker's Redis database."""
    (configmap,) = [obj for obj in _base_objects() if obj["kind"] == "ConfigMap"]
    broker_db = configmap["data"]["TIERGATE_BROKER_URL"].rpartition("/")[2]
    queue_of = {"bert": BERT_QUEUE, "llm": LLM_QUEUE}
    checked = 0
    for path, obj in _k8s_objects():
        if obj["kind"] != "ScaledObject":
            continue
        (container,) = _containers(_deployments()[obj["metadata"]["name"]])
        _, params = _parse_cli(container["command"])
        for trigger in obj["spec"]["triggers"]:
            assert trigger["type"] == "redis", path
            assert trigger["metadata"]["listName"] == queue_of[params["queue"].value], path
            assert trigger["metadata"]["databaseIndex"] == broker_db, path
            assert int(trigger["metadata"]["listLength"]) > 0
            checked += 1
    assert checked == 4


def test_deployments_have_probes_resources_and_the_kustomize_image():
    """Every Deployment has readiness and liveness probes, requests, and the kustomized image."""
    base = yaml.safe_load((K8S / "base" / "kustomization.yaml").read_text())
    images = {image["name"] for image in base["images"]}
    for name, deployment in _deployments().items():
        for container in _containers(deployment):
            assert {"readinessProbe", "livenessProbe"} <= container.keys(), name
            assert {"cpu", "memory"} <= container["resources"]["requests"].keys(), name
            assert "memory" in container["resources"]["limits"], name
            assert container["image"] in images, name


def test_compose_runs_every_service_the_issue_names():
    """Compose has the stores, the gateway, both workers, Flower, Prometheus and Grafana."""
    services = _compose()["services"]
    expected = {"redis", "rabbitmq", "gateway", "bert-worker", "llm-worker", "flower"}
    assert expected | {"prometheus", "grafana"} <= set(services)
    stages = {item.stage for item in _dockerfile() if item.keyword == "FROM"}
    for name, service in services.items():
        for dependency in service.get("depends_on", {}):
            assert dependency in services, f"{name} depends on unknown {dependency}"
        if "build" in service:
            assert service["build"]["target"] in stages, name
            assert (DEPLOY / service["build"]["context"] / service["build"]["dockerfile"]).is_file()
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("./"):
                assert (DEPLOY / source).exists(), f"{name} mounts missing {source}"


def test_the_inference_image_is_slim_non_root_and_serves():
    """The inference stage: python:3.11-slim, no torch, a non-root user, /healthz, serve."""
    stage = [item for item in _dockerfile() if item.stage == "inference"]
    assert stage[0].argument.startswith("${PYTHON_IMAGE}")
    assert "ARG PYTHON_IMAGE=python:3.11-slim" in (DEPLOY / "Dockerfile").read_text()
    builder = [item for item in _dockerfile() if item.stage == "builder"]
    assert not any("torch" in item.argument for item in stage + builder)
    (user,) = [item.argument for item in stage if item.keyword == "USER"]
    assert user not in {"root", "0"}
    (healthcheck,) = [item.argument for item in stage if item.keyword == "HEALTHCHECK"]
    assert "/healthz" in healthcheck
    (cmd,) = [_exec_form(item.argument) for item in stage if item.keyword == "CMD"]
    assert cmd == ["tiergate", "serve", "--host", "0.0.0.0", "--port", "8000"]  # noqa: S104


def test_dockerfile_commands_are_the_documented_ones():
    """The Dockerfile's pip installs and commands appear in deploy/README.md; pins match make."""
    readme = (DEPLOY / "README.md").read_text()
    documented = {line.strip() for line in readme.splitlines()}
    makefile = (ROOT / "Makefile").read_text()
    for item in _dockerfile():
        if item.keyword == "RUN" and item.argument.startswith("pip install"):
            assert item.argument in documented, f"undocumented: {item.argument}"
            for pin in re.findall(r"[\w-]+==[\w.]+", item.argument):
                assert pin in makefile, f"{pin} differs from the Makefile's install"
        if item.keyword == "CMD":
            assert shlex.join(_exec_form(item.argument)) in readme
    assert "torch==2.13.0" in (ROOT / "pyproject.toml").read_text()
    assert re.search(r"under 700 MB, never over 1 GB", readme)
    assert "never over 1 GB" in (DEPLOY / "Dockerfile").read_text()


def test_the_dockerfile_parser_reads_stages():
    """The Dockerfile parser finds the three stages in order (guards the checks above)."""
    stages = [item.stage for item in _dockerfile() if item.keyword == "FROM"]
    assert stages == ["builder", "inference", "training"]


@pytest.mark.parametrize(
    "argv",
    [
        ["tiergate", "server"],
        ["tiergate", "serve", "--prot", "8000"],
        ["tiergate", "worker", "--queue", "gpu"],
        ["tiergate", "model"],
    ],
)
def test_the_command_check_catches_a_wrong_command(argv):
    """The CLI cross-check rejects an unknown command, option or queue, and a bare group."""
    with pytest.raises((AssertionError, typer.exceptions.TyperException)):
        _parse_cli(argv)


def test_model_versions_volume_is_mounted_at_the_store_path_everywhere():
    """Every tiergate service and pod mounts the shared versions volume at TIERGATE_MODEL_STORE."""
    compose = _compose()
    for name, service in compose["services"].items():
        if "tiergate" not in str(service.get("image", "")):
            continue
        store = service["environment"]["TIERGATE_MODEL_STORE"]
        mounts = {v.split(":")[1]: v.split(":")[0] for v in service.get("volumes", [])}
        assert mounts.get(store) == "model-versions", f"compose {name} lacks the versions volume"
    assert "model-versions" in compose["volumes"]
    writers = [
        name
        for name, service in compose["services"].items()
        if "model-versions:/model-versions" in service.get("volumes", [])
    ]
    assert writers, "some service must be able to add versions"

    (configmap,) = [obj for obj in _base_objects() if obj["kind"] == "ConfigMap"]
    store = configmap["data"]["TIERGATE_MODEL_STORE"]
    (claim,) = [
        obj
        for obj in _base_objects()
        if obj["kind"] == "PersistentVolumeClaim"
        and obj["metadata"]["name"] == "tiergate-model-versions"
    ]
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]
    for name, deployment in _deployments().items():
        volumes = deployment["spec"]["template"]["spec"]["volumes"]
        claims = {
            v["name"]: v["persistentVolumeClaim"]["claimName"]
            for v in volumes
            if "persistentVolumeClaim" in v
        }
        for container in _containers(deployment):
            mounted = {m["mountPath"]: claims.get(m["name"]) for m in container["volumeMounts"]}
            assert mounted.get(store) == "tiergate-model-versions", f"{name} lacks the volume"
            # A worker loads its model from the other PVC as well: that must be mounted too.
            model_dir = configmap["data"]["TIERGATE_MODEL_DIR"]
            if name != "tiergate-gateway":
                assert any(model_dir.startswith(path + "/") for path in mounted), name
