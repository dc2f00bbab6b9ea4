import pytest
from hypothesis import given
from hypothesis import strategies as st

from connectors.types import RecordRef
from syncd.config import parse_config
from syncd.routing import Router

ALL = {"salesforce": {"instance_url": "https://x.example", "auth": {"flow": "access_token", "access_token": "t"}},
       "hubspot": {"access_token": "t"}, "close": {"api_key": "k"}}


def router(crm=ALL, rules=()):
    return Router.from_config(parse_config({"crm": crm, "routing": {"rules": list(rules)}}, env={}))


@pytest.mark.parametrize("ext,expected", [
    ("003XX000004DHPY", RecordRef("salesforce", "Contact", "003XX000004DHPYYA4")),
    ("003XX000004DHPYYA4", RecordRef("salesforce", "Contact", "003XX000004DHPYYA4")),
    ("00QXX000001LOX2", RecordRef("salesforce", "Lead", "00QXX000001LOX22AO")),
    ("51", RecordRef("hubspot", "contact", "51")),
    ("123456789012345", RecordRef("hubspot", "contact", "123456789012345")),  # all digits: never Salesforce
    ("lead_abc123", RecordRef("close", "lead", "lead_abc123")),
    ("cont_abc123", RecordRef("close", "contact", "cont_abc123")),
    ("001XX000003DHPY", None),   # an Account: no supported object, falls back to phone
    ("//evil.example/x", None), ("003XX000004DHPY/../x", None), ("lead_../x", None), ("", None), (None, None),
])
def test_builtin_routes(ext, expected):
    assert router().route_id(ext) == expected


def test_disabled_crm_is_never_a_target():
    only_sf = {"salesforce": ALL["salesforce"]}
    assert router(only_sf).route_id("51") is None
    assert router(only_sf).route_id("lead_abc123") is None


def test_config_rules_come_first():
    r = router(rules=[{"pattern": r"^[0-9]{3}$", "crm": "close", "object": "lead"}])
    assert r.route_id("512") is None or r.route_id("512") == RecordRef("close", "lead", "512")
    r = router(rules=[{"pattern": r"^ext-[0-9]+$", "crm": "hubspot", "object": "contact"}])
    assert r.route_id("ext-42") == RecordRef("hubspot", "contact", "ext-42")


def test_unroutable_reason():
    r = router()
    assert r.unroutable_reason("//evil", None, None) == \
        "externalLeadId matches no routing rule of an enabled CRM; no phone"
    assert r.unroutable_reason(None, None, "12") == "no externalLeadId; phone does not parse"
    assert r.unroutable_reason("//evil", "+13305551234", "+13305551234") is None


@given(st.text(max_size=60))
def test_any_routed_id_is_url_safe(text):
    ref = router().route_id(text)
    if ref is not None:
        assert ref.record_id.isascii() and all(c.isalnum() or c == "_" for c in ref.record_id)
