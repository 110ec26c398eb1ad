"""Hostile input to the parsers: only the documented errors, and nothing silently lost.

- The policy loader (``parse_policy_text``, ``parse_policy``, ``load_policy``) raises only
  ``PolicyError`` for any text, bytes or data structure, however malformed or deeply nested.
- The records reader of ``tiergate classify`` and ``submit`` (``tiergate.workers.records``) answers
  every line of any byte string with a record or a ``RecordError`` for that line (a whole CSV
  it cannot use is one ``DataFileError``): invalid UTF-8, odd quoting, huge fields, deep JSON.
- The message schema (``tiergate.workers.schemas.Message``) validates any JSON value or raises
  pydantic's ``ValidationError``, and every valid message survives a round trip through JSON.

``tests/policies/test_spec.py`` already fuzzes policy documents whose top-level keys are the
policy's own; ``tests/workers/test_records.py`` already reads back lists of JSON objects.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from tiergate.policies.spec import (
    PolicyError,
    PolicySpec,
    example_policy,
    load_policy,
    parse_policy,
    parse_policy_text,
)
from tiergate.workers.errors import DataFileError, RecordError
from tiergate.workers.records import InputFormat, Record, read_records
from tiergate.workers.schemas import Message, Task

FUZZ = settings(max_examples=150, derandomize=True, database=None)


def policy_outcome(load, *args, **kwargs):
    """What the loader ``load`` returns, or the PolicyError it raises (others escape)."""
    try:
        return load(*args, **kwargs)
    except PolicyError as exc:
        return exc


def outcome_of_policy_text(text: str) -> PolicySpec | PolicyError:
    """The spec ``text`` parses to, or the PolicyError it raises (any other error escapes)."""
    return policy_outcome(parse_policy_text, text, source="fuzz.yaml")


def assert_named_policy_error(outcome: PolicySpec | PolicyError) -> None:
    """A PolicyError names its source and says what is wrong; a spec is usable."""
    if isinstance(outcome, PolicyError):
        assert str(outcome).startswith("fuzz.yaml: ")
        assert len(str(outcome)) > len("fuzz.yaml: ")
    else:
        assert outcome.labels


# ------------------------------------------------------------------------------ policy loader

# Pieces of YAML syntax, including the tags and anchors whose constructors fail in odd ways.
_YAML_TOKENS = st.sampled_from(
    [
        "name", "version", "labels", "escalation", "min_probability", "per_label", "band",
        "generation", "llm", "providers", "budget", "webhook", "cache", "ttl_seconds",
        ": ", ":", " ", "\n", "  ", "    ", "- ", "-", "[", "]", "{", "}", ",", "'", '"', "#",
        "|", ">", "---", "...", "%YAML 1.1\n", "&a ", "*a", "<<: ", "? ", "!!int ", "!!float ",
        "!!timestamp ", "!!binary ", "!!str ", "!!set ", "!!omap ", "!!python/object:os.system ",
        "!custom ", "2001-01-01", "2001-13-45 10:00:00 +99:00", "9" * 40, "1e999", ".nan",
        "-.inf", "0x1F", "0o17", "~", "null", "yes", "\t", "\x00", "\ufeff", "\x85", "\u2028",
        "\\u0041", "é", "a", "1", "0.5",
    ]
)  # fmt: skip


@FUZZ
@given(pieces=st.lists(_YAML_TOKENS | st.text(max_size=6), max_size=40))
def test_yaml_shaped_text_gives_a_policy_or_a_policy_error(pieces):
    """Text made of YAML syntax (tags, anchors, flow and block styles) raises only PolicyError."""
    assert_named_policy_error(outcome_of_policy_text("".join(pieces)))


@FUZZ
@given(text=st.text(max_size=300))
def test_arbitrary_text_gives_a_policy_or_a_policy_error(text):
    """Any Unicode text, control characters and surrogates included, raises only PolicyError."""
    assert_named_policy_error(outcome_of_policy_text(text))


@pytest.mark.parametrize("depth", [50, 5_000, 100_000])
@pytest.mark.parametrize(("opening", "closing"), [("[", "]"), ("{a: ", "}"), ("- ", "")])
def test_deeply_nested_yaml_is_a_policy_error(depth, opening, closing):
    """Nesting past the parser's stack is refused as a PolicyError, in flow and block style."""
    if opening == "- ":
        text = "".join(f"{'  ' * i}- \n" for i in range(min(depth, 3000))) + "  x\n"
    else:
        text = "name: " + opening * depth + "x" + closing * depth
    outcome = outcome_of_policy_text(text)
    assert isinstance(outcome, PolicyError)


@pytest.mark.parametrize(
    "value",
    [
        "!!int x",
        "!!int",
        "!!bool maybe",
        "!!bool",
        "!!timestamp",
        "!!float nonsense",
        "!!timestamp x",
        "2001-13-45",
        "2001-01-01 10:00:00 +99:00",
        "9" * 5_000,
        "!!binary '===='",
    ],
)
def test_scalars_the_yaml_constructors_cannot_convert_are_policy_errors(value):
    """A scalar PyYAML cannot construct (a bad tagged value, a false date) is a PolicyError."""
    outcome = outcome_of_policy_text(f"name: p\nversion: '1'\nlabels: [{{name: a}}]\nx: {value}\n")
    assert isinstance(outcome, PolicyError)
    assert "fuzz.yaml" in str(outcome)


_HASHABLE = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.integers(min_value=10**40, max_value=10**60)
    | st.floats()
    | st.text(max_size=8)
    | st.binary(max_size=8)
    | st.dates()
    | st.datetimes()
)
_ANY_DATA = st.recursive(
    _HASHABLE,
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.tuples(inner, inner)
        | st.dictionaries(_HASHABLE, inner, max_size=4)
        | st.sets(st.integers(), max_size=3)
    ),
    max_leaves=20,
)


@FUZZ
@given(data=_ANY_DATA)
def test_arbitrary_data_structures_give_a_policy_or_a_policy_error(data):
    """parse_policy on any structure (odd keys, bytes, dates, NaN, sets) raises only PolicyError."""
    assert_named_policy_error(policy_outcome(parse_policy, data, source="fuzz.yaml"))


def _paths(value, prefix=()):
    """Every path into a JSON-shaped value, the root included."""
    yield prefix
    if isinstance(value, dict):
        for key, item in value.items():
            yield from _paths(item, (*prefix, key))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from _paths(item, (*prefix, index))


def _replaced(value, path, new):
    """A copy of ``value`` with the element at ``path`` replaced by ``new``."""
    if not path:
        return new
    head, rest = path[0], path[1:]
    if isinstance(value, dict):
        return {**value, head: _replaced(value[head], rest, new)}
    return [_replaced(item, rest, new) if i == head else item for i, item in enumerate(value)]


_EXAMPLE = example_policy("ticket-routing").model_dump(mode="json")
_EXAMPLE_PATHS = list(_paths(_EXAMPLE))


@FUZZ
@given(path=st.sampled_from(_EXAMPLE_PATHS), new=_ANY_DATA, through_yaml=st.booleans())
def test_a_valid_policy_with_one_part_replaced_gives_a_policy_or_a_policy_error(
    path, new, through_yaml
):
    """One value of a real policy swapped for anything reaches the validators: a PolicyError."""
    document = _replaced(_EXAMPLE, path, new)
    if through_yaml:
        try:
            text = yaml.safe_dump(document, allow_unicode=True)
        except yaml.representer.RepresenterError:
            return  # safe_dump cannot write a tuple: there is no text to load
        outcome = policy_outcome(parse_policy_text, text, source="fuzz.yaml")
    else:
        outcome = policy_outcome(parse_policy, document, source="fuzz.yaml")
    assert_named_policy_error(outcome)


@FUZZ
@given(content=st.binary(max_size=400) | st.text(max_size=200).map(str.encode))
def test_any_policy_file_bytes_give_a_policy_or_a_policy_error(tmp_path_factory, content):
    """load_policy on a file of any bytes (invalid UTF-8 included) raises only PolicyError."""
    path = tmp_path_factory.mktemp("policy") / "fuzzed.yaml"
    path.write_bytes(content)
    outcome = policy_outcome(load_policy, path)
    if isinstance(outcome, PolicyError):
        assert str(outcome).startswith(str(path))
    else:
        assert outcome.labels


def test_policy_file_names_the_os_refuses_are_policy_errors(tmp_path):
    """A missing file, a directory and a name with a NUL byte are PolicyErrors too."""
    for path in (tmp_path / "missing.yaml", tmp_path, Path(f"{tmp_path}/a\x00b.yaml")):
        with pytest.raises(PolicyError):
            load_policy(path)


# ------------------------------------------------------------------------------ records reader


def physical_lines(data: bytes) -> int:
    """How many lines the JSONL and text readers must account for (see tiergate.workers.records)."""
    lines = data.removeprefix(b"\xef\xbb\xbf").split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    return len(lines)


_JSONL_LINES = st.one_of(
    st.binary(max_size=40),
    st.text(max_size=40).map(lambda t: t.encode("utf-8", "surrogatepass")),
    st.dictionaries(st.text(max_size=5), st.integers() | st.text(max_size=5), max_size=3).map(
        lambda obj: json.dumps(obj).encode()
    ),
    st.integers(1, 200_000).map(lambda depth: b"[" * depth + b"]" * depth),
    st.integers(1, 200_000).map(lambda depth: b'{"a":' * depth + b"1" + b"}" * depth),
    st.integers(4_000, 20_000).map(lambda digits: b'{"n": ' + b"7" * digits + b"}"),
    st.sampled_from(
        [
            b'{"text": "caf\xe9"}',  # Latin-1, not UTF-8
            b'{"text": "\xed\xa0\x80"}',  # an encoded surrogate
            b'{"text": "\\ud800"}',  # a lone surrogate escape
            b'{"text": NaN, "x": Infinity}',
            b'{"a": 1}\r',
            b"\xef\xbb\xbf{}",
            b"\x00",
            b"",
            b"   ",
            b'"just a string"',
            b"[1, 2]",
            b"null",
            b'{"a": 1} trailing',
        ]
    ),
)


@FUZZ
@given(
    lines=st.lists(_JSONL_LINES, max_size=8),
    bom=st.booleans(),
    final_newline=st.booleans(),
    fmt=st.sampled_from([InputFormat.JSONL, InputFormat.TEXT]),
)
def test_every_jsonl_or_text_line_is_a_record_or_an_error(lines, bom, final_newline, fmt):
    """Any bytes, line by line: one record or one RecordError per line, numbered, nothing lost."""
    data = (b"\xef\xbb\xbf" if bom else b"") + b"\n".join(lines)
    if lines and final_newline:
        data += b"\n"

    items = list(read_records(data, fmt))

    assert [item.line for item in items] == list(range(1, physical_lines(data) + 1))
    for item in items:
        assert isinstance(item, Record | RecordError)
        if isinstance(item, Record):
            assert isinstance(item.fields, dict)
        else:
            assert item.reason


def test_jsonl_line_nested_past_the_recursion_limit_is_an_error_on_its_line():
    """A line of 100,000 nested arrays is reported on its line; the next line is still read."""
    data = b'{"text": "first"}\n' + b"[" * 100_000 + b"]" * 100_000 + b'\n{"text": "third"}\n'
    items = list(read_records(data, InputFormat.JSONL))
    assert [type(item) for item in items] == [Record, RecordError, Record]
    assert (items[1].line, items[1].reason) == (2, "malformed JSON: nested too deeply")


def test_jsonl_integer_too_long_to_convert_is_an_error_on_its_line():
    """An integer of 5,000 digits (past Python's conversion limit) is a RecordError, not a crash."""
    items = list(read_records(b'{"n": ' + b"1" * 5_000 + b"}\n", InputFormat.JSONL))
    assert [(type(i), i.line) for i in items] == [(RecordError, 1)]
    assert "too many digits" in items[0].reason


def test_jsonl_huge_line_is_read_whole():
    """A 5 MB text on one line is one record holding all of it."""
    text = "long ticket " * 450_000
    (item,) = read_records(json.dumps({"text": text}).encode() + b"\n", InputFormat.JSONL)
    assert isinstance(item, Record)
    assert item.fields["text"] == text


_CSV_FIELD = st.text(
    alphabet=st.characters(exclude_categories=["Cs"]) | st.sampled_from('",\r\n '), max_size=20
)


@FUZZ
@given(
    header=st.lists(
        st.text(alphabet=st.characters(exclude_categories=["Cs"]), min_size=1, max_size=6).filter(
            lambda name: not name.startswith("\ufeff")  # a leading BOM is not content
        ),
        min_size=1,
        max_size=4,
        unique=True,
    ),
    rows=st.lists(st.lists(_CSV_FIELD, min_size=4, max_size=4), max_size=6),
    # A bare CR in a field is quoted only when the line terminator holds one (or always).
    dialect=st.sampled_from(
        [("\r\n", csv.QUOTE_MINIMAL), ("\r\n", csv.QUOTE_ALL), ("\n", csv.QUOTE_ALL)]
    ),
)
def test_any_csv_written_by_a_csv_writer_reads_back_exactly(header, rows, dialect):
    """Quotes, commas, CR/LF and any Unicode in fields survive: each row is one record, in order."""
    rows = [row[: len(header)] for row in rows]
    terminator, quoting = dialect
    buffer = io.StringIO(newline="")
    writer = csv.writer(buffer, lineterminator=terminator, quoting=quoting)
    writer.writerow(header)
    writer.writerows(rows)

    items = list(read_records(buffer.getvalue().encode(), InputFormat.CSV))

    assert [item.fields for item in items if isinstance(item, Record)] == [
        dict(zip(header, row, strict=True)) for row in rows
    ]
    lines = [item.line for item in items]
    assert lines == sorted(set(lines))
    assert all(line >= 2 for line in lines)


def read_csv(data: bytes) -> list[Record | RecordError] | DataFileError:
    """Every item of ``data`` read as CSV with a text column, or the DataFileError raised."""
    try:
        return list(read_records(data, InputFormat.CSV, required=("text",)))
    except DataFileError as exc:
        return exc


@FUZZ
@given(
    header=st.sampled_from([b"text", b"text,id", b'"te""xt",id', b"id,text,extra"]),
    body=st.lists(
        st.binary(max_size=20)
        | st.sampled_from(
            [b'"unclosed, quote', b'a"b,c', b'"x"y', b"\xff\xfe", b"\x00", b'""', b",,,", b"\r"]
        ),
        max_size=10,
    ),
)
def test_any_csv_bytes_give_records_errors_or_one_data_file_error(header, body):
    """Arbitrary CSV rows: each item a record or RecordError, in line order, none before row 2."""
    data = header + b"\n" + b"\n".join(body)
    items = read_csv(data)
    if isinstance(items, DataFileError):
        assert str(items).startswith("input: ")
        return
    lines = [item.line for item in items]
    assert lines == sorted(set(lines))
    assert all(2 <= line <= data.count(b"\n") + data.count(b"\r") + 2 for line in lines)
    columns = next(csv.reader([header.decode()]))
    for item in items:
        if isinstance(item, Record):
            assert list(item.fields) == columns
            assert "text" in item.fields
        else:
            assert isinstance(item, RecordError)
            assert item.reason


@pytest.mark.parametrize(
    ("data", "problem"),
    [
        (b'"text\n"unclosed\n', "malformed CSV header"),
        (b"te\xffxt,id\nhello,1\n", "not valid UTF-8"),
        (b"", "empty CSV"),
        (b"id\n1\n", "lacks column 'text'"),
    ],
)
def test_unusable_csv_header_is_one_data_file_error(data, problem):
    """A header that is malformed, not UTF-8, absent or lacks the text column: a DataFileError."""
    with pytest.raises(DataFileError, match=problem):
        list(read_records(data, InputFormat.CSV, required=("text",), source="in.csv"))


def test_csv_field_over_the_default_field_limit_is_read_whole():
    """A 300 KB field (over the csv module's 128 KiB default) is one record, not an error."""
    text = "x" * 300_000
    (item,) = read_records(f'text\n"{text}"\n'.encode(), InputFormat.CSV, required=("text",))
    assert isinstance(item, Record)
    assert item.fields["text"] == text


# ------------------------------------------------------------------------------ message schema

_JSON_SCALARS = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.integers(min_value=2**63, max_value=10**40)
    | st.floats()
    | st.text(max_size=12)
    | st.text(alphabet=st.characters(categories=["Cs"]), min_size=1, max_size=2)
)
_JSON_VALUES = st.recursive(
    _JSON_SCALARS,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner),
    max_leaves=12,
)
_MESSAGE_LIKE = st.fixed_dictionaries(
    {},
    optional={
        "id": _JSON_VALUES,
        "text": _JSON_VALUES,
        "policy": _JSON_VALUES,
        "task": st.sampled_from([t.value for t in Task]) | _JSON_VALUES,
        "metadata": st.dictionaries(st.text(max_size=6), _JSON_SCALARS, max_size=3) | _JSON_VALUES,
        "extra": _JSON_VALUES,
    },
)


def assert_round_trips(message: Message) -> None:
    """The message reads back equal from its JSON, its JSON-mode dump and a json.dumps of it."""
    assert Message.model_validate_json(message.model_dump_json()) == message
    wire = json.dumps(message.model_dump(mode="json"), allow_nan=False)  # what Celery sends
    assert Message.model_validate(json.loads(wire)) == message


@FUZZ
@given(value=_MESSAGE_LIKE | _JSON_VALUES)
def test_any_json_value_is_a_message_or_a_validation_error(value):
    """Any JSON-shaped value validates or raises ValidationError; what validates round-trips."""
    try:
        message = Message.model_validate(value)
    except ValidationError:
        return
    assert message.text.strip()
    assert_round_trips(message)


@FUZZ
@given(raw=st.text(max_size=80) | _MESSAGE_LIKE.map(lambda v: json.dumps(v, allow_nan=True)))
def test_any_json_text_is_a_message_or_a_validation_error(raw):
    """Any text given to model_validate_json validates or raises ValidationError."""
    try:
        message = Message.model_validate_json(raw)
    except ValidationError:
        return
    assert_round_trips(message)


_VALID_TEXT = st.text(alphabet=st.characters(exclude_categories=["Cs"]), min_size=1).filter(
    str.strip
)


@FUZZ
@given(
    message_id=st.text(alphabet=st.characters(exclude_categories=["Cs"]), min_size=1, max_size=256),
    text=_VALID_TEXT,
    policy=st.text(alphabet=st.characters(exclude_categories=["Cs"]), min_size=1, max_size=128),
    task=st.sampled_from(list(Task)),
    metadata=st.dictionaries(
        st.text(alphabet=st.characters(exclude_categories=["Cs"]), max_size=10),
        st.none()
        | st.booleans()
        | st.integers()
        | st.floats(allow_nan=False, allow_infinity=False)
        | st.text(alphabet=st.characters(exclude_categories=["Cs"]), max_size=10),
        max_size=4,
    ),
)
def test_every_valid_message_is_accepted_and_round_trips(message_id, text, policy, task, metadata):
    """Fields within the documented rules are accepted as given and survive JSON both ways."""
    message = Message.model_validate(
        {"id": message_id, "text": text, "policy": policy, "task": task.value, "metadata": metadata}
    )
    assert (message.id, message.text, message.policy, message.task) == (
        message_id,
        text,
        policy,
        task,
    )
    assert message.metadata == metadata
    assert_round_trips(message)


@pytest.mark.parametrize(
    "metadata",
    [
        {"score": math.nan},
        {"score": math.inf},
        {"bad\ud800key": 1},
        {"key": "bad \udc80 value"},
    ],
)
def test_metadata_that_json_cannot_carry_is_refused(metadata):
    """NaN, infinity and lone surrogates in metadata are refused: no valid JSON could carry them."""
    with pytest.raises(ValidationError, match="metadata"):
        Message(text="hello", metadata=metadata)


def test_classify_cli_answers_every_hostile_line_in_place(tiny_model, tmp_path):
    """`tiergate classify` on hostile JSONL: one output line per input line, exit 1, no crash."""
    hostile = [
        b'{"id": "ok-1", "text": "The export button crashes."}',
        b'{"text": "deep", "x": ' + b"[" * 50_000 + b"]" * 50_000 + b"}",
        b'{"text": "long number", "n": ' + b"7" * 6_000 + b"}",
        b'{"text": "surrogate in metadata", "note": "\\ud800"}',
        b'{"text": "surrogate in a key", "metadata": {"\\udc80": 1}}',
        b'{"text": "not a number", "score": NaN}',
        b'{"text": "caf\xe9"}',
        b'{"text": "\\ud83d"}',
        b'{"id": "ok-2", "text": "I was charged twice."}',
    ]
    source = tmp_path / "hostile.jsonl"
    source.write_bytes(b"\n".join(hostile) + b"\n")
    out = tmp_path / "out.jsonl"
    env = {k: v for k, v in os.environ.items() if not k.startswith("TIERGATE_")}
    env |= {"TIERGATE_MODEL_DIR": str(tiny_model), "TIERGATE_DATA_DIR": str(tmp_path)}
    command = ["classify", "--no-cache", "-i", str(source), "-o", str(out)]
    result = subprocess.run(
        [sys.executable, "-m", "tiergate", *command],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    answers = [json.loads(line) for line in out.read_text("utf-8").splitlines()]
    assert len(answers) == len(hostile)
    assert [a.get("id") for a in answers] == ["ok-1", *[None] * 7, "ok-2"]
    assert [a["line"] for a in answers[1:-1]] == list(range(2, 9))
    assert all(a["error"] for a in answers[1:-1])
    assert "9 messages: 2 answered, 7 rejected" in result.stderr
