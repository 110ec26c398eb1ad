"""Thresholds that travel with a model version: the policy a distilled candidate brings.

``tiergate distill`` re-calibrates the policy's thresholds for the candidate it trains and
writes them beside it as ``policy.yaml``; the LLM share its card reports holds only with those
thresholds. :class:`ModelThresholds` gives every serving process (BERT workers, LLM workers,
the embedded gateway, the CLI) the same answer to "which thresholds apply to this policy with
this model version": the version's own when it brings some for that policy and policy version,
the configured ones otherwise. A promotion therefore switches the thresholds with the model,
between two batches, and a rollback switches them back.
"""

from __future__ import annotations

import threading
from pathlib import Path

import structlog

from tiergate.policies.spec import PolicyError, PolicySpec, load_policy

log = structlog.get_logger(__name__)

POLICY_FILE = "policy.yaml"
CALIBRATED_MARK = "+cal."


def base_version(version: str) -> str:
    """A policy version without its calibration suffix (``v3+cal.1a2b`` -> ``v3``)."""
    return version.split(CALIBRATED_MARK, 1)[0]


class ModelThresholds:
    """The spec a policy is served with for a given model version.

    ``store`` is the model-version store (``<store>/<model_version>/policy.yaml``); ``None``
    (no store) always gives the configured spec. A version's policy file is read once per
    process; an unreadable one, or one written for another policy version, is logged and
    ignored (the configured thresholds apply). Safe to share between threads.
    """

    def __init__(self, store: Path | None) -> None:
        self._store = store
        self._carried: dict[str, PolicySpec | None] = {}
        self._lock = threading.Lock()

    def spec(self, configured: PolicySpec, model_version: str) -> PolicySpec:
        """``configured`` with the escalation ``model_version`` brings for it, if any.

        The result keeps everything else of ``configured`` (labels, providers, budget, cache)
        and takes the carried version (``<version>+cal.<digest>``), so decisions name the
        thresholds that made them.
        """
        carried = self._read(model_version)
        if (
            carried is None
            or carried.name != configured.name
            or base_version(carried.version) != base_version(configured.version)
            or carried.multi_label != configured.multi_label
        ):
            return configured
        return configured.with_escalation(carried.escalation, carried.version)

    def _read(self, model_version: str) -> PolicySpec | None:
        with self._lock:
            if model_version in self._carried:
                return self._carried[model_version]
        carried = None
        path = self._path(model_version)
        if path is not None and path.is_file():
            try:
                carried = load_policy(path)
            except PolicyError as exc:
                log.warning("model.policy_unreadable", model_version=model_version, error=str(exc))
        with self._lock:
            self._carried[model_version] = carried
        return carried

    def _path(self, model_version: str) -> Path | None:
        if self._store is None or "/" in model_version or model_version in {"", ".", ".."}:
            return None
        return self._store / model_version / POLICY_FILE
