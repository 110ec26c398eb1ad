"""Model versions: where they live, which one serves, and the gate a candidate must pass.

A model version is a complete model directory (see :mod:`tiergate.workers.bert.manifest`) kept
under ``settings.resolved_model_store`` as ``<store>/<model_version>/``; every worker and gateway
must reach the same store (a shared volume). Which version serves, the shadow candidate, the
versions to roll back to and an audit log of every change are :class:`Pointers`, kept in Redis
(``{cache_prefix}:model-versions``) when ``settings.redis_url`` is set, else in
``<store>/pointers.json`` (written atomically, under a file lock). Serving processes read the
pointer between batches and switch on their own (:mod:`tiergate.workers.bert.serving`).

Promotion moves the pointer only when :func:`gate` passes on the candidate's card
(``model.json``, block ``distillation``, written by ``tiergate distill``), or when forced; a
forced promotion is logged (``model.promotion_forced``) and kept in the audit log.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import shutil
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

import redis
import structlog
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from tiergate.workers.bert.manifest import CARD_FILE, MANIFEST_FILE, ModelManifest, read_manifest
from tiergate.workers.errors import (
    ModelError,
    ModelVersionError,
    PromotionRefusedError,
)
from tiergate.workers.redis_connection import redis_errors_as_coordination_errors, shared_redis
from tiergate.workers.settings import Settings

log = structlog.get_logger(__name__)

DISTILLATION_BLOCK = "distillation"
POINTERS_FILE = "pointers.json"
# Versions a rollback can go back through, and audit entries kept; older ones are dropped.
PREVIOUS_KEPT = 20
AUDIT_KEPT = 1000
_VERSION_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,199}")


@dataclass(frozen=True)
class GateResult:
    """Whether a candidate may be promoted, with one reason per failed (or unreadable) check."""

    passed: bool
    reasons: list[str] = field(default_factory=list)


def _figure(block: Mapping[str, Any], side: str, name: str) -> float | None:
    """``block[side][name]`` as a float, or None where it is missing or not a number."""
    part = block.get(side)
    if not isinstance(part, Mapping):
        return None
    value = part.get(name)
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


def gate(card: Mapping[str, Any]) -> GateResult:
    """Judge a candidate from its card's ``distillation`` block.

    Passes iff the candidate is at least as accurate as the current model within its interval
    (``candidate.ci_high >= current.accuracy``) and would send a smaller share to the LLM
    (``candidate.llm_share < current.llm_share``), both measured on the same held-out labels.
    A card without the block, or with a figure missing, does not pass; the reasons say why.
    """
    block = card.get(DISTILLATION_BLOCK)
    if not isinstance(block, Mapping):
        no_block = (
            "the card has no held-out figures (no 'distillation' block: "
            "build the candidate with `tiergate distill`)"
        )
        return GateResult(passed=False, reasons=[no_block])
    ci_high = _figure(block, "candidate", "ci_high")
    share = _figure(block, "candidate", "llm_share")
    accuracy = _figure(block, "current", "accuracy")
    current_share = _figure(block, "current", "llm_share")
    if ci_high is None or share is None or accuracy is None or current_share is None:
        named = {
            "candidate.ci_high": ci_high,
            "candidate.llm_share": share,
            "current.accuracy": accuracy,
            "current.llm_share": current_share,
        }
        missing = ", ".join(name for name, value in named.items() if value is None)
        return GateResult(
            passed=False, reasons=[f"the card's held-out figures are incomplete: missing {missing}"]
        )
    reasons = []
    if ci_high < accuracy:
        reasons.append(
            f"less accurate on the held-out labels: candidate interval tops out at "
            f"{ci_high:.3f}, below the current model's accuracy {accuracy:.3f}"
        )
    if share >= current_share:
        reasons.append(
            f"would not send fewer messages to the LLM: candidate LLM share {share:.3f}, "
            f"current {current_share:.3f}"
        )
    return GateResult(passed=not reasons, reasons=reasons)


# ------------------------------------------------------------------------------- pointers


class Pointers(BaseModel):
    """Which version serves, the shadow candidate, and the versions to roll back to.

    ``current`` is ``None`` while nothing is promoted; ``previous`` holds the most recent first.
    """

    model_config = ConfigDict(frozen=True)

    current: str | None = None
    previous: tuple[str, ...] = ()
    shadow: str | None = None


class AuditEntry(BaseModel):
    """One change of the pointers: what was done, to which version, replacing which."""

    model_config = ConfigDict(frozen=True)

    time: float
    action: Literal["promote", "rollback", "shadow", "clear_shadow"]
    version: str | None
    replaced: str | None = None
    forced: bool = False
    reasons: list[str] = Field(default_factory=list)


Change = Callable[[Pointers], tuple[Pointers, AuditEntry]]


class PointerStore(Protocol):
    """Where the pointers live.

    Every method may raise :class:`~tiergate.workers.errors.CoordinationError` (Redis
    unreachable).
    """

    def token(self) -> object:
        """A cheap value that differs whenever the pointers changed (one GET, or one stat)."""
        ...

    def read(self) -> Pointers:
        """The pointers now."""
        ...

    def update(self, change: Change) -> Pointers:
        """Apply ``change`` atomically, append its audit entry, and return the new pointers.

        ``change`` may run again after a concurrent write; an error it raises leaves everything
        as it was.
        """
        ...

    def audit(self) -> list[AuditEntry]:
        """The audit log, oldest first (the last :data:`AUDIT_KEPT` entries)."""
        ...


def _parse_pointers(raw: bytes | str | None) -> Pointers:
    if raw is None:
        return Pointers()
    try:
        return Pointers.model_validate_json(raw)
    except ValidationError:
        # Not ours to repair: serve as if none were set, and say so.
        log.error("model.pointers_invalid")  # noqa: TRY400 -- the event says it all
        return Pointers()


class RedisPointers:
    """Pointers as one JSON value under ``{prefix}:model-versions``; the audit log a list."""

    def __init__(self, client: redis.Redis, prefix: str) -> None:
        self.client = client
        self.key = f"{prefix}:model-versions"
        self.audit_key = f"{prefix}:model-versions:audit"

    def token(self) -> object:
        """See :meth:`PointerStore.token`: the raw value (one GET)."""
        with redis_errors_as_coordination_errors(self.client, "reading the model pointer"):
            return self.client.get(self.key)

    def read(self) -> Pointers:
        """See :meth:`PointerStore.read`."""
        with redis_errors_as_coordination_errors(self.client, "reading the model pointer"):
            raw = self.client.get(self.key)
        return _parse_pointers(raw)

    def update(self, change: Change) -> Pointers:
        """See :meth:`PointerStore.update`: a WATCH/MULTI transaction on the pointer key."""
        changed: list[Pointers] = []

        def apply(pipe: redis.client.Pipeline) -> None:
            new, entry = change(_parse_pointers(pipe.get(self.key)))
            pipe.multi()
            pipe.set(self.key, new.model_dump_json())
            pipe.rpush(self.audit_key, entry.model_dump_json())
            pipe.ltrim(self.audit_key, -AUDIT_KEPT, -1)
            changed.append(new)

        with redis_errors_as_coordination_errors(self.client, "changing the model pointer"):
            self.client.transaction(apply, self.key)
        return changed[-1]

    def audit(self) -> list[AuditEntry]:
        """See :meth:`PointerStore.audit`."""
        with redis_errors_as_coordination_errors(self.client, "reading the model audit log"):
            raw = self.client.lrange(self.audit_key, 0, -1)
        return [AuditEntry.model_validate_json(item) for item in raw]


class FilePointers:
    """Pointers and audit log in ``<store>/pointers.json``, replaced atomically under a lock."""

    def __init__(self, store: Path) -> None:
        self.path = store / POINTERS_FILE
        self.lock_path = store / ".pointers.lock"

    def token(self) -> object:
        """See :meth:`PointerStore.token`: the file's inode, mtime and size (one stat)."""
        try:
            stat = self.path.stat()
        except FileNotFoundError:
            return None
        # os.replace gives the file a new inode, so a rewrite within one mtime tick still shows.
        return (stat.st_ino, stat.st_mtime_ns, stat.st_size)

    def _document(self) -> dict[str, Any]:
        try:
            document = json.loads(self.path.read_text())
        except FileNotFoundError:
            return {}
        except ValueError:
            log.error("model.pointers_invalid", path=str(self.path))  # noqa: TRY400
            return {}
        return document if isinstance(document, dict) else {}

    def read(self) -> Pointers:
        """See :meth:`PointerStore.read`."""
        document = self._document()
        return _parse_pointers(json.dumps(document.get("pointers"))) if document else Pointers()

    def update(self, change: Change) -> Pointers:
        """See :meth:`PointerStore.update`: under an exclusive lock on a file beside it."""
        with self._locked():
            document = self._document()
            old = _parse_pointers(json.dumps(document["pointers"])) if document else Pointers()
            new, entry = change(old)
            audit = [*document.get("audit", []), entry.model_dump(mode="json")][-AUDIT_KEPT:]
            self._write({"pointers": new.model_dump(mode="json"), "audit": audit})
        return new

    def audit(self) -> list[AuditEntry]:
        """See :meth:`PointerStore.audit`."""
        return [AuditEntry.model_validate(item) for item in self._document().get("audit", [])]

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        self.lock_path.parent.mkdir(parents=True, exist_ok=True)
        with self.lock_path.open("a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def _write(self, document: dict[str, Any]) -> None:
        staging = self.path.with_name(f".{POINTERS_FILE}.{uuid.uuid4().hex}")
        with staging.open("w") as handle:
            json.dump(document, handle, indent=2)
            handle.flush()
            os.fsync(handle.fileno())
        staging.replace(self.path)


# ------------------------------------------------------------------------------- versions


class ModelVersions:
    """The model versions of a deployment and the pointers every serving process follows.

    ``fallback_dir`` is the model served while nothing is promoted
    (``settings.resolved_model_dir``). Raises :class:`~tiergate.workers.errors.ModelVersionError`
    for an unknown version or a change that cannot be made, the model errors for a corrupt
    directory, and :class:`~tiergate.workers.errors.CoordinationError` when Redis is unreachable.
    """

    def __init__(self, store: Path, pointers: PointerStore, fallback_dir: Path) -> None:
        self.store = store
        self.pointers = pointers
        self.fallback_dir = fallback_dir

    @classmethod
    def from_settings(cls, settings: Settings) -> ModelVersions:
        """The store at ``settings.resolved_model_store``; pointers in Redis when configured."""
        store = settings.resolved_model_store
        pointers: PointerStore
        if settings.redis_url:
            pointers = RedisPointers(shared_redis(settings.redis_url), settings.cache_prefix)
        else:
            pointers = FilePointers(store)
        return cls(store, pointers, settings.resolved_model_dir)

    # ---------------------------------------------------------------- the store

    def add(self, model_dir: Path) -> str:
        """Copy a built model directory in as ``<store>/<model_version>/``; return the version.

        The directory's files are verified against its manifest first, and the copy is renamed
        into place only when complete, so a worker never sees half a version. Adding a version
        that is already there changes nothing.
        """
        manifest = read_manifest(Path(model_dir))
        version = _checked_name(manifest.model_version)
        target = self.store / version
        if (target / MANIFEST_FILE).is_file():
            return version
        self.store.mkdir(parents=True, exist_ok=True)
        staging = self.store / f".incoming-{uuid.uuid4().hex}"
        try:
            shutil.copytree(model_dir, staging)
            read_manifest(staging)
            try:
                staging.rename(target)
            except OSError:
                if not (target / MANIFEST_FILE).is_file():  # not a concurrent add of the same
                    raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        log.info("model.version_added", version=version, path=str(target))
        return version

    def path(self, version: str) -> Path:
        """The directory of ``version`` in the store (it must be there)."""
        target = self.store / _checked_name(version)
        if not (target / MANIFEST_FILE).is_file():
            known = ", ".join(self.versions()) or "none"
            raise ModelVersionError(
                f"unknown model version {version!r} in {self.store} (known: {known}; "
                "add one with `tiergate model add DIR`)"
            )
        return target

    def versions(self) -> list[str]:
        """Every version in the store, oldest added first."""
        if not self.store.is_dir():
            return []
        found = [d for d in self.store.iterdir() if (d / MANIFEST_FILE).is_file()]
        return [d.name for d in sorted(found, key=lambda d: (d.stat().st_mtime, d.name))]

    def card(self, version: str) -> dict[str, Any]:
        """The card (``model.json``) of ``version``; empty when it has none."""
        path = self.path(version) / CARD_FILE
        try:
            card = json.loads(path.read_text())
        except FileNotFoundError:
            return {}
        except ValueError as exc:
            raise ModelVersionError(f"model version {version!r}: {CARD_FILE} is not JSON") from exc
        return card if isinstance(card, dict) else {}

    # ---------------------------------------------------------------- the pointers

    def current(self) -> str | None:
        """The promoted version; ``None`` while nothing is promoted (``fallback_dir`` serves)."""
        return self.pointers.read().current

    def current_dir(self) -> Path:
        """The directory of the version that serves: the promoted one, else ``fallback_dir``."""
        current = self.current()
        return self.fallback_dir if current is None else self.store / current

    def audit(self) -> list[AuditEntry]:
        """Every promotion, rollback and shadow change, oldest first."""
        return self.pointers.audit()

    def shadow(self, version: str) -> None:
        """Make ``version`` the shadow candidate: scored beside the live model, deciding nothing."""
        self._check_fits(version)

        def change(old: Pointers) -> tuple[Pointers, AuditEntry]:
            if version == old.current:
                raise ModelVersionError(f"model version {version!r} is already serving")
            entry = AuditEntry(time=time.time(), action="shadow", version=version)
            return old.model_copy(update={"shadow": version}), entry

        self.pointers.update(change)
        log.info("model.shadow_set", version=version)

    def clear_shadow(self) -> None:
        """Stop scoring a shadow candidate (its figures are kept)."""

        def change(old: Pointers) -> tuple[Pointers, AuditEntry]:
            entry = AuditEntry(time=time.time(), action="clear_shadow", version=old.shadow)
            return old.model_copy(update={"shadow": None}), entry

        self.pointers.update(change)
        log.info("model.shadow_cleared")

    def promote(self, version: str, *, force: bool = False) -> GateResult:
        """Make ``version`` the one every serving process loads (between two batches).

        Refuses (:class:`~tiergate.workers.errors.PromotionRefusedError`, naming the gate's
        reasons) unless :func:`gate` passes on its card or ``force``; a forced promotion is
        logged and audited with the reasons it overrode. On the first promotion the model that
        served until then is added to the store, so that :meth:`rollback` can return to it.
        Returns the gate's result.
        """
        self._check_fits(version)
        result = gate(self.card(version))
        if not result.passed and not force:
            raise PromotionRefusedError(version, result.reasons)
        base = self._keep_fallback() if self.current() is None else None

        def change(old: Pointers) -> tuple[Pointers, AuditEntry]:
            serving = old.current or base
            if version == serving:
                raise ModelVersionError(f"model version {version!r} is already serving")
            previous = ((serving,) if serving else ()) + old.previous
            new = Pointers(
                current=version,
                previous=previous[:PREVIOUS_KEPT],
                shadow=None if old.shadow == version else old.shadow,
            )
            forced = not result.passed
            entry = AuditEntry(
                time=time.time(),
                action="promote",
                version=version,
                replaced=serving,
                forced=forced,
                reasons=result.reasons,
            )
            return new, entry

        new = self.pointers.update(change)
        replaced = new.previous[0] if new.previous else None
        if result.passed:
            log.info("model.promoted", version=version, replaced=replaced)
        else:
            log.warning(
                "model.promotion_forced", version=version, replaced=replaced, reasons=result.reasons
            )
        return result

    def rollback(self) -> str:
        """Return to the version promoted before the current one; the version now serving."""

        def change(old: Pointers) -> tuple[Pointers, AuditEntry]:
            if not old.previous:
                raise ModelVersionError("no previous model version to roll back to")
            target = old.previous[0]
            self.path(target)  # still in the store
            new = Pointers(current=target, previous=old.previous[1:], shadow=old.shadow)
            entry = AuditEntry(
                time=time.time(), action="rollback", version=target, replaced=old.current
            )
            return new, entry

        new = self.pointers.update(change)
        assert new.current is not None  # a rollback always names its target
        log.warning("model.rolled_back", version=new.current)
        return new.current

    def _keep_fallback(self) -> str | None:
        """Add the model serving while nothing is promoted to the store; its version."""
        if not (self.fallback_dir / MANIFEST_FILE).is_file():
            return None
        return self.add(self.fallback_dir)

    def _check_fits(self, version: str) -> ModelManifest:
        """``version``'s verified manifest, if its labels and head are the serving model's.

        The served policies were checked against those, so a model with others cannot serve.
        """
        manifest = read_manifest(self.path(version))
        try:
            serving = read_manifest(self.current_dir(), verify=False)
        except ModelError:
            return manifest  # nothing serves yet: nothing to compare with
        mismatch = labels_mismatch(serving, manifest)
        if mismatch:
            raise ModelVersionError(f"model version {version!r} {mismatch}")
        return manifest


def labels_mismatch(serving: ModelManifest, candidate: ModelManifest) -> str | None:
    """Why ``candidate`` cannot replace ``serving`` under the same policies (``None``: it can)."""
    if set(candidate.labels) != set(serving.labels):
        return (
            f"has the labels {sorted(candidate.labels)}, but the model serving "
            f"({serving.model_version}) has {sorted(serving.labels)}"
        )
    if candidate.head is not serving.head:
        return f"has a {candidate.head} head, but the model serving has a {serving.head} head"
    return None


def _checked_name(version: str) -> str:
    """``version`` if it is a safe directory name; else :class:`ModelVersionError`."""
    if not _VERSION_NAME.fullmatch(version):
        raise ModelVersionError(
            f"{version!r} is not a model version name (letters, digits, '.', '_', '+', '-')"
        )
    return version
