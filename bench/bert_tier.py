"""Benchmark: tiergate's BERT tier against a plain Hugging Face pipeline on the same model.

What is measured, on the default model's held-out test split (real Rotten Tomatoes snippets
that training never saw; every message by default):

* throughput in messages per second of the baseline, ``transformers.pipeline(
  "text-classification")`` in torch fp32 on the CPU, at each of batch sizes 1, 8 and 32, and of
  the candidate, ``BertClassifier.predict`` over the whole list (the tier batches internally,
  sorted by length);
* accuracy of each against the gold labels (the pipeline's top label, ``Prediction.top_label``);
* the candidate's batch-1 latency (``predict([text])`` one message at a time), p50 and p99;
* the candidate's peak RSS in a fresh interpreter that imports only the BERT tier, loads the
  model and classifies messages; it fails if torch or transformers got imported.

``--limit N`` takes N messages spread evenly over the split (not its first N: the file lists
every synopsis, the longest messages, first). The ONNX model the tier serves is the int8 export
of the checkpoint, so the accuracy comparison includes what quantization costs.

``--model-dir`` and ``--test-split`` point it at another model (trained with its checkpoint,
as ``tiergate train`` keeps it) and its held-out split. ``--quick`` checks that the benchmark
works in about a minute (100 messages, one run, small warm-up, latency and RSS samples),
writes the same JSON to a temporary folder, and measures nothing worth publishing.

Why the comparison is fair:

* one fine-tuned model: the baseline loads the checkpoint that ``tiergate model build-default``
  saved next to the ONNX file exported from it, and the labels must match;
* the same messages in the same order for both, and the same warm-up before any timing;
* runs are interleaved (baseline, candidate, baseline, ...), so a noisy neighbour or a
  frequency change hits both alike, and the figures are medians with their spread;
* the baseline is credited with its best batch size, and it reads at most the model's window
  (``--baseline-max-length``, by default the window it was fine-tuned on, 128 tokens), which
  is never more work than the tier does: the tier reads every token of a longer message in
  overlapping windows;
* each side keeps its own defaults for threads (torch's ``get_num_threads()``, and tiergate's
  ``Settings().intra_op_threads``, the CPU count); both are recorded.

Run ``tiergate model build-default`` first; ``make bench-bert`` does both.
"""

from __future__ import annotations

import argparse
import gc
import json
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console
from rich.table import Table
from transformers import TextClassificationPipeline, pipeline
from transformers import logging as transformers_logging

from measurement import (
    BenchmarkOptions,
    Spread,
    accuracy,
    evenly_spaced,
    fail,
    machine,
    model_and_split,
    note,
    provenance,
    read_test_split,
    require,
    write_results,
)
from tiergate.workers.bert.classifier import BertClassifier
from tiergate.workers.bert.manifest import package_versions
from tiergate.workers.bert.train import CHECKPOINT_DIR
from tiergate.workers.settings import Settings

BASELINE_BATCH_SIZES = (1, 8, 32)
TARGETS = {"speedup": 2.5, "accuracy_gap_points": 0.5, "rss_mb": 400}
# What --quick changes: every part runs. The pipeline is the slow part, slowest on shared cores.
QUICK = {"limit": 100, "runs": 1, "warmup": 8, "latency_sample": 30, "rss_messages": 50}

# Runs in a fresh interpreter, so the peak RSS is the BERT tier's alone and any import of torch
# or transformers on its path is caught. argv: the model directory; stdin: a JSON list of texts.
#
# The peak is read from VmHWM (the high-water mark of this process's own address space) where
# Linux has it. ru_maxrss is also reported, but it cannot be the headline: on Linux a child's
# ru_maxrss starts at its parent's peak (exec records the high-water mark of the image it
# replaces), so under this benchmark, whose process holds torch and the pipeline, it reads as
# the parent's RSS, not the tier's.
RSS_PROBE = """
import json, resource, sys
from pathlib import Path

from tiergate.workers.bert.classifier import BertClassifier
from tiergate.workers.settings import Settings

model_dir = Path(sys.argv[1])
texts = json.load(sys.stdin)
classifier = BertClassifier.from_settings(Settings(), model_dir)
predictions = classifier.predict(texts)
leaked = sorted(name for name in ("torch", "transformers") if name in sys.modules)
if leaked:
    sys.exit(f"the BERT tier imported {', '.join(leaked)}: it must run on onnxruntime alone")
ru_maxrss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
try:
    status = Path("/proc/self/status").read_text().splitlines()
    vm_hwm = next(line for line in status if line.startswith("VmHWM:"))
    peak_mb, source = int(vm_hwm.split()[1]) / 1024, "VmHWM"
except (OSError, StopIteration):
    peak_mb, source = ru_maxrss_mb, "ru_maxrss"
print(json.dumps({
    "messages": len(predictions),
    "peak_rss_mb": peak_mb,
    "source": source,
    "ru_maxrss_mb": ru_maxrss_mb,
}))
"""


out = Console()


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """The command-line options."""
    options = BenchmarkOptions("bert_tier", __doc__.split("\n\n")[0], QUICK)
    parser = options.parser
    parser.add_argument("--runs", type=int, default=3, help="interleaved timed runs (default 3)")
    parser.add_argument(
        "--limit", type=int, help="use N test messages, spread evenly over the split"
    )
    parser.add_argument(
        "--warmup",
        type=int,
        default=64,
        help="messages each side classifies (at every batch size) before timing (default 64)",
    )
    parser.add_argument(
        "--latency-sample", type=int, default=300, help="messages timed one at a time (default 300)"
    )
    parser.add_argument(
        "--rss-messages", type=int, default=1000, help="messages the RSS probe classifies"
    )
    parser.add_argument(
        "--baseline-max-length",
        type=int,
        help="tokens the pipeline reads before truncating (default: the model's window)",
    )
    args = options.parse(argv)
    for option in ("runs", "limit", "warmup", "latency_sample", "rss_messages"):
        value = getattr(args, option)
        if value is not None and value < 1:
            parser.error(f"--{option.replace('_', '-')} must be at least 1")
    return args


def timed(call: Callable[[], list[str]]) -> tuple[float, list[str]]:
    """Seconds ``call`` took (after a garbage collection, so none lands inside) and its result."""
    gc.collect()
    started = time.perf_counter()
    result = call()
    return time.perf_counter() - started, result


@dataclass(frozen=True)
class Timings:
    """Throughputs (messages per second) of every timed run, and the labels of the last run."""

    baseline_rates: dict[int, list[float]]  # batch size -> one rate per run
    candidate_rates: list[float]
    baseline_labels: dict[int, list[str]]  # batch size -> labels
    candidate_labels: list[str]


def interleaved_runs(
    run_baseline: Callable[[Sequence[str], int], list[str]],
    run_candidate: Callable[[Sequence[str]], list[str]],
    texts: Sequence[str],
    runs: int,
) -> Timings:
    """Time ``runs`` rounds of: the baseline at each batch size, then the candidate."""
    baseline_rates: dict[int, list[float]] = {size: [] for size in BASELINE_BATCH_SIZES}
    baseline_labels: dict[int, list[str]] = {}
    candidate_rates: list[float] = []
    candidate_labels: list[str] = []
    for run in range(1, runs + 1):
        for batch_size in BASELINE_BATCH_SIZES:
            seconds, baseline_labels[batch_size] = timed(partial(run_baseline, texts, batch_size))
            baseline_rates[batch_size].append(len(texts) / seconds)
        seconds, candidate_labels = timed(lambda: run_candidate(texts))
        candidate_rates.append(len(texts) / seconds)
        per_size = ", ".join(f"bs {s} {baseline_rates[s][-1]:.0f}" for s in BASELINE_BATCH_SIZES)
        note(f"run {run}/{runs}, msg/s: pipeline {per_size} · tiergate {candidate_rates[-1]:.0f}")
    return Timings(baseline_rates, candidate_rates, baseline_labels, candidate_labels)


def batch1_latencies_ms(
    classifier: BertClassifier, texts: Sequence[str], count: int
) -> list[float]:
    """Milliseconds of ``predict([text])`` for ``count`` messages spread evenly over ``texts``."""
    latencies = []
    for text in evenly_spaced(texts, count):
        started = time.perf_counter()
        classifier.predict([text])
        latencies.append((time.perf_counter() - started) * 1000)
    return latencies


def measure_rss(model_dir: Path, texts: Sequence[str]) -> dict[str, Any]:
    """Classify ``texts`` in a fresh interpreter (:data:`RSS_PROBE`); fail if it imports torch."""
    probe = subprocess.run(
        [sys.executable, "-c", RSS_PROBE, str(model_dir)],
        input=json.dumps(list(texts)),
        capture_output=True,
        text=True,
        check=False,
    )
    if probe.returncode != 0:
        fail(f"the RSS probe failed (exit {probe.returncode}):\n{probe.stderr.strip()}")
    return dict(json.loads(probe.stdout.strip().splitlines()[-1]))


def load_baseline(checkpoint: Path, labels: tuple[str, ...]) -> TextClassificationPipeline:
    """The baseline pipeline on ``checkpoint``, whose labels must be ``labels``, in order."""
    # transformers' logging helpers carry no annotations.
    transformers_logging.set_verbosity_error()  # type: ignore[no-untyped-call]
    transformers_logging.disable_progress_bar()  # type: ignore[no-untyped-call]
    baseline = pipeline(
        "text-classification", model=str(checkpoint), device=-1, dtype=torch.float32
    )
    # A saved config's id2label may come back keyed by strings; the label of class i is wanted.
    by_id = {int(key): str(name) for key, name in (baseline.model.config.id2label or {}).items()}
    checkpoint_labels = tuple(by_id.get(i, f"<class {i}>") for i in range(len(labels)))
    if checkpoint_labels != labels:
        fail(f"{checkpoint} has labels {checkpoint_labels}, the ONNX model {labels}")
    return baseline


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark, print the table and write the JSON; return the exit status."""
    args = parse_args(argv)
    settings = Settings()
    model_dir, test_path = model_and_split(args, settings)
    checkpoint = model_dir / CHECKPOINT_DIR
    require(checkpoint / "config.json")
    split = read_test_split(test_path, args.limit)
    machine_info = machine()  # before the benchmark adds its own load

    candidate = BertClassifier.from_settings(settings, model_dir)
    baseline = load_baseline(checkpoint, candidate.labels)
    tokenizer = baseline.tokenizer
    if tokenizer is None:
        fail(f"the pipeline found no tokenizer in {checkpoint}")
    unknown_gold = set(split.labels) - set(candidate.labels)
    if unknown_gold:
        fail(f"{test_path} has labels the model lacks: {sorted(unknown_gold)}")
    max_length = args.baseline_max_length or candidate.manifest.max_length

    def run_baseline(texts: Sequence[str], batch_size: int) -> list[str]:
        outputs = baseline(
            list(texts), batch_size=batch_size, truncation=True, max_length=max_length
        )
        return [output["label"] for output in outputs]

    def run_candidate(texts: Sequence[str]) -> list[str]:
        return [prediction.top_label for prediction in candidate.predict(texts)]

    texts = split.texts
    note(
        f"{len(texts)} messages from {test_path} · model {candidate.model_version} · "
        f"{args.runs} interleaved runs · torch threads {torch.get_num_threads()}, "
        f"onnxruntime intra-op threads {settings.intra_op_threads}"
    )
    warmup = texts[: args.warmup]
    for batch_size in BASELINE_BATCH_SIZES:
        run_baseline(warmup, batch_size)
    candidate.warmup()
    run_candidate(warmup)

    timings = interleaved_runs(run_baseline, run_candidate, texts, args.runs)
    baseline_rates, candidate_rates = timings.baseline_rates, timings.candidate_rates
    baseline_labels, candidate_labels = timings.baseline_labels, timings.candidate_labels

    baseline_spreads = {size: Spread.of(rates) for size, rates in baseline_rates.items()}
    best_size = max(BASELINE_BATCH_SIZES, key=lambda size: baseline_spreads[size].median)
    baseline_spread = baseline_spreads[best_size]
    candidate_spread = Spread.of(candidate_rates)
    speedup = candidate_spread.median / baseline_spread.median
    baseline_accuracy = accuracy(baseline_labels[best_size], split.labels)
    candidate_accuracy = accuracy(candidate_labels, split.labels)
    gap_points = (baseline_accuracy - candidate_accuracy) * 100

    latencies_ms = batch1_latencies_ms(candidate, texts, args.latency_sample)
    p50, p99 = (float(v) for v in np.percentile(latencies_ms, [50, 99]))

    rss = measure_rss(model_dir, evenly_spaced(texts, args.rss_messages))
    rss_mb = float(rss["peak_rss_mb"])

    windows = candidate.encode(texts).counts
    token_counts = [len(ids) for ids in tokenizer(texts)["input_ids"]]
    results: dict[str, Any] = {
        "baseline_msgs_per_s": round(baseline_spread.median, 2),
        "tiergate_msgs_per_s": round(candidate_spread.median, 2),
        "speedup": round(speedup, 3),
        "baseline_accuracy": round(baseline_accuracy, 5),
        "tiergate_accuracy": round(candidate_accuracy, 5),
        "accuracy_gap_points": round(gap_points, 3),
        "tiergate_p50_ms_batch1": round(p50, 3),
        "tiergate_p99_ms_batch1": round(p99, 3),
        "tiergate_rss_mb": round(rss_mb, 1),
        "targets": TARGETS,
        "meets_targets": {
            "speedup": speedup >= TARGETS["speedup"],
            "accuracy_gap_points": gap_points <= TARGETS["accuracy_gap_points"],
            "rss_mb": rss_mb <= TARGETS["rss_mb"],
        },
        "messages": len(texts),
        "runs": args.runs,
        "warmup_messages": len(warmup),
        "test_split": str(test_path),
        "model_dir": str(model_dir),
        "model_version": candidate.model_version,
        "baseline": {
            "what": "transformers.pipeline('text-classification'), torch fp32, CPU",
            "checkpoint": str(checkpoint),
            "best_batch_size": best_size,
            "msgs_per_s": baseline_spread.as_dict(),
            "per_run_msgs_per_s": [round(rate, 2) for rate in baseline_rates[best_size]],
            "per_batch_size": {
                str(size): {
                    **baseline_spreads[size].as_dict(),
                    "per_run": [round(rate, 2) for rate in baseline_rates[size]],
                    "accuracy": round(accuracy(baseline_labels[size], split.labels), 5),
                }
                for size in BASELINE_BATCH_SIZES
            },
            "truncation_max_length": max_length,
            "truncated_messages": sum(length > max_length for length in token_counts),
            "torch_threads": torch.get_num_threads(),
            # transformers exposes the attention kernel it picked (sdpa, eager) only here
            "attn_implementation": baseline.model.config._attn_implementation,
        },
        "tiergate": {
            "what": "BertClassifier.predict(texts), ONNX Runtime, CPU",
            "msgs_per_s": candidate_spread.as_dict(),
            "per_run_msgs_per_s": [round(rate, 2) for rate in candidate_rates],
            "window_tokens": candidate.manifest.max_length,
            "multi_window_messages": sum(count > 1 for count in windows),
            "windows": sum(windows),
            "intra_op_threads": settings.intra_op_threads,
            "inter_op_threads": settings.inter_op_threads,
            "batch_size": settings.batch_size,
            "latency_sample": len(latencies_ms),
            "rss_probe": rss,
        },
        "top_label_agreement": round(accuracy(candidate_labels, baseline_labels[best_size]), 5),
        "machine": machine_info,
        "versions": package_versions(),
        **provenance(args),
    }
    write_results(args.output, results)
    out.print(results_table(results))
    out.print(f"results written to {args.output}", highlight=False, soft_wrap=True)
    return 0


def results_table(results: dict[str, Any]) -> Table:
    """The headline figures, each beside its target."""
    baseline, tiergate, met = results["baseline"], results["tiergate"], results["meets_targets"]
    targets = results["targets"]

    def rate(spread: dict[str, float]) -> str:
        return f"{spread['median']:.1f} ({spread['min']:.1f}-{spread['max']:.1f})"

    def verdict(name: str) -> str:
        return "[green]yes[/]" if met[name] else "[red]no[/]"

    table = Table(
        title=f"{results['messages']} messages, median (min-max) of {results['runs']} runs",
        header_style="bold",
    )
    table.add_column("measure")
    table.add_column(f"pipeline (bs {baseline['best_batch_size']})", justify="right")
    table.add_column("tiergate", justify="right")
    table.add_column("target", justify="right")
    table.add_column("met", justify="center")
    table.add_row(
        "msg/s",
        rate(baseline["msgs_per_s"]),
        rate(tiergate["msgs_per_s"]),
        f">= {targets['speedup']}x",
        verdict("speedup"),
    )
    table.add_row("speedup", "1.00x", f"{results['speedup']:.2f}x", "", "")
    for size, spread in baseline["per_batch_size"].items():
        table.add_row(f"  at batch size {size}", rate(spread), "", "", "")
    table.add_row(
        "accuracy",
        f"{results['baseline_accuracy']:.2%}",
        f"{results['tiergate_accuracy']:.2%}",
        f"gap <= {targets['accuracy_gap_points']}",
        verdict("accuracy_gap_points"),
    )
    table.add_row(
        "batch-1 p50/p99 ms",
        "",
        f"{results['tiergate_p50_ms_batch1']:.1f} / {results['tiergate_p99_ms_batch1']:.1f}",
        "",
        "",
    )
    table.add_row(
        "peak RSS MB, no torch",
        "",
        f"{results['tiergate_rss_mb']:.0f}",
        f"<= {targets['rss_mb']}",
        verdict("rss_mb"),
    )
    table.add_row(
        "threads",
        f"torch {baseline['torch_threads']}",
        f"onnxruntime {tiergate['intra_op_threads']}",
        "",
        "",
    )
    table.add_row(
        "tokens read",
        f"first {baseline['truncation_max_length']}",
        f"all, {tiergate['window_tokens']}-token windows",
        "",
        "",
    )
    return table


if __name__ == "__main__":
    sys.exit(main())
