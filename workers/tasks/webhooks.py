"""The webhook step: POST a delivered decision to its policy's URL, signed when a secret is set."""

from __future__ import annotations

import hashlib
import hmac
import urllib.error
import urllib.request

import structlog
from celery import Celery

from tiergate.workers.ledger import DeadLetterKind
from tiergate.workers.schemas import Decision
from tiergate.workers.tasks.names import WEBHOOK_TASK
from tiergate.workers.tasks.retries import republish
from tiergate.workers.tasks.runtime import WorkerRuntime

log = structlog.get_logger(__name__)


def run_webhook(app: Celery, runtime: WorkerRuntime, url: str, decision: str, attempt: int) -> None:
    """POST one decision to its policy's webhook; retry with backoff, then dead-letter."""
    cascade, ledger = runtime.parts()
    parsed = Decision.model_validate_json(decision)
    webhook = cascade.policies.get(parsed.policy).webhook
    timeout_s = webhook.timeout_s if webhook is not None else 10.0
    attempts = webhook.max_attempts if webhook is not None else 5
    body = decision.encode()
    headers = {"Content-Type": "application/json", "User-Agent": "tiergate"}
    secret = runtime.settings.webhook_secret
    if secret is not None:
        digest = hmac.new(secret.get_secret_value().encode(), body, hashlib.sha256).hexdigest()
        headers["X-Tiergate-Signature"] = f"sha256={digest}"
    # The URL is the operator's, from a policy file whose schema admits only http(s).
    request = urllib.request.Request(url, data=body, headers=headers, method="POST")  # noqa: S310
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:  # noqa: S310
            status = response.status
    except urllib.error.HTTPError as exc:
        status, problem = exc.code, f"HTTP {exc.code}"
    except (urllib.error.URLError, TimeoutError, OSError) as exc:
        status, problem = 0, f"unreachable ({exc})"
    else:
        problem = f"HTTP {status}"
    if 200 <= status < 300:
        return
    log.warning("webhook.failed", message_id=parsed.id, attempt=attempt, problem=problem)
    if attempt + 1 >= attempts:
        ledger.dead_letter(
            {"webhook": url, "decision": parsed.id, "id": parsed.id},
            f"webhook gave up after {attempt + 1} attempts: {problem}",
            kind=DeadLetterKind.WEBHOOK_GAVE_UP,
        )
        return
    republish(
        app, WEBHOOK_TASK, {"url": url, "decision": decision}, attempt, runtime.settings.llm_queue
    )
