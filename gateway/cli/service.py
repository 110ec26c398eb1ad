"""``tiergate worker`` and ``tiergate serve``: the long-running processes of a deployment."""

from __future__ import annotations

import os
import socket
from enum import StrEnum
from typing import Annotated

import typer

from tiergate.gateway.cli.errors import fail, guarded
from tiergate.workers.settings import Settings


class QueueName(StrEnum):
    """The two kinds of worker."""

    BERT = "bert"
    LLM = "llm"


def worker(
    queue: Annotated[QueueName, typer.Option(help="Which work this worker takes.")],
    concurrency: Annotated[
        int | None,
        typer.Option(
            min=1,
            help="Processes (bert; default TIERGATE_BERT_CONCURRENCY) or threads (llm; "
            "default TIERGATE_LLM_WORKER_THREADS).",
        ),
    ] = None,
    name: Annotated[str | None, typer.Option(help="Worker node name.")] = None,
    loglevel: Annotated[str, typer.Option(help="Celery's own log level.")] = "WARNING",
) -> None:
    """Run a Celery worker for the BERT queue (prefork) or the LLM queue (threads).

    A BERT worker starts ``concurrency`` processes, each with its own ONNX Runtime session
    created after the fork and cores / processes intra-op threads, and runs micro-batches. An
    LLM worker runs ``concurrency`` threads of LLM requests.
    """
    from tiergate.workers.tasks import create_celery_app  # noqa: PLC0415

    settings = Settings()
    if settings.broker_url is None:
        raise fail("a worker needs a broker: set TIERGATE_BROKER_URL (and TIERGATE_REDIS_URL)")
    if settings.redis_url is None:
        raise fail("a worker records decisions in Redis: set TIERGATE_REDIS_URL")
    if queue is QueueName.BERT:
        processes = concurrency or settings.bert_concurrency
        threads = max(1, (os.cpu_count() or 1) // processes)
        settings = settings.model_copy(update={"intra_op_threads": threads})
        pool, size, queue_name = "prefork", processes, settings.bert_queue
    else:
        pool, size, queue_name = (
            "threads",
            concurrency or settings.llm_worker_threads,
            settings.llm_queue,
        )
    celery = guarded(lambda: create_celery_app(settings))
    node = name or f"{queue.value}-{os.getpid()}@{socket.gethostname()}"
    celery.worker_main(
        [
            "worker",
            "--queues",
            queue_name,
            "--pool",
            pool,
            "--concurrency",
            str(size),
            "--hostname",
            node,
            "--loglevel",
            loglevel,
            "--without-gossip",
            "--without-mingle",
        ]
    )


def serve(
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=1, max=65535, help="Port to listen on.")] = 8000,
    workers: Annotated[int, typer.Option(min=1, help="uvicorn worker processes.")] = 1,
) -> None:
    """Run the HTTP gateway: embedded (the cascade in-process) or, with a broker, distributed."""
    import uvicorn  # noqa: PLC0415

    from tiergate.gateway.http import app_from_environment  # noqa: PLC0415

    if workers > 1:
        # Each process classifies with its share of the cores (unless told otherwise).
        cores = max(1, (os.cpu_count() or 1) // workers)
        os.environ.setdefault("TIERGATE_INTRA_OP_THREADS", str(cores))
        uvicorn.run(
            "tiergate.gateway.http:app_from_environment",
            factory=True,
            host=host,
            port=port,
            workers=workers,
            log_level="warning",
        )
        return
    application = guarded(app_from_environment)
    uvicorn.run(application, host=host, port=port, log_level="warning")
