"""Task arguments: the payload a task takes, and what a dead letter keeps of wrong ones."""

from __future__ import annotations

import json

import pytest

from tiergate.workers.ledger import held_message_id
from tiergate.workers.tasks.retries import DEAD_BODY_CHARS, WrongArguments, task_payload

MESSAGE = {"id": "m-1", "text": "hello"}


@pytest.mark.parametrize(
    ("args", "kwargs"),
    [
        ((), {"message": MESSAGE}),
        ((), {"message": MESSAGE, "attempt": 2}),
        ((MESSAGE,), {}),
        ((MESSAGE,), {"attempt": 1}),
    ],
    ids=["keyword", "keyword and attempt", "positional", "positional and attempt"],
)
def test_the_message_is_taken_by_keyword_or_as_the_only_positional_argument(args, kwargs):
    """`message=` and a single positional message are both the contract."""
    assert task_payload(args, kwargs, "message") == MESSAGE


@pytest.mark.parametrize(
    ("args", "kwargs", "given"),
    [
        ((), {"msg": MESSAGE}, "'msg'"),
        ((), {}, "none"),
        ((MESSAGE, 5), {}, "none"),
        ((MESSAGE,), {"message": MESSAGE}, "'message'"),
        ((), {"message": MESSAGE, "priority": 1}, "'message', 'priority'"),
    ],
    ids=["wrong keyword", "nothing", "two positional", "both forms", "an extra keyword"],
)
def test_other_arguments_are_wrong_arguments_naming_what_was_expected_and_given(
    args, kwargs, given
):
    """The reason names the keyword expected and the keywords and positional count given."""
    wrong = task_payload(args, kwargs, "message")
    assert isinstance(wrong, WrongArguments)
    assert "expected keyword argument 'message'" in wrong.reason
    assert f"got keyword arguments {given} and {len(args)} positional" in wrong.reason
    assert wrong.kept() == {"args": list(args), "kwargs": kwargs}


def test_wrong_arguments_are_kept_whole_up_to_a_bound_then_cut():
    """Small arguments are kept as they came; large ones as their JSON, cut to the bound."""
    small = WrongArguments("message", (), {"msg": MESSAGE})
    assert held_message_id(small.kept()) == "m-1"
    huge = WrongArguments("message", (), {"msg": {"id": "m-2", "text": "x" * 50_000}})
    kept = huge.kept()
    assert kept["truncated"] is True
    assert len(kept["body"]) == DEAD_BODY_CHARS
    assert kept["body"] == json.dumps([[], {"msg": huge.kwargs["msg"]}])[:DEAD_BODY_CHARS]
