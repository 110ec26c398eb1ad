import pytest
from hypothesis import given
from hypothesis import strategies as st

from tiergate.workers.llm.redact import Redactor, iban_valid, luhn_valid

redactor = Redactor()


def redacted(text: str) -> str:
    """The redacted form of ``text``."""
    return redactor.redact(text)[0]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("write to jane.doe@example.com today", "write to [EMAIL_1] today"),
        ("JOHN+tag@mail.example.co.uk.", "[EMAIL_1]."),
        ("<a_b-c@sub-domain.example.org>", "<[EMAIL_1]>"),
    ],
)
def test_email_addresses_are_redacted(text, expected):
    """E-mail addresses, including plus tags and sub-domains, become [EMAIL_n]."""
    assert redacted(text) == expected


@pytest.mark.parametrize(
    "phone",
    [
        "+44 20 7946 0958",
        "+1-202-555-0143",
        "+49 (0)30 1234567",
        "+33 1 23 45 67 89",
        "+4915123456789",
        "(555) 123-4567",
        "555-123-4567",
        "555.123.4567",
        "020 7946 0958",
        "07700 900123",
        "030 1234567",
        "01 23 45 67 89",
        "0044 20 7946 0958",
    ],
)
def test_phone_numbers_are_redacted(phone):
    """International and common national phone formats become [PHONE_1]."""
    assert redacted(f"call me on {phone} please") == "call me on [PHONE_1] please"


@pytest.mark.parametrize(
    "card",
    [
        "4111 1111 1111 1111",
        "4111-1111-1111-1111",
        "5500005555555559",
        "3782 822463 10005",  # American Express, 15 digits
        "6011 0009 9013 9424",
    ],
)
def test_luhn_valid_card_numbers_are_redacted(card):
    """Card numbers of 13 to 19 digits that pass the Luhn check become [CARD_1]."""
    assert redacted(f"my card is {card}, thanks") == "my card is [CARD_1], thanks"


def test_a_card_number_failing_luhn_is_kept():
    """Sixteen digits that fail the Luhn check are not a card number."""
    text = "reference 4111 1111 1111 1112 attached"
    assert redacted(text) == text


def test_a_card_number_followed_by_another_number_is_found():
    """A valid card number is still found when another digit group follows it."""
    assert redacted("card 4111 1111 1111 1111 7 times") == "card [CARD_1] 7 times"


@pytest.mark.parametrize(
    "iban",
    ["DE89 3704 0044 0532 0130 00", "GB82WEST12345698765432", "FR14 2004 1010 0505 0001 3M02 606"],
)
def test_mod97_valid_ibans_are_redacted(iban):
    """IBANs that pass the ISO 13616 mod-97 check become [IBAN_1], with or without spaces."""
    assert redacted(f"pay to {iban} by Friday") == "pay to [IBAN_1] by Friday"


def test_an_iban_followed_by_a_capitalised_word_is_found():
    """An upper-case word after an IBAN does not hide it."""
    assert (
        redacted("IBAN GB82WEST12345698765432 AND NOTHING ELSE") == "IBAN [IBAN_1] AND NOTHING ELSE"
    )


def test_an_iban_failing_mod97_is_kept():
    """An IBAN-shaped string with a wrong check digit is not redacted."""
    text = "account GB83WEST12345698765432 closed"
    assert redacted(text) == text


@pytest.mark.parametrize(
    "address",
    ["192.168.1.20", "8.8.8.8", "2001:db8::ff00:42:8329", "::1", "fe80::1", "::ffff:192.0.2.1"],
)
def test_ip_addresses_are_redacted(address):
    """IPv4 and IPv6 addresses, including IPv4-mapped ones, become [IP_1]."""
    assert redacted(f"login from {address} failed") == "login from [IP_1] failed"


def test_an_ip_address_at_the_end_of_a_sentence_is_redacted():
    """A full stop after an IPv4 address does not hide it."""
    assert redacted("it came from 10.0.0.7.") == "it came from [IP_1]."


@pytest.mark.parametrize(
    "text",
    [
        "I bought it in 2024 and again in 1999.",
        "It cost 1,234.56 EUR, or $1 234 567 in total.",
        "Order number 12345678 has not arrived.",
        "Order #100234567 was shipped.",
        "Running version 1.2.3 (build 10.0.19041.1) on v2.4.1.8.",
        "The meeting is on 01.02.2024 at 10:30:45, room 4.",
        "Pi is 3.14159 and e is 2.71828.",
        "Use std::vector and a::b in C++.",
        "The MAC address 00:1A:2B:3C:4D:5E is not an IP.",
        "Dates 2024-01-15 and 15/01/2024 stay.",
        "Call 911 or 112 in an emergency.",
    ],
)
def test_ordinary_numbers_are_not_redacted(text):
    """Years, amounts, order numbers, versions, dates, times and decimals stay as written."""
    assert redacted(text) == text


def test_the_same_value_gets_the_same_placeholder():
    """A value repeated in one text maps to one placeholder; another value gets the next."""
    text, mapping = redactor.redact("a@x.io, b@x.io, a@x.io")
    assert text == "[EMAIL_1], [EMAIL_2], [EMAIL_1]"
    assert mapping == {"[EMAIL_1]": "a@x.io", "[EMAIL_2]": "b@x.io"}


def test_kinds_are_numbered_separately():
    """Each kind of personal data counts from 1."""
    text, _ = redactor.redact("a@x.io +44 20 7946 0958 10.1.2.3 4111111111111111")
    assert text == "[EMAIL_1] [PHONE_1] [IP_1] [CARD_1]"


def test_placeholders_already_in_the_text_are_not_reused():
    """A sender's own "[EMAIL_1]" keeps its meaning: the real address gets another number."""
    text, mapping = redactor.redact("I typed [EMAIL_1] by mistake; mine is a@x.io")
    assert text == "I typed [EMAIL_1] by mistake; mine is [EMAIL_2]"
    assert redactor.restore("Sent to [EMAIL_2], not [EMAIL_1]", mapping) == (
        "Sent to a@x.io, not [EMAIL_1]"
    )


def test_restore_puts_values_back_and_leaves_unknown_placeholders():
    """Restoring replaces known placeholders and leaves anything else untouched."""
    _, mapping = redactor.redact("call +1-202-555-0143 or mail a@x.io")
    restored = redactor.restore("We'll call [PHONE_1] and mail [EMAIL_1], not [EMAIL_9].", mapping)
    assert restored == "We'll call +1-202-555-0143 and mail a@x.io, not [EMAIL_9]."


def test_luhn_and_mod97_checks():
    """The checksum helpers accept known-good numbers and reject a changed digit."""
    assert luhn_valid("79927398713")
    assert not luhn_valid("79927398714")
    assert iban_valid("DE89370400440532013000")
    assert not iban_valid("DE89370400440532013001")
    assert not iban_valid("DE89")


@given(st.text(alphabet=st.characters(codec="utf-8"), max_size=200))
def test_redact_then_restore_gives_the_text_back(text):
    """For any text, restoring the redacted text with its mapping gives the original."""
    redacted_text, mapping = redactor.redact(text)
    assert redactor.restore(redacted_text, mapping) == text


@given(
    st.lists(
        st.sampled_from(
            ["a@x.io", "+44 20 7946 0958", "10.0.0.1", "4111 1111 1111 1111", "hello", "2024"]
        ),
        max_size=8,
    )
)
def test_no_personal_value_survives_redaction(words):
    """Whatever mix of values a text holds, none of the personal ones is left in it."""
    text = " and ".join(words)
    redacted_text, mapping = redactor.redact(text)
    for value in ("a@x.io", "+44 20 7946 0958", "10.0.0.1", "4111 1111 1111 1111"):
        assert value not in redacted_text
    assert redactor.restore(redacted_text, mapping) == text
