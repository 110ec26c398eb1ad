"""Which policies the BERT workers serve, said in Redis for processes that load no model.

A BERT worker chooses its policies from its model's labels (:func:`~tiergate.workers.cascade.
load_policy_book`). The distributed HTTP gateway and the producer client never load the model,
so each worker announces its choice when it builds its cascade, and they read it back.
"""

from __future__ import annotations

import json
from collections.abc import Iterable

import redis
from pydantic import BaseModel, ConfigDict, ValidationError

from tiergate.policies.spec import PolicySpec
from tiergate.workers.redis_connection import redis_errors_as_coordination_errors


class Announcement(BaseModel):
    """What one worker serves: its model's version and its policies, the default first."""

    model_config = ConfigDict(frozen=True)

    model_version: str
    policies: tuple[PolicySpec, ...]


class ServedPolicies:
    """The latest announcement in Redis under ``{prefix}:served-policies``.

    Every worker of a deployment serves the same model and policies, so the last word is the
    one that counts; a worker that starts with a new model overwrites it. Methods raise
    :class:`~tiergate.workers.errors.CoordinationError` when Redis is unreachable.
    """

    def __init__(self, client: redis.Redis, prefix: str) -> None:
        self.client = client
        self.key = f"{prefix}:served-policies"

    def announce(self, policies: Iterable[PolicySpec], model_version: str) -> None:
        """Say that this process serves ``policies`` with the model ``model_version``."""
        announcement = Announcement(model_version=model_version, policies=tuple(policies))
        with redis_errors_as_coordination_errors(self.client, "announcing the served policies"):
            self.client.set(self.key, announcement.model_dump_json())

    def read(self) -> Announcement | None:
        """The latest announcement, or ``None`` when no worker has made a valid one."""
        with redis_errors_as_coordination_errors(self.client, "reading the served policies"):
            raw = self.client.get(self.key)
        if raw is None:
            return None
        try:
            return Announcement.model_validate(json.loads(raw))
        except (ValueError, ValidationError):
            return None  # written by an incompatible version: wait for a worker of this one
