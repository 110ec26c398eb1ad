"""``tiergate demo``: the cascade on held-out real messages, with an LLM real or simulated."""

from __future__ import annotations

import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from importlib import resources
from pathlib import Path
from typing import Annotated

from pydantic import SecretStr
from rich.console import Console

from tiergate.gateway.cli.embedded import MODEL_OPTION, load_classifier, open_cascade_or_exit
from tiergate.gateway.cli.errors import err, guarded
from tiergate.gateway.cli.inputs import stream_items
from tiergate.gateway.cli.model import ensure_default_model
from tiergate.gateway.cli.output import decision_table
from tiergate.gateway.cli.tally import Tally, print_summary
from tiergate.workers.cascade import Cascade
from tiergate.workers.records import InputFormat
from tiergate.workers.schemas import Decision, Message, Tier
from tiergate.workers.settings import Settings


def demo(
    model: Annotated[Path | None, MODEL_OPTION] = None,
) -> None:
    """Run the cascade on held-out real messages: tier shares, LLM cost, and a cache hit.

    Builds the default model if needed, classifies a sample of held-out Rotten Tomatoes
    snippets with the default policy, then sends one of them again to show it answered from
    the decision cache. The cache is a scratch SQLite file, so every run starts cold.
    """
    settings = Settings()
    if model is None and settings.model_dir is None:
        ensure_default_model(settings, force=False)
    classifier = load_classifier(settings, model)
    classifier.warmup()
    messages = _sample_messages()
    with (
        tempfile.TemporaryDirectory(prefix="tiergate-demo-") as scratch,
        _demo_llm(settings, messages) as (llm_settings, llm_note),
    ):
        demo_settings = llm_settings.model_copy(
            update={"redis_url": None, "cache_path": Path(scratch) / "cache.sqlite3"}
        )
        cascade = open_cascade_or_exit(demo_settings, classifier)
        err.print(
            f"policy {cascade.policies.default.name!r} v{cascade.policies.default.version} · "
            f"LLM tier: {llm_note}",
            highlight=False,
            soft_wrap=True,
        )
        started = time.perf_counter()
        decisions = guarded(lambda: cascade.decide(messages))
        seconds = time.perf_counter() - started
        pairs = list(zip(messages, decisions, strict=True))
        Console().print(decision_table(pairs, expected=True))
        tally = Tally(read=len(decisions))
        for decision in decisions:
            tally.count(decision)
        correct = sum(str(m.metadata.get("label")) in d.labels for m, d in pairs)
        bert_correct = sum(
            str(m.metadata.get("label")) == max(d.scores, key=d.scores.__getitem__)
            for m, d in pairs
        )
        err.print(
            f"{correct}/{len(messages)} match the held-out label (BERT alone: {bert_correct}) · "
            f"{len(messages)} messages in {seconds * 1000:.0f} ms · model "
            f"{classifier.model_version}",
            highlight=False,
            soft_wrap=True,
        )
        print_summary(tally, seconds)
        _demo_cache_hit(cascade, pairs)


def _sample_messages() -> list[Message]:
    sample = resources.files("tiergate.gateway").joinpath("samples/held_out_reviews.jsonl")
    items = stream_items(
        sample.read_bytes(), InputFormat.JSONL, text_field="text", id_field="id", source="sample"
    )
    return [item for item in items if isinstance(item, Message)]


@contextmanager
def _demo_llm(settings: Settings, messages: Sequence[Message]) -> Iterator[tuple[Settings, str]]:
    """The LLM the demo uses: the configured provider, or a local simulated one.

    Without an API key the demo starts :class:`~tiergate.workers.llm.testing.FakeLLMServer` with a
    simulated LLM that gives each sample message its held-out label 95% of the time, and
    points the OpenAI provider at it: the real SDK and HTTP path, an imitation model.
    """
    if settings.openai_api_key is not None or settings.anthropic_api_key is not None:
        yield settings, "the configured LLM provider"
        return
    from tiergate.workers.llm.testing import FakeLLMServer, SimulatedLLM  # noqa: PLC0415

    gold = {m.text: str(m.metadata.get("label", "")) for m in messages}
    with FakeLLMServer(SimulatedLLM(gold, accuracy=0.95, seed=13)) as server:
        simulated = settings.model_copy(
            update={
                "openai_api_key": SecretStr("simulated"),
                "openai_base_url": server.openai_base_url,
            }
        )
        yield (
            simulated,
            (
                "a local simulated LLM (no API key is set: it answers the held-out label 95% of "
                "the time, through the real OpenAI SDK; set TIERGATE_OPENAI_API_KEY for a real one)"
            ),
        )


def _demo_cache_hit(cascade: Cascade, pairs: Sequence[tuple[Message, Decision]]) -> None:
    """Send one message again (as another id, spacing changed) and show the cache answer it."""
    escalated = [(m, d) for m, d in pairs if d.tier is Tier.LLM]
    original, first = (escalated or list(pairs))[0]
    again = Message(id=f"{original.id}-again", text=f"  {original.text}  ")
    started = time.perf_counter()
    repeat = guarded(lambda: cascade.decide([again]))[0]
    elapsed = (time.perf_counter() - started) * 1000.0
    source = (
        f"from the cache (first decided by the {first.tier.value.upper()} tier; nothing recomputed)"
        if repeat.cached
        else "again, not from the cache"
    )
    err.print(
        f"repeated {original.id!r} as {again.id!r}: label {repeat.label!r}, answered {source} "
        f"in {elapsed:.1f} ms",
        highlight=False,
        soft_wrap=True,
    )
