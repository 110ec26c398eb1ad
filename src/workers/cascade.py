"""The cascade: the one code path that turns messages into decisions, wherever it runs.

The CLI, the HTTP gateway (embedded mode) and the Celery workers all call :class:`Cascade`. In
this version the BERT tier answers every message with its top label (``Reason.BERT_ONLY``);
policies, the LLM tier and the decision cache plug in here.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Protocol

from workers.schemas import Decision, Message, Prediction, Reason, Tier

MULTI_LABEL_THRESHOLD = 0.5


class Classifier(Protocol):
    """A tier that scores texts: one calibrated prediction per text, in input order."""

    def predict(self, texts: Sequence[str]) -> list[Prediction]:
        """Score ``texts``; raise :class:`~workers.errors.InputError` for an unusable text."""
        ...


class Cascade:
    """Decides a batch of messages with the tiers it holds."""

    def __init__(self, classifier: Classifier) -> None:
        self.classifier = classifier

    def decide(self, messages: Sequence[Message]) -> list[Decision]:
        """One decision per message, in input order; the BERT tier runs once for the batch."""
        if not messages:
            return []
        started = time.perf_counter()
        predictions = self.classifier.predict([m.text for m in messages])
        bert_ms = (time.perf_counter() - started) * 1000.0
        return [
            _bert_decision(message, prediction, bert_ms)
            for message, prediction in zip(messages, predictions, strict=True)
        ]


def _bert_decision(message: Message, prediction: Prediction, bert_ms: float) -> Decision:
    if prediction.multi_label:
        labels = prediction.labels_above(MULTI_LABEL_THRESHOLD)
        label = None
    else:
        label = prediction.top_label
        labels = [label]
    return Decision(
        id=message.id,
        label=label,
        labels=labels,
        scores=prediction.scores(),
        tier=Tier.BERT,
        reason=Reason.BERT_ONLY,
        chunks=prediction.chunks,
        model_version=prediction.model_version,
        policy=message.policy,
        timings_ms={"bert": round(bert_ms, 3)},
        metadata=dict(message.metadata),
    )
