"""Every benchmark's quick mode runs on the test suite's model and writes figures that add up.

Each benchmark runs as the script it is (``python bench/<name>.py --quick``) on
``trained_model`` and its held-out split, and the tests read the JSON it writes. Speed is
reported there, never asserted here.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"
# Generous: a quick run takes seconds to a minute; this only stops a hung one.
RUN_TIMEOUT_S = 600
# Messages bert_tier.py is asked for, over --quick's own default: an option given explicitly wins.
BERT_TIER_MESSAGES = 80


def fraction(value):
    """Whether ``value`` is a share or an accuracy: a number in [0, 1]."""
    return isinstance(value, int | float) and 0.0 <= value <= 1.0


def quick_run(name, model_dir, test_split, output, *options):
    """Run ``bench/<name>.py --quick`` on ``model_dir`` and ``test_split``; its JSON results.

    The environment's ``TIERGATE_*`` settings and API keys are left out, so the benchmark sees
    the defaults whatever the machine holds, and its data directory is a fresh one.
    """
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith("TIERGATE_") and not key.endswith("_API_KEY")
    }
    env["TIERGATE_DATA_DIR"] = str(output.parent / "data")
    command = [
        sys.executable,
        str(BENCH / f"{name}.py"),
        "--quick",
        "--model-dir",
        str(model_dir),
        "--test-split",
        str(test_split),
        "--output",
        str(output),
        *options,
    ]
    done = subprocess.run(
        command, env=env, capture_output=True, text=True, timeout=RUN_TIMEOUT_S, check=False
    )
    assert done.returncode == 0, f"{name} failed:\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}"
    return json.loads(output.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def held_out(trained_model, tmp_path_factory):
    """The trained model's held-out test examples, as the JSONL file the benchmarks read."""
    path = tmp_path_factory.mktemp("held-out") / "test.jsonl"
    lines = [
        json.dumps({"id": example.id or f"test-{i}", "text": example.text, "label": label})
        for i, example in enumerate(trained_model.test)
        for label in example.labels[:1]
    ]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def bert_tier(trained_model, held_out, tmp_path_factory):
    """``bench/bert_tier.py --quick``'s results, on :data:`BERT_TIER_MESSAGES` messages."""
    output = tmp_path_factory.mktemp("bert-tier") / "bert_tier.json"
    limit = str(BERT_TIER_MESSAGES)
    return quick_run("bert_tier", trained_model.directory, held_out, output, "--limit", limit)


@pytest.fixture(scope="module")
def cascade(trained_model, held_out, tmp_path_factory):
    """``bench/cascade.py --quick``'s results (its plot beside them)."""
    output = tmp_path_factory.mktemp("cascade") / "cascade.json"
    return quick_run("cascade", trained_model.directory, held_out, output)


@pytest.fixture(scope="module")
def gateway(trained_model, held_out, tmp_path_factory):
    """``bench/service_paths.py --quick``'s results."""
    output = tmp_path_factory.mktemp("gateway") / "gateway.json"
    return quick_run("service_paths", trained_model.directory, held_out, output)


# ---------------------------------------------------------------------------------- options


def test_a_quick_run_refuses_to_write_the_published_results():
    """--quick with an output under bench/results is a usage error, and the file is untouched."""
    published = BENCH / "results" / "cascade.json"
    before = published.read_bytes()
    done = subprocess.run(
        [sys.executable, str(BENCH / "cascade.py"), "--quick", "--output", str(published)],
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT_S,
        check=False,
    )
    assert done.returncode == 2, done.stderr
    assert "--quick never writes under" in done.stderr
    assert published.read_bytes() == before


# ---------------------------------------------------------------------------------- bert_tier


def test_bert_tier_measures_every_message_on_both_sides(bert_tier, trained_model):
    """Both sides classify the messages asked for; one quick run each at every batch size."""
    assert bert_tier["quick"] is True
    assert bert_tier["messages"] == min(BERT_TIER_MESSAGES, len(trained_model.test))
    assert bert_tier["runs"] == 1
    assert bert_tier["model_dir"] == str(trained_model.directory)
    assert set(bert_tier["baseline"]["per_batch_size"]) == {"1", "8", "32"}
    for figures in bert_tier["baseline"]["per_batch_size"].values():
        assert len(figures["per_run"]) == 1
        assert fraction(figures["accuracy"])
    assert len(bert_tier["tiergate"]["per_run_msgs_per_s"]) == 1
    assert bert_tier["tiergate"]["windows"] >= bert_tier["messages"]
    assert 0 < bert_tier["tiergate"]["latency_sample"] <= bert_tier["messages"]


def test_bert_tier_accuracies_compare_the_same_model(bert_tier):
    """Accuracies are fractions, the gap is their difference, and the two sides mostly agree.

    The tier serves the int8 export of the checkpoint the pipeline runs, so their top labels
    agree on all but a few messages; a label-order mix-up would put agreement near chance.
    """
    baseline, tiergate = bert_tier["baseline_accuracy"], bert_tier["tiergate_accuracy"]
    best = bert_tier["baseline"]["per_batch_size"][str(bert_tier["baseline"]["best_batch_size"])]
    assert fraction(baseline)
    assert fraction(tiergate)
    assert best["accuracy"] == baseline
    assert bert_tier["accuracy_gap_points"] == pytest.approx(100 * (baseline - tiergate), abs=1e-2)
    assert bert_tier["top_label_agreement"] >= 0.9


def test_bert_tier_rss_probe_classifies_without_torch(bert_tier):
    """The fresh-interpreter probe classified its messages with neither torch nor transformers."""
    probe = bert_tier["tiergate"]["rss_probe"]
    assert 0 < probe["messages"] <= bert_tier["messages"]
    assert probe["peak_rss_mb"] > 0
    assert bert_tier["tiergate_rss_mb"] == pytest.approx(probe["peak_rss_mb"], abs=0.1)
    assert set(bert_tier["meets_targets"]) == set(bert_tier["targets"])


# ---------------------------------------------------------------------------------- cascade


def test_cascade_evaluates_every_message(cascade, trained_model):
    """Part 1 and the real cascade both see every held-out message; the figures are fractions."""
    n = len(trained_model.test)
    assert cascade["quick"] is True
    assert cascade["n"] == n
    assert cascade["end_to_end"]["messages"] == n
    for figure in (
        "bert_only_accuracy",
        "llm_only_accuracy",
        "matched_accuracy_llm_share",
        "cost_saving_vs_llm_only",
    ):
        assert fraction(cascade[figure]), figure
    for point in ("operating_point", "matched_point"):
        assert fraction(cascade[point]["llm_share"])
        assert fraction(cascade[point]["accuracy"])
    assert all(fraction(p["llm_share"]) and fraction(p["accuracy"]) for p in cascade["curve"])
    assert cascade["seed_spread"]["seeds"] == [1, 2]
    assert Path(cascade["plot"]).read_bytes().startswith(b"\x89PNG")


def test_the_real_cascade_routes_exactly_the_operating_point(cascade):
    """The real cascade sends the LLM the share the math predicts, message for message."""
    measured, point = cascade["end_to_end"], cascade["operating_point"]
    assert 0 < point["llm_share"] < 1, "the policy should send some messages, not all"
    assert measured["llm_share"] == point["llm_share"]
    assert measured["routing_disagreements_with_part1"] == 0
    assert measured["llm_skipped"] == 0
    assert measured["upstream_calls"] == round(point["llm_share"] * measured["messages"])
    assert measured["llm_requests_with_unknown_text"] == 0
    assert measured["accuracy"] == measured["operating_point_accuracy_with_these_llm_answers"]


def test_cascade_cache_hits_are_all_hits(cascade):
    """Every timed cache lookup went through the cascade and was answered from the cache."""
    assert cascade["cache"]["hits"] == 50
    assert cascade["cache"]["first_decision_tier"] == "bert"


def test_cascade_bursts_make_one_upstream_call(cascade):
    """Single-flight: each burst of identical messages makes one LLM call and answers them all."""
    threads, processes = cascade["burst"]["threads"], cascade["burst"]["processes"]
    assert cascade["burst_upstream_calls"] == threads["upstream_calls"] == 1
    assert cascade["burst_upstream_calls_across_processes"] == processes["upstream_calls"] == 1
    assert threads["decisions"] == threads["threads"] == 20
    assert processes["decisions"] == processes["processes"] * processes["threads_per_process"]
    assert threads["answered_by_llm_call"] == 1
    assert processes["answered_by_llm_call"] == 1


# ---------------------------------------------------------------------------------- gateway


def test_every_front_door_answers_every_message(gateway):
    """Each part sent the same messages and got every one answered by the BERT tier."""
    n = gateway["messages"]["n"]
    parts = gateway["parts"]
    assert gateway["quick"] is True
    assert n > 0
    assert set(parts) == {
        "in_process",
        "http_max",
        "http_half",
        "celery",
        "http_distributed_max",
        "http_distributed_half",
    }
    for name in ("in_process", "celery"):
        assert parts[name]["messages"] == n, name
        assert sum(parts[name]["answers"]["tiers"].values()) == n, name
    for name in ("http_max", "http_distributed_max"):
        assert parts[name]["answered"] == parts[name]["messages"] == n, name
        assert parts[name]["errors"] == {}, name
    for name in ("http_half", "http_distributed_half"):
        assert parts[name]["answered"] == parts[name]["messages"] <= n, name
        assert parts[name]["errors"] == {}, name
    assert gateway["all_bert_answered"] is True


def test_no_message_is_answered_from_the_cache(gateway):
    """Every run has its own key prefix and unique texts: nothing comes from the cache."""
    parts = gateway["parts"]
    assert parts["in_process"]["answers"]["cached"] == 0
    assert parts["celery"]["answers"]["cached"] == 0


def test_the_batches_counted_hold_every_timed_message(gateway):
    """The batch counts read around a timed run account for exactly its messages."""
    parts = gateway["parts"]
    for name in ("celery", "http_max", "http_distributed_max"):
        sizes = parts[name]["batch_sizes"]
        assert sizes["messages"] == parts[name]["messages"], name
        assert sizes["batches"] > 0, name


def test_the_efficiency_is_the_ratio_of_the_throughputs(gateway):
    """queue_efficiency is Celery's throughput over the in-process one's."""
    parts = gateway["parts"]
    ratio = parts["celery"]["msgs_per_s"] / parts["in_process"]["msgs_per_s"]
    assert gateway["queue_efficiency"] == pytest.approx(ratio, abs=1e-3)
    assert gateway["queue_efficiency_tuned"] is None


# ---------------------------------------------------------------------------------- long_texts


@pytest.fixture(scope="module")
def long_texts(trained_model, held_out, tmp_path_factory):
    """``bench/long_texts.py --quick``'s results: long texts joined from the held-out split."""
    output = tmp_path_factory.mktemp("long-texts") / "long_texts.json"
    return quick_run("long_texts", trained_model.directory, held_out, output)


def test_long_texts_trains_first_windows_against_every_window(long_texts):
    """First-window runs train one window per text, the other every window; gains are gaps.

    The step-matched first-window run trains as many more epochs as every window has windows.
    """
    assert long_texts["quick"] is True
    runs = long_texts["runs"]
    first, every, matched = runs["first"], runs["all"], runs["first_matched"]
    texts = sum(long_texts["data"]["train"].values())
    assert first["window_strategy"] == matched["window_strategy"] == "first"
    assert every["window_strategy"] == "all"
    assert first["windows_trained"] == matched["windows_trained"] == texts
    assert every["windows_trained"] > texts
    assert first["texts_with_several_windows"] == every["texts_with_several_windows"] > 0
    assert matched["epochs"] == round(first["epochs"] * every["windows_trained"] / texts)
    assert long_texts["data"]["test_windows"]["mean_windows_per_text"] > 1
    for run in (first, every, matched):
        assert fraction(run["test_accuracy"])
        assert fraction(run["test_macro_f1"])
    gain = 100 * (every["test_accuracy"] - first["test_accuracy"])
    assert long_texts["accuracy_gain_points"] == pytest.approx(gain, abs=1e-2)
    matched_gain = 100 * (every["test_accuracy"] - matched["test_accuracy"])
    assert long_texts["accuracy_gain_points_at_matched_steps"] == pytest.approx(
        matched_gain, abs=1e-2
    )


# ---------------------------------------------------------------------------------- imbalanced


@pytest.fixture(scope="module")
def imbalanced(trained_model, held_out, tmp_path_factory):
    """``bench/imbalanced.py --quick``'s results: a skewed set made from the held-out split."""
    output = tmp_path_factory.mktemp("imbalanced") / "imbalanced.json"
    return quick_run("imbalanced", trained_model.directory, held_out, output)


def test_imbalanced_trains_with_and_without_balanced_weights_on_one_split(imbalanced):
    """Both runs see one skewed split; only the balanced run weights the loss, rarest highest."""
    assert imbalanced["quick"] is True
    data, runs, rarest = imbalanced["data"], imbalanced["runs"], imbalanced["rarest_label"]
    train = data["train"]
    assert train[rarest] == min(train.values())
    assert train[rarest] < max(train.values()) / 4
    assert runs["unweighted"]["class_weights"] is None
    weights = runs["balanced"]["class_weights"]
    n, k = sum(train.values()), len(train)
    assert weights == pytest.approx({label: n / (k * count) for label, count in train.items()})
    assert max(weights, key=weights.get) == rarest
    for name, run in runs.items():
        per_class = run["test_per_class"]
        supports = {label: f["support"] for label, f in per_class.items() if f["support"]}
        assert supports == data["test"], name
        assert run["rarest_label_recall"] == per_class[rarest]["recall"]
        assert imbalanced["rarest_label_recall"][name] == run["rarest_label_recall"]
        assert imbalanced["test_macro_f1"][name] == run["test_macro_f1"]
        assert fraction(run["test_macro_f1"])
        assert fraction(run["test_accuracy"])


# ---------------------------------------------------------------------------------- flywheel


@pytest.fixture(scope="module")
def flywheel(trained_model, held_out, tmp_path_factory):
    """``bench/flywheel.py --quick``'s results: the held-out split as gold set, stream and tests.

    A fifth of the texts is in the audit sample, so its calls and labels are counted too.
    """
    output = tmp_path_factory.mktemp("flywheel") / "flywheel.json"
    return quick_run("flywheel", trained_model.directory, held_out, output, "--audit-share", "0.2")


def test_flywheel_streams_every_message_through_both_runs(flywheel):
    """Both runs count every streamed message once, and their first window is the same model's."""
    assert flywheel["quick"] is True
    assert flywheel["simulated_llm"]["simulated"] is True
    runs = flywheel["runs"]
    assert set(runs) == {"simulated_llm", "people"}
    streamed = sum(flywheel["data"]["stream"].values())
    for name, run in runs.items():
        windows = run["windows"]
        assert sum(w["messages"] for w in windows) == run["messages"] == streamed, name
        assert sum(w["llm_calls"] for w in windows) == run["llm_calls"], name
        assert sum(w["audit_calls"] for w in windows) == run["audit_calls"], name
        assert 0 < run["audit_calls"] < run["llm_calls"], name
        for window in windows:
            assert window["llm_share"] == round(window["llm_calls"] / window["messages"], 5)
            assert fraction(window["accuracy"]), name
        assert run["llm_share_first_window"] == windows[0]["llm_share"]
        assert run["llm_share_last_window"] == windows[-1]["llm_share"]
        saved = 1 - run["llm_calls"] / run["messages"]
        assert run["llm_calls_saved_vs_llm_only"] == pytest.approx(saved, abs=1e-5)
        for model in ("first_model", "last_model"):
            assert fraction(run["test"][model]["matched_accuracy_llm_share"]), (name, model)
    # no distillation before the first window ends: both runs served it with the first model
    assert runs["simulated_llm"]["windows"][0] == runs["people"]["windows"][0]
    assert flywheel["llm_share_first_window"] == runs["simulated_llm"]["llm_share_first_window"]


def test_flywheel_distills_after_every_n_new_labels_and_promotes_only_through_the_gate(flywheel):
    """A round per 60 new labels on its run's labels; the candidate serves iff it passed."""
    every = flywheel["settings"]["distill"]["every_new_labels"]
    for name, run in flywheel["runs"].items():
        rounds = run["distillations_detail"]
        assert len(rounds) == run["llm_calls"] // every, name
        assert [r["labels"] for r in rounds] == [every * (i + 1) for i in range(len(rounds))]
        kind = "llm" if name == "simulated_llm" else "person"
        for record in rounds:
            assert record["held_out_kind"] in ("audit sample", "newest labels"), name
            sources = record["sources"]
            assert sources[kind] + record["held_out"] == record["labels"], name
            assert sources["llm" if kind == "person" else "person"] == 0, name
            assert sources["training_file"] == flywheel["settings"]["first_model"]["examples"]
            expected = (
                record["candidate"]["model_version"]
                if record["gate_passed"]
                else (record["serving_before"])
            )
            assert record["serving_after"] == expected, name
        assert run["promotions"] == sum(r["gate_passed"] for r in rounds)


@pytest.fixture(scope="module")
def llm_cost(tmp_path_factory):
    """``bench/llm_cost.py --quick``'s results (it runs no BERT model and reads no split)."""
    folder = tmp_path_factory.mktemp("llm_cost")
    return quick_run("llm_cost", folder / "no-model", folder / "no-split.jsonl", folder / "r.json")


def test_llm_cost_prices_every_message_once_per_mode(llm_cost):
    """Each provider answers every message once uncached, once cached and once per batch pass."""
    assert llm_cost["quick"] is True
    assert set(llm_cost["providers"]) == {"openai", "anthropic"}
    for name, figures in llm_cost["providers"].items():
        uncached, cached = figures["online_uncached"], figures["online_cached"]
        assert uncached["calls"] == cached["calls"] == llm_cost["messages"], name
        assert uncached["cached_input_tokens"] == uncached["cache_write_tokens"] == 0, name
        assert cached["input_tokens"] == uncached["input_tokens"], name
        for mode in ("batch", "batch_uncached"):
            assert figures[mode]["calls"] == llm_cost["messages"], (name, mode)
            assert figures[mode]["input_tokens"] == uncached["input_tokens"], (name, mode)


def test_llm_cost_batches_meet_the_target_at_list_prices(llm_cost):
    """Batch mode costs at least 50% less than online uncached; the discount alone is 50%."""
    for name, figures in llm_cost["providers"].items():
        assert figures["meets_batch_target"], (name, figures["reduction_in_batches"])
        assert figures["reduction_in_batches"] >= figures["target_reduction_in_batches"], name
        assert figures["reduction_in_batches_uncached"] == pytest.approx(0.5, abs=1e-3), name
        assert figures["cost_per_1k_batch"] <= figures["cost_per_1k_batch_uncached"], name


def test_llm_cost_figures_add_up(llm_cost):
    """Per-1,000 costs, the reduction and the cached share follow from the totals."""
    messages = llm_cost["messages"]
    for name, figures in llm_cost["providers"].items():
        uncached, cached = figures["online_uncached"], figures["online_cached"]
        for mode, run in (("uncached", uncached), ("cached", cached)):
            per_1k = figures[f"cost_per_1k_online_{mode}"]
            assert per_1k == pytest.approx(1000 * run["cost_usd"] / messages, rel=1e-3), name
        reduction = 1 - cached["cost_usd"] / uncached["cost_usd"]
        assert figures["reduction_with_caching"] == pytest.approx(reduction, abs=1e-3), name
        share = cached["cached_input_tokens"] / cached["input_tokens"]
        assert figures["cached_input_token_share"] == pytest.approx(share, abs=1e-4), name
        assert fraction(figures["cached_input_token_share"]), name


def test_llm_cost_caching_meets_the_targets_at_list_prices(llm_cost):
    """Caching lowers the cost per escalated message by 40% at OpenAI's and 60% at Anthropic's."""
    for name, figures in llm_cost["providers"].items():
        assert figures["meets_target"], (name, figures["reduction_with_caching"])
        assert figures["reduction_with_caching"] >= figures["target_reduction"], name
