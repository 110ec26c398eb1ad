"""The BERT tier as served: the promoted model version, switched between two batches.

Every process that serves (each Celery BERT worker process, each embedded gateway process, the
CLI cascade) holds a :class:`ServingClassifier`. Before each batch the cascade asks it for the
classifier of that batch (:meth:`ServingClassifier.for_batch`); at most once every
``settings.model_check_interval_s`` this reads the shared pointer (one Redis GET, or one stat of
the pointer file) and, when another version was promoted or rolled back to, loads it (manifest
and file hashes verified) and serves it from that batch on. A batch already running finishes on
the model it started with: the cascade takes one snapshot per batch for its cache keys and its
predictions, so every decision names the model that made it and the cache never serves one
model's decision as another's.

A version whose labels or head differ from the model the process started with (the served
policies were checked against that one) is refused: ``model.switch_refused`` is logged and the
old model keeps serving. So is a version that cannot be loaded (``model.switch_failed``). The
shadow candidate is loaded the same way and scored by :class:`~tiergate.workers.bert.shadow.
ShadowScoring`.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import structlog

from tiergate.workers.bert.calibrated import ModelThresholds
from tiergate.workers.bert.classifier import BertClassifier
from tiergate.workers.bert.manifest import ModelManifest
from tiergate.workers.bert.scheduling import StepScheduler
from tiergate.workers.bert.shadow import ShadowScoring, ShadowTally, open_shadow_tally
from tiergate.workers.bert.versions import ModelVersions, Pointers, labels_mismatch
from tiergate.workers.errors import CoordinationError, ModelError, ModelVersionError
from tiergate.workers.schemas import Prediction
from tiergate.workers.settings import Settings

log = structlog.get_logger(__name__)

Loader = Callable[[Path], BertClassifier]
# The change token before the pointer could be read: equal to no token a store gives.
_UNREAD = object()


class ServingClassifier:
    """A classifier that follows the deployment's model pointer, switching between batches.

    Implements the cascade's ``SwitchingClassifier``: :meth:`for_batch` gives the classifier
    for one whole batch; ``predict`` and the other ``Classifier`` members use the model serving
    now. Thread-safe: one thread checks the pointer (and loads a new version) while the others
    carry on with the model they have.
    """

    def __init__(
        self,
        versions: ModelVersions,
        load: Loader,
        *,
        check_interval_s: float = 1.0,
        shadow_tally: ShadowTally | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.versions = versions
        self.check_interval_s = check_interval_s
        self.shadow_tally = shadow_tally
        self._load = load
        self._clock = clock
        self._refreshing = threading.Lock()
        self._token, pointers = self._read_pointers()
        self._live = load(self._directory(pointers.current))
        self._started_with: ModelManifest = self._live.manifest
        self._shadow: BertClassifier | None = None
        self._switch_shadow(pointers.shadow)
        self._checked_at = clock()

    @classmethod
    def from_settings(
        cls, settings: Settings, scheduler: StepScheduler | None = None
    ) -> ServingClassifier:
        """The versions, thread counts, check interval and shadow tally ``settings`` give."""

        def load(directory: Path) -> BertClassifier:
            return BertClassifier.from_settings(settings, directory, scheduler=scheduler)

        return cls(
            ModelVersions.from_settings(settings),
            load,
            check_interval_s=settings.model_check_interval_s,
            shadow_tally=open_shadow_tally(settings),
        )

    # ------------------------------------------------------------ the Classifier protocol

    @property
    def model_version(self) -> str:
        """The version serving now."""
        return self._live.model_version

    @property
    def labels(self) -> tuple[str, ...]:
        """The serving model's labels (the same for every version it may switch to)."""
        return self._live.labels

    @property
    def manifest(self) -> ModelManifest:
        """The serving model's manifest."""
        return self._live.manifest

    def predict(self, texts: Sequence[str]) -> list[Prediction]:
        """Predictions of the model serving now (the cascade uses :meth:`for_batch`)."""
        return self._live.predict(texts)

    def is_long(self, text: str) -> bool:
        """Whether ``text`` takes more than one window of the serving model."""
        return self._live.is_long(text)

    def warmup(self) -> None:
        """Warm the serving model up (and the candidate, when there is one)."""
        self._live.warmup()
        if self._shadow is not None:
            self._shadow.warmup()

    # ------------------------------------------------------------ switching

    def for_batch(self) -> BertClassifier:
        """The classifier for one whole batch, after checking (when due) for a new version."""
        if self._clock() - self._checked_at >= self.check_interval_s:
            self.refresh()
        return self._live

    @property
    def candidate(self) -> BertClassifier | None:
        """The shadow candidate's classifier, or ``None`` while there is none."""
        return self._shadow

    def shadow_scorer(self) -> ShadowScoring | None:
        """The cascade's shadow hook over this classifier's candidate (``None``: no tally)."""
        if self.shadow_tally is None:
            return None
        return ShadowScoring(
            lambda: self._shadow, self.shadow_tally, ModelThresholds(self.versions.store)
        )

    def refresh(self) -> None:
        """Read the pointer now; switch to another current or candidate version if it moved.

        Skipped when another thread is already at it. An unreachable Redis keeps the model
        serving (``model.check_failed``) and is tried again at the next check.
        """
        if not self._refreshing.acquire(blocking=False):
            return
        try:
            self._checked_at = self._clock()
            try:
                token = self.versions.pointers.token()
                if token == self._token:
                    return
                pointers = self.versions.pointers.read()
            except CoordinationError as exc:
                log.warning("model.check_failed", error=str(exc))
                return
            self._token = token
            self._switch_live(pointers)
            self._switch_shadow(pointers.shadow)
        finally:
            self._refreshing.release()

    def _read_pointers(self) -> tuple[object, Pointers]:
        """The pointer's change token and value at startup.

        With Redis unreachable the process starts on the fallback model rather than not at
        all (nothing is decided without Redis anyway); the first check that reaches Redis
        switches to the promoted version.
        """
        try:
            return self.versions.pointers.token(), self.versions.pointers.read()
        except CoordinationError as exc:
            log.warning("model.check_failed", error=str(exc))
            return _UNREAD, Pointers()

    def _directory(self, version: str | None) -> Path:
        return self.versions.fallback_dir if version is None else self.versions.path(version)

    def _switch_live(self, pointers: Pointers) -> None:
        old = self._live.model_version
        loaded = self._loaded(pointers.current, old, role="current")
        if loaded is not None:
            self._live = loaded
            log.info("model.switched", version=loaded.model_version, replaced=old)

    def _switch_shadow(self, version: str | None) -> None:
        if version is None:
            self._shadow = None
            return
        serving = self._shadow.model_version if self._shadow is not None else None
        loaded = self._loaded(version, serving, role="shadow")
        if loaded is not None:
            self._shadow = loaded
            log.info("model.shadow_loaded", version=loaded.model_version)

    def _loaded(
        self, version: str | None, serving: str | None, *, role: str
    ) -> BertClassifier | None:
        """The classifier of ``version`` (``None``: the fallback), if it may replace ``serving``.

        ``None`` when it is ``serving`` already, cannot be loaded, or does not fit the policies.
        """
        if version is not None and version == serving:
            return None
        try:
            directory = self._directory(version)
            classifier = self._load(directory)
        except (ModelError, ModelVersionError) as exc:
            log.error("model.switch_failed", role=role, version=version, error=str(exc))  # noqa: TRY400
            return None
        if classifier.model_version == serving:
            return None
        mismatch = labels_mismatch(self._started_with, classifier.manifest)
        if mismatch:
            log.error("model.switch_refused", role=role, version=version, reason=mismatch)
            return None
        return classifier
