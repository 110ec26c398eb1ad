"""The task names producers and workers agree on; they are the wire contract, so never rename."""

CLASSIFY_TASK = "tiergate.classify"
LLM_TASK = "tiergate.answer_with_llm"
WEBHOOK_TASK = "tiergate.webhook"
