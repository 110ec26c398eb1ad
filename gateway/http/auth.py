"""API keys of the HTTP gateway: stored hashed, each limited to named policies.

Operators keep only the SHA-256 hex digest of each key in ``settings.api_keys`` (make one
with :func:`hash_api_key`), mapped to the policy names the key may use (``"*"``: all of
them). A client presents its key as ``Authorization: Bearer <key>`` or ``X-API-Key: <key>``.
With no keys configured the gateway is open (development only).
"""

from __future__ import annotations

import hashlib
import hmac
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

ALL_POLICIES = "*"
_SHA256_HEX = re.compile(r"^[0-9a-f]{64}$")


def hash_api_key(key: str) -> str:
    """The SHA-256 hex digest of ``key``: the form an API key is stored in, in settings."""
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class Grant:
    """What one authenticated caller may do: use the policies named in ``policies``.

    ``key_id`` identifies the key in logs without revealing it (the first 12 hex digits of
    its hash; empty when the gateway is open). ``policies`` holds policy names, or ``"*"``.
    """

    key_id: str
    policies: frozenset[str]

    def allows(self, policy: str) -> bool:
        """Whether this caller may use the policy called ``policy`` (its real name)."""
        return ALL_POLICIES in self.policies or policy in self.policies


OPEN_GRANT = Grant(key_id="", policies=frozenset({ALL_POLICIES}))


class KeyRing:
    """The configured API keys, checked in constant time.

    ``api_keys`` maps a key's SHA-256 hex digest to the policy names it may use. Raises
    ``ValueError`` for an entry that is not a SHA-256 hex digest or lists no policy, so a key
    pasted in clear text is refused at start-up rather than silently never matching.
    """

    def __init__(self, api_keys: Mapping[str, Sequence[str]]) -> None:
        self._grants: dict[str, Grant] = {}
        for digest, policies in api_keys.items():
            normalized = digest.strip().lower()
            if not _SHA256_HEX.match(normalized):
                raise ValueError(
                    "api_keys must map SHA-256 hex digests of keys (see hash_api_key) to "
                    "policy names; one entry is not a digest"
                )
            if not policies:
                raise ValueError(f"API key {normalized[:12]}... allows no policy")
            self._grants[normalized] = Grant(key_id=normalized[:12], policies=frozenset(policies))

    @property
    def required(self) -> bool:
        """Whether callers must present a key (false when no key is configured)."""
        return bool(self._grants)

    def grant_for(self, key: str | None) -> Grant | None:
        """The grant of ``key``, or ``None`` when it is missing or unknown.

        When no key is configured every caller gets a grant for all policies. The presented
        key's hash is compared with every stored hash (no early exit), so the time taken does
        not reveal which stored hash shares a prefix with it.
        """
        if not self.required:
            return OPEN_GRANT
        if not key:
            return None
        presented = hash_api_key(key)
        found: Grant | None = None
        for digest, grant in self._grants.items():
            if hmac.compare_digest(presented, digest):
                found = grant
        return found
