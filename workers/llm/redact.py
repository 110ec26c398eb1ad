"""Personal data out of the text before it leaves for an LLM, and back into what it writes.

:class:`Redactor` replaces e-mail addresses, IBANs, payment card numbers, IP addresses and
phone numbers with placeholders (``[EMAIL_1]``, ``[IBAN_1]``, ``[CARD_1]``, ``[IP_1]``,
``[PHONE_1]``) and returns the mapping that :meth:`Redactor.restore` uses to put the values
back into generated text. Detection prefers precision where numbers are common in ordinary
text: card numbers must pass the Luhn check, IBANs the ISO 13616 mod-97 check, IP addresses
must parse, and a phone number needs a telephone shape (an international ``+`` prefix, an area
code in brackets, a national trunk ``0``, or the North American 3-3-4 grouping), so years,
amounts, dates, order numbers and version strings stay as they are.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable, Iterator

Span = tuple[int, int]

_EMAIL = re.compile(
    r"(?<![\w.%+-])[A-Za-z0-9][A-Za-z0-9._%+-]*@"
    r"(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)+[A-Za-z]{2,63}(?![\w-])"
)
# Candidates only: the longest prefix that passes the checksum is kept (see _checked_spans).
_IBAN = re.compile(r"(?<![A-Za-z0-9])[A-Z]{2}\d{2}(?:[ -]?[A-Z0-9]){11,30}")
_CARD = re.compile(r"(?<![\d.,])\d(?:[ -]?\d){12,18}")
_IPV6 = re.compile(
    r"(?<![\w:.])(?:[0-9A-Fa-f]{0,4}:){2,7}(?:(?:\d{1,3}\.){3}\d{1,3}|[0-9A-Fa-f]{1,4})?(?![\w:])"
)
_IPV4 = re.compile(r"(?<![\w.])(?:\d{1,3}\.){3}\d{1,3}(?!\w|\.\d)")
_PHONE = re.compile(r"(?<![\w+#@/.,-])[+(]?\d[\d ().-]{5,24}\d(?!\w)")
_PLACEHOLDER = re.compile(r"\[(?:EMAIL|PHONE|CARD|IBAN|IP)_\d+\]")

_DATE = re.compile(r"\d{1,2}([./-])\d{1,2}\1\d{4}")
_NANP = re.compile(r"\d{3}([-. ])\d{3}\1\d{4}")


def luhn_valid(digits: str) -> bool:
    """Whether the digit string passes the Luhn check of payment card numbers."""
    total = 0
    for position, char in enumerate(reversed(digits)):
        value = int(char)
        if position % 2 == 1:
            value = value * 2 - 9 if value > 4 else value * 2
        total += value
    return total % 10 == 0


def iban_valid(compact: str) -> bool:
    """Whether ``compact`` (an IBAN without separators) passes the ISO 13616 mod-97 check."""
    if not 15 <= len(compact) <= 34 or not compact.isascii() or not compact.isalnum():
        return False
    if not (compact[:2].isalpha() and compact[2:4].isdigit()):
        return False
    rearranged = compact[4:] + compact[:4]
    number = "".join(str(int(char, 36)) for char in rearranged)
    return int(number) % 97 == 1


def _card_valid(candidate: str) -> bool:
    digits = re.sub(r"\D", "", candidate)
    return 13 <= len(digits) <= 19 and luhn_valid(digits)


def _iban_valid(candidate: str) -> bool:
    return iban_valid(re.sub(r"[ -]", "", candidate))


def _phone_valid(candidate: str) -> bool:
    digits = sum(char.isdigit() for char in candidate)
    if candidate.count("(") != candidate.count(")") or re.search(r"\.\.|--|  ", candidate):
        return False
    if candidate.startswith("+"):
        return 8 <= digits <= 15  # E.164 allows at most 15 digits
    if candidate.startswith("("):
        return 7 <= digits <= 15
    if candidate.startswith("00"):
        return 10 <= digits <= 17  # the international 00 prefix before up to 15 digits
    if candidate.startswith("0"):
        # A national number with its trunk prefix, but not a date like 01.02.2024.
        return 9 <= digits <= 13 and not _DATE.match(candidate)
    return _NANP.fullmatch(candidate) is not None


def _ip_valid(candidate: str) -> bool:
    # Every real address has a decimal digit somewhere; C++ scopes like a::b parse as IPv6.
    if not any(char.isdigit() for char in candidate):
        return False
    try:
        ipaddress.ip_address(candidate)
    except ValueError:
        return False
    return True


def _checked_spans(
    pattern: re.Pattern[str], valid: Callable[[str], bool], text: str
) -> Iterator[Span]:
    """Spans of ``pattern`` matches that pass ``valid``, each cut to its longest valid prefix.

    Only prefixes that end at a word boundary are tried, so a trailing group of digits or
    capitals that belongs to the next word does not hide a valid number.
    """
    position = 0
    while match := pattern.search(text, position):
        start = match.start()
        found = None
        for end in range(match.end(), start, -1):
            at_boundary = end == len(text) or not text[end].isalnum()
            if at_boundary and text[end - 1].isalnum() and valid(text[start:end]):
                found = end
                break
        if found is None:
            position = start + 1
            continue
        yield start, found
        position = found


def _plain_spans(
    pattern: re.Pattern[str], valid: Callable[[str], bool], text: str
) -> Iterator[Span]:
    for match in pattern.finditer(text):
        if valid(match.group()):
            yield match.span()


def _always(_candidate: str) -> bool:
    return True


# Applied in this order, each to the text the previous ones left: e-mail addresses first
# (their digits would otherwise look like phone numbers), IPv6 before IPv4 (an IPv6 address
# may end in an IPv4 one), phone numbers last (the loosest shape).
_DETECTORS: tuple[tuple[str, Callable[[str], Iterator[Span]]], ...] = (
    ("EMAIL", lambda text: _plain_spans(_EMAIL, _always, text)),
    ("IBAN", lambda text: _checked_spans(_IBAN, _iban_valid, text)),
    ("CARD", lambda text: _checked_spans(_CARD, _card_valid, text)),
    ("IP", lambda text: _plain_spans(_IPV6, _ip_valid, text)),
    ("IP", lambda text: _plain_spans(_IPV4, _ip_valid, text)),
    ("PHONE", lambda text: _plain_spans(_PHONE, _phone_valid, text)),
)


class Redactor:
    """Replaces personal data with numbered placeholders, and puts it back.

    ``redact(text)`` returns the redacted text and a mapping from placeholder to original
    value. Within one text the same value always gets the same placeholder, and numbering
    skips any placeholder-looking string the text already contains, so restoring never
    replaces the sender's own words. ``restore(text, mapping)`` replaces the placeholders of
    ``mapping`` found in ``text`` (for example an LLM's generated reply) and leaves everything
    else alone. Stateless and thread-safe.
    """

    def redact(self, text: str) -> tuple[str, dict[str, str]]:
        """``text`` with personal data replaced, and the placeholder → value mapping."""
        mapping: dict[str, str] = {}
        assigned: dict[tuple[str, str], str] = {}
        counters: dict[str, int] = {}
        for kind, find in _DETECTORS:
            pieces: list[str] = []
            last = 0
            for start, end in find(text):
                value = text[start:end]
                placeholder = assigned.get((kind, value))
                if placeholder is None:
                    placeholder = self._next_placeholder(kind, counters, text, mapping)
                    assigned[kind, value] = placeholder
                    mapping[placeholder] = value
                pieces += [text[last:start], placeholder]
                last = end
            if pieces:
                text = "".join([*pieces, text[last:]])
        return text, mapping

    def restore(self, text: str, mapping: dict[str, str]) -> str:
        """``text`` with every placeholder of ``mapping`` replaced by its original value."""
        if not mapping:
            return text
        return _PLACEHOLDER.sub(lambda match: mapping.get(match.group(), match.group()), text)

    @staticmethod
    def _next_placeholder(
        kind: str, counters: dict[str, int], text: str, mapping: dict[str, str]
    ) -> str:
        number = counters.get(kind, 0)
        while True:
            number += 1
            placeholder = f"[{kind}_{number}]"
            # A placeholder the sender wrote themselves would be ambiguous on restore.
            if placeholder not in mapping and placeholder not in text:
                counters[kind] = number
                return placeholder
