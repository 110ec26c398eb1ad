"""A policy for your own model that reaches an LLM: `policy init`, `--provider`, `calibrate`.

Also the chain `calibrate` writes, the no-provider warning and the price `eval` puts on LLM calls.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import typer

from tests.conftest import tiergate_cli
from tiergate.gateway.cli.policy import policy_template, provider_chain
from tiergate.policies.spec import DEFAULT_PROVIDERS, ProviderRef, load_policy, parse_policy_text
from tiergate.workers.bert.manifest import Head, read_manifest

TEXTS = {"billing": "refunds", "account": "passwords", "bug": "crashes"}


@pytest.fixture
def run(tiny_model, tmp_path):
    """The CLI in a fresh interpreter over the tiny model, with no API key and wide tables."""
    env = {
        name: value
        for name, value in os.environ.items()
        if not name.endswith("_API_KEY") and not name.startswith("TIERGATE_")
    }
    env.update(
        TIERGATE_DATA_DIR=str(tmp_path / "data"),
        TIERGATE_MODEL_DIR=str(tiny_model),
        COLUMNS="200",
    )
    return tiergate_cli(env)


@pytest.fixture
def labelled(tmp_path) -> Path:
    """30 labelled messages in the tiny model's three labels, with ids."""
    path = tmp_path / "labelled.jsonl"
    rows = [
        {"id": f"m{i}", "text": f"message number {i} about {word}", "label": label}
        for i, (label, word) in enumerate(list(TEXTS.items()) * 10)
    ]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@pytest.fixture
def bare_policy(run, tmp_path) -> Path:
    """A policy for the tiny model whose provider chain is empty."""
    path = tmp_path / "bare.yaml"
    assert run("policy", "init", "-o", str(path)).returncode == 0
    spec = load_policy(path).with_providers([])
    path.write_text(spec.model_copy(update={"name": "bare"}).to_yaml())
    return path


def test_policy_init_writes_a_policy_of_the_models_labels_that_passes_check(
    run, tiny_model, tmp_path
):
    """The scaffold has every label with a TODO description, the default chain, and fits."""
    out = tmp_path / "mine.yaml"
    result = run("policy", "init", "--model", str(tiny_model), "-o", str(out))
    assert result.returncode == 0, result.stderr
    spec = load_policy(out)
    assert spec.label_names == read_manifest(tiny_model).labels
    assert {label.description for label in spec.labels} == {""}
    assert tuple(spec.llm.providers) == DEFAULT_PROVIDERS
    assert spec.escalation.min_probability > 0  # messages can reach the LLM before calibration
    text = out.read_text()
    assert text.count("# TODO: what this label means") == len(spec.labels)
    assert "instructions: ''  # TODO" in text
    checked = run("policy", "check", str(out))
    assert checked.returncode == 0, checked.stderr
    assert "warning" not in checked.stderr
    printed = run("policy", "init", "--name", "printed")
    assert parse_policy_text(printed.stdout).name == "printed"


def test_policy_init_refuses_to_overwrite_unless_asked(run, tmp_path):
    """An existing output file is kept (exit 2) until --overwrite, which also takes --provider."""
    out = tmp_path / "mine.yaml"
    out.write_text("mine\n")
    refused = run("policy", "init", "-o", str(out))
    assert refused.returncode == 2
    assert "--overwrite" in refused.stderr
    assert out.read_text() == "mine\n"
    chain = ("--provider", "anthropic:claude-haiku-4-5", "--provider", "openai:llama3:8b")
    replaced = run("policy", "init", "-o", str(out), "--overwrite", *chain)
    assert replaced.returncode == 0, replaced.stderr
    assert load_policy(out).llm.providers == [
        ProviderRef(provider="anthropic", model="claude-haiku-4-5"),
        ProviderRef(provider="openai", model="llama3:8b"),
    ]


def test_policy_init_for_a_multi_label_head_writes_a_band(tiny_model):
    """A sigmoid head gets a multi-label policy with an uncertainty band around the flag."""
    manifest = read_manifest(tiny_model).model_copy(update={"head": Head.MULTI_LABEL})
    spec = parse_policy_text(policy_template(manifest, "flags", DEFAULT_PROVIDERS))
    assert spec.multi_label
    assert spec.escalation.band.low < spec.escalation.flag_threshold < spec.escalation.band.high


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        ("mistral:large", "unknown provider 'mistral' (known: anthropic, openai)"),
        ("openai", "give NAME:MODEL"),
        ("openai:", "give NAME:MODEL"),
    ],
)
def test_a_bad_provider_value_is_a_usage_error(value, problem, capsys):
    """An unknown provider or a value without a model exits 2 naming the problem."""
    with pytest.raises(typer.Exit) as exit_info:
        provider_chain(["openai:gpt-4o-mini", value])
    assert exit_info.value.exit_code == 2
    assert problem in capsys.readouterr().err


def test_an_unknown_provider_stops_init_and_calibrate(run, labelled, tmp_path):
    """Both commands that take --provider refuse an unknown one with exit 2 and write nothing."""
    out = tmp_path / "p.yaml"
    for args in (
        ("policy", "init", "-o", str(out)),
        ("calibrate", str(labelled), "--llm-share", "0.5", "-o", str(out)),
    ):
        result = run(*args, "--provider", "mistral:large")
        assert result.returncode == 2
        assert "known: anthropic, openai" in result.stderr
        assert not out.exists()


def test_calibrate_gives_a_policy_without_providers_the_default_chain(run, labelled, tmp_path):
    """The model's own policy has no chain; the calibrated one gets the default, and says so."""
    out = tmp_path / "calibrated.yaml"
    result = run("calibrate", str(labelled), "--llm-share", "0.5", "-o", str(out))
    assert result.returncode == 0, result.stderr
    assert tuple(load_policy(out).llm.providers) == DEFAULT_PROVIDERS
    assert "written with the default chain openai:gpt-4o-mini then anthropic:" in result.stderr
    assert "warning" not in result.stderr


def test_calibrate_writes_the_base_policy_with_the_chain_given(
    run, labelled, bare_policy, tmp_path
):
    """--base-policy is what is calibrated; --provider values become its chain, in order."""
    out = tmp_path / "calibrated.yaml"
    chain = ("--provider", "anthropic:claude-haiku-4-5", "--provider", "openai:gpt-4.1-nano")
    result = run(
        "calibrate",
        str(labelled),
        "--llm-share",
        "0.5",
        "--base-policy",
        str(bare_policy),
        "-o",
        str(out),
        *chain,
    )
    assert result.returncode == 0, result.stderr
    spec = load_policy(out)
    assert (spec.name, spec.version.startswith("1+cal.")) == ("bare", True)
    assert [(p.provider, p.model) for p in spec.llm.providers] == [
        ("anthropic", "claude-haiku-4-5"),
        ("openai", "gpt-4.1-nano"),
    ]
    assert "default chain" not in result.stderr


def test_calibrate_keeps_the_base_policys_own_chain(run, labelled, tmp_path):
    """A base policy with providers (given by the old name --policy) keeps them as they are."""
    base, out = tmp_path / "base.yaml", tmp_path / "calibrated.yaml"
    assert (
        run("policy", "init", "-o", str(base), "--provider", "openai:gpt-4.1-mini").returncode == 0
    )
    result = run(
        "calibrate", str(labelled), "--llm-share", "0.5", "--policy", str(base), "-o", str(out)
    )
    assert result.returncode == 0, result.stderr
    assert load_policy(out).llm.providers == [ProviderRef(provider="openai", model="gpt-4.1-mini")]
    assert "default chain" not in result.stderr


def test_a_policy_without_a_provider_is_a_warning_line_on_the_cli(run, bare_policy, tmp_path):
    """`classify` and `policy check` warn of a policy with no chain; one with a chain does not."""
    classified = run("classify", "--policy", str(bare_policy), "a message about refunds")
    assert classified.returncode == 0, classified.stderr
    warning = "warning: policy 'bare' (version 1) has no LLM provider"
    assert warning in classified.stderr
    assert "llm_skipped: no_provider" in classified.stderr
    assert warning in run("policy", "check", str(bare_policy)).stderr
    chained = tmp_path / "chained.yaml"
    assert run("policy", "init", "-o", str(chained)).returncode == 0
    plain = run("classify", "--policy", str(chained), "a message about refunds")
    assert plain.returncode == 0, plain.stderr
    assert "warning" not in plain.stderr


def _eval(
    run, labelled: Path, report: Path, *args: str
) -> tuple[dict, subprocess.CompletedProcess]:
    result = run("eval", str(labelled), "--json", str(report), *args)
    assert result.returncode == 0, result.stderr
    return json.loads(report.read_text()), result


def test_eval_prices_llm_calls_at_the_policys_first_provider(run, labelled, tmp_path):
    """A simulated LLM, and a replay without cost_usd, cost what the first model's price says."""
    policy = tmp_path / "p.yaml"
    chain = ("--provider", "openai:gpt-4o-mini", "--provider", "anthropic:claude-haiku-4-5")
    assert run("policy", "init", "-o", str(policy), *chain).returncode == 0
    report = tmp_path / "eval.json"
    simulated, result = _eval(
        run, labelled, report, "--simulate-accuracy", "0.9", "--policy", str(policy)
    )
    assert simulated["priced"] is True
    per_call = simulated["llm_only"]["cost_per_1000"] / 1000
    assert 0 < per_call < 0.001  # a few hundred prompt tokens at gpt-4o-mini's list price
    assert "openai/gpt-4o-mini's list price" in result.stderr
    replay = tmp_path / "replay.jsonl"
    replay.write_text(
        "".join(json.dumps({"id": f"m{i}", "label": "bug"}) + "\n" for i in range(30))
    )
    replayed, _ = _eval(run, labelled, report, "--replay", str(replay), "--policy", str(policy))
    assert replayed["llm_only"]["cost_per_1000"] == pytest.approx(1000 * per_call)


def test_eval_without_a_provider_or_a_price_reports_unpriced_costs(run, labelled, tmp_path):
    """No chain, or a model with no known price: a warning, null costs, and no $0.00 anywhere."""
    unknown = tmp_path / "unknown.yaml"
    assert (
        run("policy", "init", "-o", str(unknown), "--provider", "openai:my-model").returncode == 0
    )
    for policy_args, reason in (
        ((), "has no LLM provider to price them at"),
        (("--policy", str(unknown)), "model 'my-model' (the policy's first provider) has no known"),
    ):
        report = tmp_path / "eval.json"
        data, result = _eval(run, labelled, report, "--simulate-accuracy", "0.9", *policy_args)
        assert "warning: LLM calls are unpriced" in result.stderr
        assert reason in result.stderr
        assert data["priced"] is False
        assert data["llm_only"]["cost_per_1000"] is None
        assert "unpriced" in result.stdout
        assert "$0.00" not in result.stdout


def test_eval_price_per_call_sets_the_price(run, labelled, tmp_path):
    """--price-per-call (or its older name --cost-per-call) prices every call, chain or not."""
    report = tmp_path / "eval.json"
    for option in ("--price-per-call", "--cost-per-call"):
        data, result = _eval(run, labelled, report, "--simulate-accuracy", "0.9", option, "0.002")
        assert data["priced"] is True
        assert data["llm_only"]["cost_per_1000"] == pytest.approx(2.0)
        assert "unpriced" not in result.stderr
