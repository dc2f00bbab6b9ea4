"""Phone numbers to E.164 with phonenumbers; a number that does not parse is kept raw."""
from __future__ import annotations

import re

import phonenumbers

MAX_PHONE_LEN = 64
# A North American number already in E.164 (+1, then ten digits, the first 2-9): its
# E.164 form is itself (no national prefix inside, every ten-digit number possible), so
# phonenumbers' ~40 us parse is skipped for the commonest input of the webhooks and the
# consent API. Anything else, with spaces or not, goes through phonenumbers.
# tests/test_sources.py checks the shortcut against phonenumbers.
_NANP_E164 = re.compile(r"\+1[2-9][0-9]{9}")


def to_e164(raw: str | None, default_region: str = "US") -> str | None:
    """E.164 for a valid number, else None (the caller keeps the raw text)."""
    if not raw or len(raw) > MAX_PHONE_LEN:
        return None
    if _NANP_E164.fullmatch(raw):
        return raw
    try:
        number = phonenumbers.parse(raw, None if raw.strip().startswith("+") else default_region)
    except phonenumbers.NumberParseException:
        return None
    if not phonenumbers.is_possible_number(number):
        return None
    return phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164)
