"""The LLM tier: answers for the messages the policy routes past the BERT tier.

- :mod:`tiergate.workers.llm.tier`: :class:`~tiergate.workers.llm.tier.LLMTier`, the orchestrator
  the cascade calls (redaction, prompt, provider chain with fallback, validation with one repair);
- :mod:`tiergate.workers.llm.provider`: the one provider interface and the registry of
  implementations (:mod:`tiergate.workers.llm.openai_provider`,
  :mod:`tiergate.workers.llm.anthropic_provider`);
- :mod:`tiergate.workers.llm.prompt`: the prompt, the answer schema and its validator;
- :mod:`tiergate.workers.llm.redact`: personal data out before a call, back into generated text;
- :mod:`tiergate.workers.llm.breaker`: circuit breakers whose state workers share through Redis;
- :mod:`tiergate.workers.llm.testing`: a local server speaking both providers' wire formats, for
  tests.

Nothing is imported here, so importing the package loads no SDK.
"""
