"""What every tiergate benchmark shares.

Reading the held-out split, sampling it, describing the machine, and failing with a one-line
message.

The benchmarks run as scripts (``python bench/<name>.py``), so this module is imported by its
plain name from the scripts' own folder.
"""

from __future__ import annotations

import json
import os
import platform
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import redis
from rich.console import Console

T = TypeVar("T")

_err = Console(stderr=True)


def fail(message: str) -> NoReturn:
    """Print ``message`` as an error and exit with status 1."""
    _err.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    raise SystemExit(1)


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
        fail(f"{path} holds no messages; rebuild it with `tiergate model build-default --force`")
    chosen = evenly_spaced(records, limit)
    return HeldOut(
        ids=[str(record["id"]) for record in chosen],
        texts=[record["text"] for record in chosen],
        labels=[record["label"] for record in chosen],
    )


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
