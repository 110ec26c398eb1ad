import pytest
from hypothesis import assume, given
from hypothesis import strategies as st
from pydantic import ValidationError

from tiergate.workers.schemas import Message, Prediction, Task


def prediction(labels: tuple[str, ...], probabilities: tuple[float, ...]) -> Prediction:
    """A single-window prediction of a test model over ``labels``."""
    return Prediction(
        labels=labels,
        probabilities=probabilities,
        multi_label=False,
        chunks=1,
        model_version="test-1",
    )


@pytest.mark.parametrize("text", ["", " ", "\t\n  \r\n"])
def test_message_rejects_empty_or_whitespace_text(text):
    """A text that is empty or only whitespace is refused."""
    with pytest.raises(ValidationError, match="empty or only whitespace"):
        Message(text=text)


@pytest.mark.parametrize("text", [42, None, ["hello"], b"hello"])
def test_message_rejects_text_that_is_not_a_string(text):
    """A text that is not a str (number, null, list, bytes) is refused, not coerced."""
    with pytest.raises(ValidationError, match="text"):
        Message(text=text)


def test_message_moves_extra_scalar_fields_into_metadata():
    """A field the schema does not define, holding a JSON scalar, travels in ``metadata``."""
    payload = {"id": "c3-bad-extra", "text": "A fine film.", "lang": "en", "stars": 4}
    payload |= {"score": 0.5, "reviewed": False, "editor": None}

    message = Message.model_validate(payload)

    assert message.metadata == {
        "lang": "en",
        "stars": 4,
        "score": 0.5,
        "reviewed": False,
        "editor": None,
    }
    assert Message.model_validate_json(message.model_dump_json()) == message
    assert Message(text="hello", lang="en").metadata == {"lang": "en"}


def test_message_metadata_wins_over_an_extra_field_of_the_same_name():
    """An extra field and a ``metadata`` key of the same name: the explicit metadata is kept."""
    message = Message.model_validate(
        {"text": "hello", "lang": "en", "channel": "web", "metadata": {"lang": "fr"}}
    )

    assert message.metadata == {"lang": "fr", "channel": "web"}


@pytest.mark.parametrize("value", [["a", "b"], {"nested": 1}])
def test_message_rejects_an_extra_field_that_is_not_a_scalar_naming_it(value):
    """An extra field holding a list or an object is refused, the error naming that field."""
    with pytest.raises(ValidationError) as caught:
        Message.model_validate({"text": "hello", "tags": value})

    errors = caught.value.errors()
    assert [error["loc"] for error in errors] == [("tags",)]
    assert "must be a JSON scalar" in errors[0]["msg"]


def test_message_with_invalid_metadata_reports_metadata_not_its_extra_fields():
    """With ``metadata`` not an object, that is the error; scalar extra fields are not blamed."""
    with pytest.raises(ValidationError) as caught:
        Message.model_validate({"text": "hello", "lang": "en", "metadata": ["x"]})

    assert [error["loc"][0] for error in caught.value.errors()] == ["metadata"]


@pytest.mark.parametrize("text", ["a\ud800b", "\udfff", "ok \udc80"])
def test_message_rejects_lone_surrogates(text):
    """A text holding a lone surrogate (bytes that were not UTF-8) is refused."""
    with pytest.raises(ValidationError, match="not valid UTF-8"):
        Message(text=text)


def test_message_keeps_text_and_defaults():
    """A valid text is kept untouched, with the default policy and task."""
    message = Message(text="  Where is my parcel?\n")

    assert message.text == "  Where is my parcel?\n"
    assert message.policy == "default"
    assert message.task is Task.CLASSIFY


def test_message_assigns_a_distinct_id_when_absent():
    """Messages without an id each get a fresh non-empty hex id."""
    first, second = Message(text="one"), Message(text="two")

    assert len(first.id) == 32
    assert set(first.id) <= set("0123456789abcdef")
    assert first.id != second.id


def test_message_keeps_the_producer_id():
    """An id supplied by the producer is kept as given."""
    assert Message(id="order-17", text="hello").id == "order-17"


def test_prediction_ranks_its_labels():
    """top_label, top_probability and margin come from the highest and runner-up probabilities."""
    result = prediction(("neg", "neu", "pos"), (0.2, 0.5, 0.3))

    assert result.top_label == "neu"
    assert result.top_probability == 0.5
    assert result.margin == pytest.approx(0.2)


def test_prediction_margin_is_zero_on_a_tie():
    """Two labels sharing the top probability leave a margin of 0."""
    assert prediction(("a", "b", "c"), (0.4, 0.2, 0.4)).margin == 0.0


def test_prediction_margin_of_a_single_label_is_one():
    """With only one label there is no runner-up, and the margin is 1."""
    assert prediction(("spam",), (0.3,)).margin == 1.0


def test_prediction_labels_above_includes_the_threshold_in_label_order():
    """labels_above keeps labels at or above the threshold, in the order of ``labels``."""
    result = prediction(("toxic", "insult", "threat", "spam"), (0.9, 0.5, 0.49, 0.7))

    assert result.labels_above(0.5) == ["toxic", "insult", "spam"]
    assert result.labels_above(0.95) == []


def test_prediction_scores_pair_labels_with_probabilities():
    """scores() maps each label to its own probability."""
    result = prediction(("neg", "pos"), (0.25, 0.75))

    assert result.scores() == {"neg": 0.25, "pos": 0.75}


@given(st.lists(st.floats(min_value=0.0, max_value=1.0), min_size=1, max_size=10))
def test_prediction_margin_lies_between_zero_and_one(weights):
    """For any probability vector summing to 1, margin is top minus runner-up and in [0, 1]."""
    total = sum(weights)
    assume(total > 0.0)
    probabilities = tuple(weight / total for weight in weights)
    labels = tuple(f"label-{i}" for i in range(len(probabilities)))

    result = prediction(labels, probabilities)

    assert 0.0 <= result.margin <= 1.0
    ranked = sorted(probabilities, reverse=True)
    expected = ranked[0] - ranked[1] if len(ranked) > 1 else 1.0
    assert result.margin == expected
    assert result.top_probability == ranked[0]
