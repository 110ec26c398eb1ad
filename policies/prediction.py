"""What the BERT tier says about one text, in the shape every policy reads."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, model_validator


class Prediction(BaseModel):
    """What the BERT tier says about one text: calibrated probabilities over its label set.

    ``probabilities[i]`` belongs to ``labels[i]``. For a single-label head they sum to 1 (a
    temperature-scaled softmax, averaged over windows); for a multi-label head each is an
    independent temperature-scaled sigmoid (the maximum over windows). ``chunks`` is the number
    of windows the text was split into (1 when it fit the model's window).
    """

    model_config = ConfigDict(frozen=True)

    labels: tuple[str, ...]
    probabilities: tuple[float, ...]
    multi_label: bool
    chunks: int = Field(ge=1)
    model_version: str

    @model_validator(mode="after")
    def _probabilities_match_labels(self) -> Prediction:
        if len(self.labels) != len(self.probabilities) or not self.labels:
            raise ValueError("labels and probabilities must be non-empty and of equal length")
        if not all(0.0 <= p <= 1.0 for p in self.probabilities):
            raise ValueError("probabilities must lie in [0, 1]")
        return self

    @property
    def top_label(self) -> str:
        """The label with the highest probability."""
        return self.labels[self._ranked[0]]

    @property
    def top_probability(self) -> float:
        """The highest calibrated probability."""
        return self.probabilities[self._ranked[0]]

    @property
    def margin(self) -> float:
        """Top probability minus the runner-up's (1.0 when there is a single label)."""
        ranked = self._ranked
        if len(ranked) < 2:
            return 1.0
        return self.probabilities[ranked[0]] - self.probabilities[ranked[1]]

    def scores(self) -> dict[str, float]:
        """Probabilities keyed by label."""
        return dict(zip(self.labels, self.probabilities, strict=True))

    def labels_above(self, threshold: float) -> list[str]:
        """Labels whose probability is at least ``threshold`` (multi-label flags)."""
        return [
            label
            for label, p in zip(self.labels, self.probabilities, strict=True)
            if p >= threshold
        ]

    @property
    def _ranked(self) -> list[int]:
        return sorted(range(len(self.probabilities)), key=lambda i: -self.probabilities[i])
