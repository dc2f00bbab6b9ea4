"""Masking: internationalised email addresses are masked; dates and times never are."""
from __future__ import annotations

import io
import json
import logging
import re

import pytest
from hypothesis import given, strategies as st

from syncd.logs import setup_logging
from syncd.masking import mask_text

IDN_ADDRESSES = ["jürgen.müller@exämple.de", "ivan.petrov@пример.рф", "χρήστης@παράδειγμα.δοκιμή",
                 "用户@例子.广告", "zoë@xn--exmple-cua.de", "ana.silva@example.com"]


@pytest.mark.parametrize("address", IDN_ADDRESSES)
def test_internationalised_addresses_are_masked(address):
    local, _, domain = address.partition("@")
    out = mask_text(f"cannot unsubscribe {address}: not found")
    assert local not in out and out == f"cannot unsubscribe {local[0]}***@{domain}: not found"


_letters = st.characters(categories=("Ll", "Lu", "Lo"))


@given(local=st.text(_letters, min_size=2, max_size=20), label=st.text(_letters, min_size=1, max_size=20),
       tld=st.text(_letters, min_size=2, max_size=8))
def test_any_letter_address_keeps_only_its_first_character(local, label, tld):
    out = mask_text(f"error for <{local}@{label}.{tld}>")
    assert out == f"error for <{local[0]}***@{label}.{tld}>"


def _log_through(fmt: str, message: str, **extra) -> str:
    stream = io.StringIO()
    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    setup_logging("INFO", fmt, stream=stream)
    try:
        logging.getLogger("syncd.test").info(message, extra=extra)
    finally:
        for handler in root.handlers:
            handler.close()  # writes what the background thread has queued
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])
    return stream.getvalue()


def test_text_logs_keep_their_timestamps_and_mask_the_phone_beside_them():
    out = _log_through("text", "next run at: 2026-12-02 01:53:55 UTC for +4911113333444 (jürgen.müller@exämple.de)")
    assert re.match(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} INFO ", out), out
    assert "next run at: 2026-12-02 01:53:55 UTC" in out
    assert "4911113333444" not in out and "+49********444" in out
    assert "jürgen.müller" not in out and "j***@exämple.de" in out


def test_json_logs_keep_their_timestamps_and_mask_the_phone_beside_them():
    out = _log_through("json", "next run at: 2026-12-02 01:53:55 for +13305551234",
                       at="2024-02-18T09:45:22.123456Z", phone="+13305551234 on 2024-02-18")
    doc = json.loads(out)
    assert doc["msg"] == "next run at: 2026-12-02 01:53:55 for +13******234"
    assert doc["at"] == "2024-02-18T09:45:22.123456Z"
    assert doc["phone"] == "+13******234 on 2024-02-18"
    assert re.match(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}\+00:00$", doc["ts"])


@pytest.mark.parametrize("text", ["2026-12-02", "2026-12-02T13:38:58Z", "2026-12-02 13:38:58,627",
                                  "2026-12-02T13:38:58.627+00:00", "2026-12-02T13:38:58.123456-05:00"])
def test_dates_and_times_are_never_masked(text):
    assert mask_text(f"at {text} call 330-555-1234") == f"at {text} call 33*****234"


def _mask_every_pattern(text: str) -> str:
    """mask_text without its one-scan shortcut: every pattern applied."""
    from syncd import masking
    for secret in masking._secrets:
        if secret in text:
            text = text.replace(secret, "***")
    text = masking._BEARER.sub(lambda m: m.group(1) + "***", text)
    text = masking._EMAIL.sub(lambda m: masking.mask_email(m.group(0)) or "", text)
    return masking._PHONE_OR_DATE.sub(masking._mask_phone_match, text)


_pieces = st.one_of(st.text(max_size=12), st.sampled_from(
    ["+4915112345678", "(555) 010-9999", "a.b@example.com", "Bearer abc.def", "BEARER x", "ſearer",
     "access_token=tok", "Authorization: k", "2026-12-03T10:00:00Z", "@", "٣٤٥٦٧٨٩٠١٢", " "]))


@given(st.lists(_pieces, max_size=8).map("".join))
def test_the_shortcut_for_text_without_digits_at_signs_or_token_words_masks_exactly_as_every_pattern(text):
    assert mask_text(text) == _mask_every_pattern(text)
