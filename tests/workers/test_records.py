import json
from pathlib import Path
from typing import NamedTuple

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tiergate.workers.errors import DataFileError, RecordError
from tiergate.workers.records import InputFormat, Record, detect_format, read_bytes, read_records

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(), children, max_size=3)
    ),
    max_leaves=8,
)
json_objects = st.dictionaries(st.text(), json_values, max_size=4)


class Failure(NamedTuple):
    """A RecordError's fields; exceptions do not compare equal, so tests compare these."""

    line: int
    reason: str


def parse(data: bytes, fmt: InputFormat, **options: object) -> list[Record | Failure]:
    """Every item read_records yields for ``data``, each error as a comparable Failure."""
    return [
        Failure(item.line, item.reason) if isinstance(item, RecordError) else item
        for item in read_records(data, fmt, **options)  # type: ignore[arg-type]
    ]


def test_jsonl_malformed_line_is_reported_and_the_others_still_read():
    """A malformed JSON line yields an error carrying its line number; its neighbours parse."""
    data = b'{"text": "a"}\n{"text": \n{"text": "c"}\n'

    items = parse(data, InputFormat.JSONL)

    assert items == [
        Record(1, {"text": "a"}),
        Failure(2, "malformed JSON: Expecting value at column 10"),
        Record(3, {"text": "c"}),
    ]


@pytest.mark.parametrize(
    ("line", "kind"),
    [
        pytest.param(b"[1, 2]", "an array", id="array"),
        pytest.param(b'"text"', "a string", id="string"),
        pytest.param(b"3.5", "a number", id="number"),
        pytest.param(b"true", "a boolean", id="boolean"),
        pytest.param(b"null", "null", id="null"),
    ],
)
def test_jsonl_value_that_is_not_an_object_is_reported(line, kind):
    """A line holding valid JSON that is not an object yields an error naming what it is."""
    items = parse(b'{"a": 1}\n' + line + b"\n", InputFormat.JSONL)

    assert items[1] == Failure(2, f"expected a JSON object, got {kind}")


@pytest.mark.parametrize("blank", [b"", b"   ", b"\t"])
def test_jsonl_blank_line_is_reported(blank):
    """An empty or whitespace-only line between objects yields an error on that line."""
    items = parse(b'{"a": 1}\n' + blank + b'\n{"a": 2}\n', InputFormat.JSONL)

    assert items == [
        Record(1, {"a": 1}),
        Failure(2, "blank line where a JSON object was expected"),
        Record(3, {"a": 2}),
    ]


def test_jsonl_invalid_utf8_is_reported_on_its_line_only():
    """A line with bytes that are not UTF-8 yields an error there; the other lines parse."""
    data = b'{"a": 1}\n{"a":"\xff"}\n{"a": 3}\n'

    items = parse(data, InputFormat.JSONL)

    assert items == [
        Record(1, {"a": 1}),
        Failure(2, "not valid UTF-8 (byte 7 of the line)"),
        Record(3, {"a": 3}),
    ]


def test_jsonl_crlf_line_endings_are_accepted():
    """Lines ending in CRLF parse like lines ending in LF."""
    items = parse(b'{"a": 1}\r\n{"a": 2}\r\n', InputFormat.JSONL)

    assert items == [Record(1, {"a": 1}), Record(2, {"a": 2})]


def test_jsonl_last_line_without_a_newline_is_read():
    """A final line with no newline after it is still a record, and no blank line is invented."""
    items = parse(b'{"a": 1}\n{"a": 2}', InputFormat.JSONL)

    assert items == [Record(1, {"a": 1}), Record(2, {"a": 2})]


def test_jsonl_empty_input_yields_nothing():
    """Empty input holds no records and no errors."""
    assert parse(b"", InputFormat.JSONL) == []


@given(
    objects=st.lists(json_objects, max_size=8),
    ensure_ascii=st.booleans(),
    newline=st.sampled_from(["\n", "\r\n"]),
    final_newline=st.booleans(),
)
def test_jsonl_reader_yields_one_record_per_line_in_order(
    objects, ensure_ascii, newline, final_newline
):
    """Any list of JSON objects written one per line reads back as those objects, in order."""
    text = newline.join(json.dumps(obj, ensure_ascii=ensure_ascii) for obj in objects)
    if objects and final_newline:
        text += newline

    items = parse(text.encode(), InputFormat.JSONL)

    assert items == [Record(number, obj) for number, obj in enumerate(objects, start=1)]


def test_csv_multiline_field_keeps_the_next_record_on_its_own_line():
    """A quoted field spanning two lines is one record; the next reports its real start line."""
    data = b'text,label\n"line one\nline two",pos\nplain,neg\n'

    items = parse(data, InputFormat.CSV, required=("text", "label"))

    assert items == [
        Record(2, {"text": "line one\nline two", "label": "pos"}),
        Record(4, {"text": "plain", "label": "neg"}),
    ]


def test_csv_with_crlf_line_endings_counts_lines_correctly():
    """CRLF line endings, inside a quoted field too, keep line numbers and field text right."""
    data = b'text,label\r\n"one\r\ntwo",pos\r\nthree,neg\r\n'

    items = parse(data, InputFormat.CSV)

    assert items == [
        Record(2, {"text": "one\r\ntwo", "label": "pos"}),
        Record(4, {"text": "three", "label": "neg"}),
    ]


def test_csv_missing_required_column_raises_naming_it():
    """A header without a required column raises DataFileError before yielding any record."""
    records = read_records(b"text,score\nhi,1\n", InputFormat.CSV, required=("text", "label"))

    with pytest.raises(DataFileError, match="'label'"):
        next(records)


def test_csv_without_a_header_raises():
    """Empty CSV input has no header row and raises DataFileError naming the source."""
    with pytest.raises(DataFileError, match=r"^upload\.csv: empty CSV"):
        parse(b"", InputFormat.CSV, source="upload.csv")


def test_csv_row_with_the_wrong_number_of_fields_is_reported():
    """A row whose field count differs from the header's yields an error; later rows parse."""
    items = parse(b"text,label\na,b,c\nd,e\n", InputFormat.CSV)

    assert items == [
        Failure(2, "has 3 fields, the header has 2"),
        Record(3, {"text": "d", "label": "e"}),
    ]


def test_csv_blank_line_is_reported():
    """A blank line between CSV rows yields an error on that line."""
    items = parse(b"text,label\na,b\n\nc,d\n", InputFormat.CSV)

    assert items == [
        Record(2, {"text": "a", "label": "b"}),
        Failure(3, "blank line where a CSV record was expected"),
        Record(4, {"text": "c", "label": "d"}),
    ]


def test_csv_invalid_utf8_is_reported_on_its_row_only():
    """A row with bytes that are not UTF-8 yields an error; the rows around it parse intact."""
    data = b"text,label\nok,pos\nbad\xff,neg\nfine,neg\n"

    items = parse(data, InputFormat.CSV)

    assert items == [
        Record(2, {"text": "ok", "label": "pos"}),
        Failure(3, "not valid UTF-8"),
        Record(4, {"text": "fine", "label": "neg"}),
    ]


def test_csv_byte_order_mark_is_not_part_of_the_first_column_name():
    """A UTF-8 BOM before the header is dropped, so the first column keeps its plain name."""
    data = b"\xef\xbb\xbftext,label\nhi,pos\n"

    items = parse(data, InputFormat.CSV, required=("text",))

    assert items == [Record(2, {"text": "hi", "label": "pos"})]


def test_text_format_yields_one_record_per_line():
    """Each plain-text line becomes a record holding the line, without its line ending."""
    items = parse(b"first\r\nsecond\nthird", InputFormat.TEXT)

    assert items == [
        Record(1, {"text": "first"}),
        Record(2, {"text": "second"}),
        Record(3, {"text": "third"}),
    ]


def test_text_format_puts_each_line_in_the_named_field():
    """The text_field option names the field each line becomes."""
    assert parse(b"hello\n", InputFormat.TEXT, text_field="body") == [Record(1, {"body": "hello"})]


def test_text_format_reports_invalid_utf8_on_its_line_only():
    """A plain-text line that is not UTF-8 yields an error; the other lines are records."""
    items = parse(b"ok\n\xc3\x28\nfine\n", InputFormat.TEXT)

    assert items == [
        Record(1, {"text": "ok"}),
        Failure(2, "not valid UTF-8 (byte 1 of the line)"),
        Record(3, {"text": "fine"}),
    ]


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("in.jsonl", InputFormat.JSONL),
        ("in.ndjson", InputFormat.JSONL),
        ("in.json", InputFormat.JSONL),
        ("IN.JSONL", InputFormat.JSONL),
        ("in.csv", InputFormat.CSV),
        ("in.txt", InputFormat.TEXT),
    ],
)
def test_detect_format_by_extension(name, expected):
    """A known extension decides the format whatever the content looks like."""
    assert detect_format(Path(name), b'{"text": "looks like JSON"}') is expected


@pytest.mark.parametrize(
    ("path", "head", "expected"),
    [
        pytest.param(None, b'{"text": "a"}\n', InputFormat.JSONL, id="object"),
        pytest.param(None, b'\n  \t{"text": "a"}', InputFormat.JSONL, id="object-after-space"),
        pytest.param(None, b"hello there\n", InputFormat.TEXT, id="plain-text"),
        pytest.param(None, b"", InputFormat.TEXT, id="empty"),
        pytest.param(Path("in.dat"), b'{"a": 1}', InputFormat.JSONL, id="unknown-extension"),
    ],
)
def test_detect_format_by_content(path, head, expected):
    """Without a known extension, a leading '{' means JSONL and anything else means text."""
    assert detect_format(path, head) is expected


def test_read_bytes_returns_the_file_contents(tmp_path):
    """read_bytes returns a readable file's exact bytes."""
    path = tmp_path / "in.jsonl"
    path.write_bytes(b'{"a": 1}\n\xff')

    assert read_bytes(path) == b'{"a": 1}\n\xff'


def test_read_bytes_of_a_missing_file_raises(tmp_path):
    """A path that does not exist raises DataFileError saying so."""
    with pytest.raises(DataFileError, match="no such file"):
        read_bytes(tmp_path / "absent.jsonl")


def test_read_bytes_of_a_directory_raises(tmp_path):
    """A directory path raises DataFileError saying it is not a file."""
    with pytest.raises(DataFileError, match="is a directory"):
        read_bytes(tmp_path)
