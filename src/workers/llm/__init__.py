"""The LLM tier: answers for the messages the policy routes past the BERT tier.

- :mod:`workers.llm.tier`: :class:`~workers.llm.tier.LLMTier`, the orchestrator the cascade
  calls (redaction, prompt, provider chain with fallback, validation with one repair);
- :mod:`workers.llm.provider`: the one provider interface and the registry of implementations
  (:mod:`workers.llm.openai_provider`, :mod:`workers.llm.anthropic_provider`);
- :mod:`workers.llm.prompt`: the prompt, the answer schema and its validator;
- :mod:`workers.llm.redact`: personal data out before a call, back into generated text;
- :mod:`workers.llm.breaker`: circuit breakers whose state workers share through Redis;
- :mod:`workers.llm.testing`: a local server speaking both providers' wire formats, for tests.

Nothing is imported here, so importing the package loads no SDK.
"""
