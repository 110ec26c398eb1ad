"""The account of a run: every input line answered in place, counted, and summed up at the end.

``classify`` and ``submit`` both write their answers through :func:`write_answers` and close
with :func:`print_summary` on standard error. The LLM cost is what this run paid: the sum of
the decisions' ``llm.cost_usd``, where a decision that reused an answer (from the cache, or a
duplicate in the same batch) carries none, and decisions made by an earlier run are not counted.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass, field
from typing import IO

from rich.markup import escape

from tiergate.gateway.cli.errors import err
from tiergate.gateway.cli.output import decision_line, error_line, unanswered_line
from tiergate.workers.errors import RecordError
from tiergate.workers.ledger import IdReused, id_reused_reason
from tiergate.workers.schemas import Decision, Message, Status


@dataclass
class Tally:
    """Counts for the closing summary: every input line lands in exactly one bucket."""

    read: int = 0
    answered: int = 0
    rejected: int = 0
    labels: Counter[str] = field(default_factory=Counter)
    tiers: Counter[str] = field(default_factory=Counter)
    skipped: Counter[str] = field(default_factory=Counter)
    cached: int = 0
    deferred: int = 0
    earlier: int = 0
    llm_cost_usd: float = 0.0

    def count(self, decision: Decision, *, earlier: bool = False) -> None:
        """Add one decision to the counts.

        ``earlier`` marks a decision made before this run (a resubmitted id): its LLM calls
        were paid for then, so its cost is not counted again.
        """
        self.answered += 1
        self.labels.update(decision.labels)
        self.tiers[decision.tier.value] += 1
        self.cached += decision.cached
        self.deferred += decision.status is Status.DEFERRED
        self.earlier += earlier
        if decision.llm_skipped is not None:
            self.skipped[decision.llm_skipped.value] += 1
        if decision.llm is not None and not decision.cached and not earlier:
            self.llm_cost_usd += decision.llm.cost_usd


def write_answers(
    items: Sequence[Message | RecordError],
    decisions: Iterable[Decision | IdReused | None],
    out: IO[str],
    tally: Tally,
    answered_earlier: Collection[str] = frozenset(),
) -> None:
    """Write one JSON line per item, in input order, and count each in ``tally``.

    ``decisions`` holds one entry per message of ``items``, in order: its decision,
    :class:`IdReused` when its id was answered before for another text, or ``None`` when none
    came back in time. ``answered_earlier`` are the ids that had a decision before this run
    began (see :meth:`Tally.count`). A rejected record and a message left unanswered are each
    reported on standard error and written as an ``error`` line in place.
    """
    answers = iter(decisions)
    for item in items:
        tally.read += 1
        if isinstance(item, RecordError):
            tally.rejected += 1
            err.print(f"[yellow]rejected[/] {escape(str(item))}", highlight=False, soft_wrap=True)
            out.write(error_line(item))
            continue
        decision = next(answers)
        if decision is None or isinstance(decision, IdReused):
            reason = "not answered in time" if decision is None else id_reused_reason(item.id)
            tally.rejected += 1
            err.print(
                f"[yellow]rejected[/] {escape(item.id)}: {escape(reason)}",
                highlight=False,
                soft_wrap=True,
            )
            out.write(unanswered_line(item, reason))
        else:
            tally.count(decision, earlier=decision.id in answered_earlier)
            out.write(decision_line(decision))


def print_summary(tally: Tally, seconds: float) -> None:
    """Two lines on standard error: what was read and answered, how fast, by which tier."""
    rate = tally.answered / seconds if seconds > 0 else 0.0
    labels = ", ".join(f"{label} {count}" for label, count in tally.labels.most_common())
    answered = max(tally.answered, 1)
    tiers = ", ".join(
        f"{tier} {tally.tiers[tier]} ({tally.tiers[tier] / answered:.0%})"
        for tier in ("bert", "llm")
    )
    err.print(
        f"[bold]{tally.read}[/] messages: {tally.answered} answered, {tally.rejected} rejected "
        f"· {rate:,.0f} messages/s · {labels or 'no labels'}",
        highlight=False,
        soft_wrap=True,
    )
    details = [f"answered by {tiers}", f"{tally.cached} from the cache"]
    if tally.earlier:
        details.append(f"{tally.earlier} answered earlier")
    if tally.deferred:
        details.append(f"{tally.deferred} deferred (budget spent)")
    if tally.skipped:
        skipped = ", ".join(f"{reason} {n}" for reason, n in tally.skipped.most_common())
        details.append(f"LLM step skipped: {skipped}")
    details.append(f"LLM cost ${tally.llm_cost_usd:.4f}")
    err.print(" · ".join(details), highlight=False, soft_wrap=True)
