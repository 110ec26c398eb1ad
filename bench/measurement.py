"""What every tiergate benchmark shares.

The options every benchmark takes (``--quick``, ``--model-dir``, ``--test-split``,
``--output``), reading and sampling the held-out split, the figures they all report (accuracy,
spreads, latency percentiles), throw-away Redis key prefixes, describing the machine, writing
the results, and failing with a one-line message.

The benchmarks run as scripts (``python bench/<name>.py``), so this module is imported by its
plain name from the scripts' own folder.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import platform
import shlex
import statistics
import sys
import tempfile
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import numpy as np
import redis
from rich.console import Console

from tiergate.workers.bert.default_model import DATASET_NAME
from tiergate.workers.bert.manifest import MANIFEST_FILE
from tiergate.workers.settings import Settings

T = TypeVar("T")

# The published figures; a quick run never writes here.
RESULTS_DIR = Path(__file__).resolve().parent / "results"
QUICK_RESULTS_DIR = Path(tempfile.gettempdir()) / "tiergate-bench-quick"

_err = Console(stderr=True)


def fail(message: str) -> NoReturn:
    """Print ``message`` as an error and exit with status 1."""
    _err.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    raise SystemExit(1)


def note(message: str) -> None:
    """Progress on standard error."""
    _err.print(message, highlight=False, soft_wrap=True)


# ---------------------------------------------------------------------------------- options


class BenchmarkOptions:
    """The command line of one benchmark: the options all share, plus its own on ``parser``.

    Shared: ``--model-dir`` (default: ``Settings().resolved_model_dir``), ``--test-split`` (a
    held-out ``{"id", "text", "label"}`` JSONL file; default: the default model's test split),
    ``--output`` and ``--quick``. ``--quick`` runs the same code paths on fewer messages with
    fewer repeats: it changes the defaults in ``quick`` (options given explicitly still win) and
    writes its JSON under a temporary folder, never under ``bench/results``.
    """

    def __init__(
        self,
        name: str,
        description: str,
        quick: Mapping[str, object],
        *,
        test_split_default: str = "the default model's test split",
        model_dir_help: str = "model directory (default: Settings().resolved_model_dir)",
    ) -> None:
        self.name = name
        self.quick = dict(quick)
        self.parser = argparse.ArgumentParser(description=description)
        changes = ", ".join(
            f"--{option.replace('_', '-')} {value}" for option, value in self.quick.items()
        )
        self.parser.add_argument(
            "--quick",
            action="store_true",
            help=f"a quick check that the benchmark works, not a measurement: {changes}; "
            f"results under {QUICK_RESULTS_DIR}",
        )
        self.parser.add_argument("--model-dir", type=Path, help=model_dir_help)
        self.parser.add_argument(
            "--test-split",
            type=Path,
            help=f'held-out messages, JSONL of {{"id", "text", "label"}} (default: '
            f"{test_split_default})",
        )
        self.parser.add_argument(
            "--output",
            type=Path,
            help=f"JSON results (default {RESULTS_DIR / f'{name}.json'})",
        )

    def parse(self, argv: Sequence[str] | None) -> argparse.Namespace:
        """Parse ``argv`` with the quick defaults when ``--quick`` is given; fill in ``output``."""
        args = self.parser.parse_args(argv)
        if args.quick:
            self.parser.set_defaults(**self.quick)
            args = self.parser.parse_args(argv)
        if args.output is None:
            args.output = (QUICK_RESULTS_DIR if args.quick else RESULTS_DIR) / f"{self.name}.json"
        if args.quick:
            self.refuse_results_dir(args.output)
        return args

    def refuse_results_dir(self, path: Path) -> None:
        """Exit with a usage error if a quick run would write ``path`` under ``bench/results``."""
        if path.resolve().is_relative_to(RESULTS_DIR):
            self.parser.error(f"--quick never writes under {RESULTS_DIR} (asked for {path})")


def default_test_split(settings: Settings) -> Path:
    """The default model's held-out test split, as ``tiergate model build-default`` writes it."""
    return settings.data_dir / "datasets" / DATASET_NAME / "test.jsonl"


def model_and_split(args: argparse.Namespace, settings: Settings) -> tuple[Path, Path]:
    """The model directory and test split ``args`` name (else the defaults); both must exist."""
    model_dir: Path = args.model_dir or settings.resolved_model_dir
    test_split: Path = args.test_split or default_test_split(settings)
    require(model_dir / MANIFEST_FILE, test_split)
    return model_dir, test_split


def require(*paths: Path) -> None:
    """Fail unless every one of ``paths`` is a file."""
    for path in paths:
        if not path.is_file():
            fail(
                f"{path} is missing: build the default model with `tiergate model build-default`, "
                "or point --model-dir and --test-split at a model and its held-out split"
            )


# ---------------------------------------------------------------------------------- messages


@dataclass(frozen=True)
class HeldOut:
    """Held-out messages, their ids and gold labels, in file order."""

    ids: list[str]
    texts: list[str]
    labels: list[str]


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The records of a ``{"id", "text", "label"}`` JSONL file."""
    with path.open(encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def evenly_spaced(items: Sequence[T], count: int | None) -> list[T]:
    """``count`` items spread evenly over ``items``, in order (all when there are fewer or None).

    The splits are not shuffled (their synopses, the longest messages, come first), so a prefix
    would not have a split's mix of lengths and labels; a spread-out subset does.
    """
    if count is None or count >= len(items):
        return list(items)
    return [items[i * len(items) // count] for i in range(count)]


def read_test_split(path: Path, limit: int | None) -> HeldOut:
    """``limit`` (default: all) messages of a ``{"id", "text", "label"}`` JSONL file."""
    records = read_jsonl(path)
    if not records:
        fail(f"{path} holds no messages")
    chosen = evenly_spaced(records, limit)
    return HeldOut(
        ids=[str(record["id"]) for record in chosen],
        texts=[record["text"] for record in chosen],
        labels=[record["label"] for record in chosen],
    )


def batches(count: int, size: int) -> Iterator[slice]:
    """Consecutive slices of at most ``size`` covering ``range(count)``."""
    for start in range(0, count, size):
        yield slice(start, min(start + size, count))


# ---------------------------------------------------------------------------------- figures


def accuracy(predicted: Sequence[str | None], gold: Sequence[str]) -> float:
    """The fraction of labels that match."""
    return sum(p == g for p, g in zip(predicted, gold, strict=True)) / len(gold)


@dataclass(frozen=True)
class Spread:
    """The median of repeated measurements and their range."""

    median: float
    low: float
    high: float

    @classmethod
    def of(cls, values: Sequence[float]) -> Spread:
        """Summarize ``values`` (at least one)."""
        return cls(statistics.median(values), min(values), max(values))

    def as_dict(self, digits: int = 2) -> dict[str, float]:
        """The JSON form, rounded for reading."""
        return {
            "median": round(self.median, digits),
            "min": round(self.low, digits),
            "max": round(self.high, digits),
        }


def percentiles_ms(seconds: Sequence[float]) -> dict[str, float]:
    """p50, p90, p99 and the maximum of ``seconds`` (at least one), in milliseconds."""
    p50, p90, p99 = (float(v) * 1000 for v in np.percentile(seconds, [50, 90, 99]))
    return {
        "p50_ms": round(p50, 3),
        "p90_ms": round(p90, 3),
        "p99_ms": round(p99, 3),
        "max_ms": round(max(seconds) * 1000, 3),
    }


# ---------------------------------------------------------------------------------- Redis keys


@contextlib.contextmanager
def key_prefixes(family: str, redis_urls: Sequence[str]) -> Iterator[Callable[[str], str]]:
    """Hand out random key prefixes; afterwards delete every key naming one, at each URL.

    A prefix is ``tiergate-bench-<family>-<purpose>-<random>``. Keys are matched anywhere in
    their name (``*prefix*``), which also catches a Celery broker's queue lists and kombu
    binding keys named after a run's queues.
    """
    made: list[str] = []

    def new(purpose: str) -> str:
        prefix = f"tiergate-bench-{family}-{purpose}-{uuid.uuid4().hex[:10]}"
        made.append(prefix)
        return prefix

    try:
        yield new
    finally:
        for url in redis_urls:
            client = redis.Redis.from_url(url)
            for prefix in made:
                keys = list(client.scan_iter(match=f"*{prefix}*", count=1000))
                if keys:
                    client.delete(*keys)
            client.close()


# ---------------------------------------------------------------------------------- results


def machine(client: redis.Redis | None = None) -> dict[str, Any]:
    """Where the numbers come from (with the Redis server's version when one is used)."""
    info: dict[str, Any] = {
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "python": platform.python_version(),
    }
    if client is not None:
        info["redis_server"] = client.info("server").get("redis_version")
    info["load_average_at_start"] = [round(load, 2) for load in os.getloadavg()]
    return info


def provenance(args: argparse.Namespace) -> dict[str, Any]:
    """How the results were made: quick or not, the command line, and when."""
    return {
        "quick": args.quick,
        "command": shlex.join(sys.orig_argv),
        "timestamp": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    }


def write_results(path: Path, results: Mapping[str, Any]) -> None:
    """Write ``results`` as indented JSON to ``path`` (its folders are created)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
