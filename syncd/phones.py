"""Phone numbers to E.164 with phonenumbers; a number that does not parse is kept raw."""
from __future__ import annotations

import phonenumbers

MAX_PHONE_LEN = 64


def to_e164(raw: str | None, default_region: str = "US") -> str | None:
    """E.164 for a valid number, else None (the caller keeps the raw text)."""
    if not raw or len(raw) > MAX_PHONE_LEN:
        return None
    try:
        number = phonenumbers.parse(raw, None if raw.strip().startswith("+") else default_region)
    except phonenumbers.NumberParseException:
        return None
    if not phonenumbers.is_possible_number(number):
        return None
    return phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164)
