"""The providers' published prompt-caching rules, in one place.

Both providers bill input tokens served from their prompt cache at a fraction of the input rate
(see :class:`~tiergate.workers.settings.Price`); a prefix is reused only when it is
byte-identical and long enough:

- OpenAI caches automatically, with no write charge, prompts of at least
  :data:`OPENAI_MIN_CACHED_TOKENS` tokens; a hit covers the longest cached prefix, in steps of
  :data:`OPENAI_CACHE_STEP_TOKENS` tokens. Requests are routed by a hash of the prefix and the
  optional ``prompt_cache_key``, so a key shared by every request of one prompt raises the hit
  rate; :func:`prompt_cache_key` gives one per policy version and prompt version.
- Anthropic caches what a request marks with ``cache_control`` (tools, then system, then
  messages, up to and including the marked block) once the marked prefix reaches the model's
  minimum (:func:`anthropic_min_cacheable_tokens`); shorter prefixes are processed uncached,
  without error. The default lifetime is five minutes, renewed by each hit.

The providers use these rules to lay out and mark requests, and the fake server of
:mod:`tiergate.workers.llm.testing` to answer as the real APIs do.
"""

from __future__ import annotations

import hashlib

OPENAI_MIN_CACHED_TOKENS = 1024
OPENAI_CACHE_STEP_TOKENS = 128

# The minimum cacheable prefix per Claude model family, in tokens (Anthropic's prompt-caching
# documentation); a model not listed has the general minimum.
_ANTHROPIC_MIN_TOKENS: dict[str, int] = {
    "claude-haiku-4-5": 4096,
    "claude-opus-4-5": 4096,
    "claude-opus-4-6": 4096,
    "claude-3-5-haiku": 2048,
    "claude-3-haiku": 2048,
}
ANTHROPIC_DEFAULT_MIN_TOKENS = 1024

# Characters per token assumed when deciding whether a prefix is long enough to mark: below the
# ~4 of English text, so a prefix near the minimum is marked (a marked prefix that turns out too
# short is simply not cached; an unmarked one that was long enough would be paid in full).
_CHARS_PER_TOKEN = 3

# Seconds a cached prefix lives after its last use (both providers: about five minutes).
CACHE_LIFETIME_S = 300.0


def anthropic_min_cacheable_tokens(model: str) -> int:
    """The shortest prefix, in tokens, that ``model`` caches (by family: dated ids match too)."""
    for family, minimum in _ANTHROPIC_MIN_TOKENS.items():
        if model == family or model.startswith(f"{family}-"):
            return minimum
    return ANTHROPIC_DEFAULT_MIN_TOKENS


def anthropic_prefix_cacheable(model: str, prefix_chars: int) -> bool:
    """Whether a prefix of ``prefix_chars`` characters may reach ``model``'s cacheable minimum.

    Token counts are estimated (no tokenizer on this side), erring towards yes.
    """
    return prefix_chars / _CHARS_PER_TOKEN >= anthropic_min_cacheable_tokens(model)


def prompt_cache_key(policy: str, policy_version: str, prompt_version: str) -> str:
    """OpenAI's ``prompt_cache_key`` for every request of one policy version and prompt version.

    A short, fixed-length digest: stable across processes and machines, different whenever
    the prefix's inputs change, and naming nothing of the policy on the wire.
    """
    digest = hashlib.sha256(f"{policy}\0{policy_version}\0{prompt_version}".encode()).hexdigest()
    return f"tiergate-{digest[:32]}"
