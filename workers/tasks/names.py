"""The task names and header producers and workers agree on: the wire contract, so never rename."""

CLASSIFY_TASK = "tiergate.classify"
LLM_TASK = "tiergate.answer_with_llm"
WEBHOOK_TASK = "tiergate.webhook"

# The message header holding when a task was published, in epoch seconds (a JSON number).
# tiergate's own publishers set it; other producers may, to get ``queued`` in timings.
SENT_AT_HEADER = "tiergate_sent_at"
