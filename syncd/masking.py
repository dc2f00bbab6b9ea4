"""Masking of secrets and personal data in any text that leaves the process
(logs, error text stored in the journal, CLI output of errors)."""
from __future__ import annotations

import re
import threading

# Unicode-aware (``\w`` is any letter or digit): internationalised addresses such as
# jürgen.müller@exämple.de or ivan@пример.рф are personal data too. The last label is
# letters only, or an IDNA ``xn--`` label.
_EMAIL = re.compile(r"[\w.%+-]+@[\w-]+(?:\.[\w-]+)*\.(?:[^\W\d_]{2,}|xn--[\w-]+)")
# Phone-like runs: optional +, then 7+ digits possibly split by space, dot, dash, parens.
_PHONE = r"(?<![A-Za-z0-9])\+?\(?\d(?:[\s().-]{0,2}\d){6,18}(?![A-Za-z0-9])"
# Dates and times (ISO 8601 and logging's ``2026-12-02 13:38:58,627``) are never masked:
# matched first, they are kept as they are and no phone match can start inside them.
_DATE_TIME = (r"(?<![\d+])(?:19|20)\d\d-(?:0[1-9]|1[0-2])-(?:0[1-9]|[12]\d|3[01])"
              r"(?:[T ](?:[01]\d|2[0-3]):[0-5]\d(?::[0-5]\d(?:[.,]\d{1,9})?)?(?:Z|[+-]\d\d:?\d\d)?)?(?!\d)")
_PHONE_OR_DATE = re.compile(f"(?P<date>{_DATE_TIME})|{_PHONE}")
_BEARER = re.compile(r"(?i)(bearer\s+|access_token[\"'=:\s]+|authorization[\"'=:\s]+)[^\s\"',}]+")
# What every pattern above needs: text with none of it (most log messages and field
# values) is returned after one scan instead of three.
_MAYBE_PERSONAL = re.compile(r"(?i)[\d@]|bearer|access_token|authorization")

_lock = threading.Lock()
_secrets: tuple[str, ...] = ()


def register_secrets(values: list[str] | tuple[str, ...]) -> None:
    """Remember secrets (config values, tokens fetched at run time) to mask them."""
    global _secrets
    with _lock:
        merged = set(_secrets) | {v for v in values if v and len(v) >= 4}
        _secrets = tuple(sorted(merged, key=len, reverse=True))


def mask_phone(phone: str | None) -> str | None:
    """``+4911113333444`` -> ``+49*******444``: enough to tell records apart in a log."""
    if not phone:
        return phone
    digits = re.sub(r"\D", "", phone)
    if len(digits) < 6:
        return "***"
    return ("+" if phone.strip().startswith("+") else "") + digits[:2] + "*" * (len(digits) - 5) + digits[-3:]


def mask_email(email: str | None) -> str | None:
    if not email:
        return email
    local, _, domain = email.partition("@")
    return f"{local[:1]}***@{domain}" if domain else "***"


def mask_text(text: str) -> str:
    """Mask secrets, bearer tokens, emails and phone numbers anywhere in ``text``."""
    if not text:
        return text
    for secret in _secrets:
        if secret in text:
            text = text.replace(secret, "***")
    if _MAYBE_PERSONAL.search(text) is None:
        return text
    text = _BEARER.sub(lambda m: m.group(1) + "***", text)
    text = _EMAIL.sub(lambda m: mask_email(m.group(0)) or "", text)
    text = _PHONE_OR_DATE.sub(_mask_phone_match, text)
    return text


def _mask_phone_match(m: re.Match[str]) -> str:
    return m.group(0) if m.group("date") else (mask_phone(m.group(0)) or "")
