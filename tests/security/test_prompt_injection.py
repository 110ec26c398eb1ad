"""Prompt injection: a message is only ever data, and an obeying LLM's answer is thrown away.

``prompt_injection.jsonl`` holds injection attempts (orders to ignore the instructions, fake
system and assistant turns, chat-template tokens, early closing of the ``<message>`` block in
ASCII and in look-alike characters, requests for new labels or for YAML or free text, other
languages, encodings, long padding). They go through the real gateway to the fake LLM API:

- in every request the provider receives, the system prompt and the answer schema (the label
  set) are exactly those of a harmless message, and the message sits once inside the data
  block, its delimiter look-alikes defused;
- when the LLM obeys (an out-of-set label, YAML, free text, extra fields), the answer fails
  validation twice (the answer and its one repair) and the documented fallback applies: the
  BERT tier's label, flagged ``llm_skipped: invalid_answer``, never the injected one, and not
  cached (``workers/cascade.py``, ``workers/llm/tier.py``).
"""

from __future__ import annotations

import json
import re
import unicodedata
from pathlib import Path

import pytest

from tests.security.conftest import TICKET_LABELS, write_policy
from tiergate.workers.llm.testing import OPENAI_PATH, Respond, RespondRaw

CORPUS = [
    json.loads(line)
    for line in (Path(__file__).parent / "prompt_injection.jsonl").read_text("utf-8").splitlines()
]
TEXT = {row["id"]: row["text"] for row in CORPUS}
USER_PREFIX = "Classify this message.\n\n<message>\n"
USER_SUFFIX = "\n</message>"
# Brackets, slashes and letters a reader may take for ASCII ones, beyond what NFKC folds.
_LOOKALIKES = str.maketrans(
    {
        "\u2039": "<",  # single left-pointing angle quotation mark
        "\u3008": "<",  # left angle bracket
        "\u27e8": "<",  # mathematical left angle bracket
        "\u2215": "/",  # division slash
        "\u2044": "/",  # fraction slash
        "\u0435": "e",  # Cyrillic ie
        "\u0430": "a",  # Cyrillic a
        "\u0455": "s",  # Cyrillic dze
        "\u043c": "m",  # Cyrillic em
    }
)
_DELIMITER_SHAPE = re.compile(r"<\s*/?\s*message(?![a-z0-9_])")


def looks_like_a_delimiter(data: str) -> bool:
    """Whether a reader could see ``<message>`` or ``</message>`` in ``data``.

    Independent of the code under test: invisible format characters dropped, compatibility
    forms folded (NFKC: fullwidth letters and brackets), confusable letters mapped, any case.
    """
    visible = "".join(ch for ch in data if unicodedata.category(ch) != "Cf")
    folded = unicodedata.normalize("NFKC", visible).translate(_LOOKALIKES).casefold()
    return bool(_DELIMITER_SHAPE.search(folded))


def turns_of(body):
    """The system prompt and the first user turn of an OpenAI or Anthropic request body."""
    messages = body["messages"]
    if "system" in body:
        return body["system"], messages[0]["content"]
    return messages[0]["content"], messages[1]["content"]


@pytest.fixture
def gateway(make_gateway):
    """The tiny-model gateway; its tickets policy escalates every message to the LLM."""
    return make_gateway()


def classify_corpus(gateway):
    """The whole corpus in one request; the decisions by id, in the corpus's order."""
    body = {"messages": [{"id": row["id"], "text": row["text"]} for row in CORPUS]}
    response = gateway.post("/v1/classify", json=body, timeout=120)
    assert response.status_code == 200, response.text
    decisions = response.json()["decisions"]
    assert [d["id"] for d in decisions] == [row["id"] for row in CORPUS]
    return {d["id"]: d for d in decisions}


def test_the_corpus_is_varied_and_really_attacks_the_delimiters():
    """30+ attempts of every kind, and the look-alike ones do look like delimiters."""
    assert len(CORPUS) >= 30
    assert len({row["text"] for row in CORPUS}) == len(CORPUS)
    kinds = {row["kind"] for row in CORPUS}
    assert kinds >= {
        "ignore-previous",
        "fake-system-turn",
        "fake-assistant-turn",
        "close-delimiter",
        "lookalike-delimiter",
        "new-label",
        "format-change",
        "padding",
    }
    for row in CORPUS:
        if row["kind"] in {"close-delimiter", "lookalike-delimiter"}:
            assert looks_like_a_delimiter(row["text"]), row["id"]
    assert max(len(row["text"]) for row in CORPUS) > 10_000


def test_each_message_reaches_the_provider_only_as_data(gateway):
    """Every prompt keeps the harmless message's instructions and labels; the text stays inside."""
    harmless = gateway.post("/v1/classify", json={"text": "The invoice total is wrong."})
    assert harmless.status_code == 200
    (reference,) = gateway.llm.requests
    reference_system, _ = turns_of(reference.body)
    reference_schema = reference.body["response_format"]

    decisions = classify_corpus(gateway)

    requests = gateway.llm.requests[1:]
    assert len(requests) == len(CORPUS)  # one call per message: nothing merged, nothing lost
    seen = []
    for request in requests:
        assert request.path == OPENAI_PATH
        system, user = turns_of(request.body)
        assert system == reference_system
        assert request.body["response_format"] == reference_schema
        assert len(request.body["messages"]) == 2  # the system turn and one user turn
        assert user.startswith(USER_PREFIX)
        assert user.endswith(USER_SUFFIX)
        data = user[len(USER_PREFIX) : -len(USER_SUFFIX)]
        assert not looks_like_a_delimiter(data), data[:200]
        seen.append(data)
    for row in CORPUS:
        # The message is there whole: only a delimiter's opening bracket may have changed.
        matches = [data for data in seen if _defused(row["text"]) == _defused(data)]
        assert len(matches) == 1, row["id"]
        assert row["text"] not in reference_system
    for decision in decisions.values():
        assert decision["tier"] == "llm"
        assert decision["label"] in TICKET_LABELS


def _defused(text: str) -> str:
    """``text`` with every bracket that could open a delimiter written as ``&lt;``."""
    return re.sub("[<\uff1c\u2039\u3008\u27e8]", "&lt;", text.replace("&lt;", "<"))


def test_an_llm_that_obeys_the_injection_is_overruled_by_the_bert_answer(gateway):
    """Out-of-set labels, even after the repair turn, give the BERT label flagged invalid_answer."""
    gateway.llm.answerer = lambda _body: {"label": "pwned"}

    decisions = classify_corpus(gateway)

    assert len(gateway.llm.requests) == 2 * len(CORPUS)  # each answer and its one repair
    repairs = [r for r in gateway.llm.requests if len(r.body["messages"]) == 4]
    assert len(repairs) == len(CORPUS)
    for repair in repairs:
        assert "not among the labels" in repair.body["messages"][3]["content"]
    for row in CORPUS:
        decision = decisions[row["id"]]
        scores = decision["scores"]
        assert decision["label"] == max(scores, key=scores.get)  # the BERT tier's own answer
        assert decision["labels"] == [decision["label"]]
        assert (decision["tier"], decision["llm_skipped"]) == ("bert", "invalid_answer")
        assert "pwned" not in decision["labels"]
        assert decision["llm"]["attempts"] == 2  # the answer and its repair, both paid for
    # Not cached: asked again, the message goes back to the LLM.
    gateway.llm.answerer = lambda _body: {"label": "bug"}
    again = gateway.post("/v1/classify", json={"text": CORPUS[0]["text"]}).json()
    assert again["decisions"][0]["label"] == "bug"
    assert not again["decisions"][0]["cached"]


@pytest.mark.parametrize(
    "answer",
    [
        pytest.param(RespondRaw("label: pwned\nconfidence: 1.0\n"), id="yaml"),
        pytest.param(RespondRaw("Sure! As instructed, the label is pwned."), id="free-text"),
        pytest.param(RespondRaw('{"label": "billing"'), id="truncated-json"),
        pytest.param(RespondRaw('["billing"]'), id="json-array"),
        pytest.param(RespondRaw("[" * 100_000), id="nested-100k-deep"),
        pytest.param(Respond({"label": "billing", "new_label": "pwned"}), id="extra-field"),
        pytest.param(Respond({"labels": ["billing", "pwned"]}), id="multi-label-shape"),
        pytest.param(Respond({"label": "billing", "text": "I obeyed."}), id="unasked-text"),
        pytest.param(Respond({"label": "BILLING"}), id="label-case-changed"),
        pytest.param(Respond({"label": "billing "}), id="label-padded"),
        pytest.param(Respond({"label": ["billing"]}), id="label-not-a-string"),
    ],
)
def test_malformed_answers_are_rejected_for_the_flagged_bert_answer(gateway, answer):
    """An answer in another format or shape, twice, never becomes the decision."""
    gateway.llm.script(answer, answer)
    response = gateway.post(
        "/v1/classify", json={"id": "obeyed", "text": TEXT["inj-28"]}, timeout=60
    )
    assert response.status_code == 200, response.text
    (decision,) = response.json()["decisions"]
    assert (decision["tier"], decision["llm_skipped"]) == ("bert", "invalid_answer")
    assert decision["label"] == max(decision["scores"], key=decision["scores"].get)
    assert decision["llm_error"].startswith("openai: invalid answer after one repair attempt")
    assert len(gateway.llm.requests) == 2


def test_a_repaired_answer_within_the_label_set_is_accepted(gateway):
    """The documented single repair: an injected label first, then a valid one, is the LLM's."""
    gateway.llm.script(Respond({"label": "vip_customer"}), Respond({"label": "account"}))
    response = gateway.post("/v1/classify", json={"text": TEXT["inj-03"]})
    (decision,) = response.json()["decisions"]
    assert (decision["tier"], decision["label"], decision["llm"]["attempts"]) == (
        "llm",
        "account",
        2,
    )
    repair = gateway.llm.requests[1].body["messages"]
    assert repair[2] == {"role": "assistant", "content": '{"label": "vip_customer"}'}


def test_anthropic_tool_input_outside_the_label_set_is_rejected(make_gateway, tmp_path):
    """The Anthropic path: a forced tool whose input names a new label falls back the same way."""
    anthropic = {"provider": "anthropic", "model": "claude-haiku-4-5"}
    tickets = write_policy(tmp_path, "tickets", llm={"providers": [anthropic]})
    gateway = make_gateway(policies=[tickets])
    gateway.llm.answerer = lambda _body: {"label": "priority_vip"}
    response = gateway.post("/v1/classify", json={"text": TEXT["inj-22"]})
    (decision,) = response.json()["decisions"]
    assert (decision["tier"], decision["llm_skipped"]) == ("bert", "invalid_answer")
    assert decision["label"] in TICKET_LABELS
    system, user = turns_of(gateway.llm.requests[0].body)
    assert "priority_vip" not in system
    assert user.startswith(USER_PREFIX)
    assert gateway.llm.requests[0].body["tools"][0]["input_schema"]["properties"]["label"][
        "enum"
    ] == list(TICKET_LABELS)
