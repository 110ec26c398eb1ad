"""Test doubles for users' own tests: a classifier whose scores are given, not computed.

``FixedScoreClassifier`` stands in for the BERT tier where a test wants to control the
confidence of each message (to exercise a policy's thresholds, the cache or the LLM tier)
without a model directory. The LLM side has its double in :mod:`tiergate.workers.llm.testing`: a
local server speaking the providers' wire formats.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping, Sequence

from tiergate.workers.schemas import Prediction


class FixedScoreClassifier:
    """Scores each text with the probabilities ``scores`` gives for it.

    ``scores`` maps a text to its probabilities (in ``labels`` order); a text it does not know
    gets ``default`` (uniform when unset). Counts the texts it was asked to score (``calls``,
    ``texts_scored``) so tests can check what reached the BERT tier.
    """

    def __init__(
        self,
        labels: Sequence[str],
        scores: Mapping[str, Sequence[float]] | Callable[[str], Sequence[float]] | None = None,
        *,
        multi_label: bool = False,
        default: Sequence[float] | None = None,
        model_version: str = "fixed-scores-1",
    ) -> None:
        self.labels = tuple(labels)
        self.multi_label = multi_label
        self._scores = scores if scores is not None else {}
        self._default = tuple(default) if default is not None else None
        self._version = model_version
        self._lock = threading.Lock()
        self.calls = 0
        self.texts_scored = 0

    @property
    def model_version(self) -> str:
        """The version stamped on every prediction."""
        return self._version

    def is_long(self, text: str) -> bool:
        """Texts of more than 1,000 characters are long (as for a model of ~250 tokens)."""
        return len(text) > 1000

    def predict(self, texts: Sequence[str]) -> list[Prediction]:
        """One prediction per text, in input order."""
        with self._lock:
            self.calls += 1
            self.texts_scored += len(texts)
        return [self._prediction(text) for text in texts]

    def _prediction(self, text: str) -> Prediction:
        if callable(self._scores):
            probabilities = tuple(self._scores(text))
        elif text in self._scores:
            probabilities = tuple(self._scores[text])
        elif self._default is not None:
            probabilities = self._default
        else:
            probabilities = tuple(1.0 / len(self.labels) for _ in self.labels)
        return Prediction(
            labels=self.labels,
            probabilities=probabilities,
            multi_label=self.multi_label,
            chunks=1,
            model_version=self._version,
        )
