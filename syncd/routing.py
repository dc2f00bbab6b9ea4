"""Which CRM record(s) an event targets.

An ``externalLeadId`` is matched against the rules (``routing.rules`` from config
first, then the built-ins; first match wins). Only ids that match a pattern are
ever used, so an id never reaches a URL unvalidated. Events with no routable id
are resolved by phone in the scheduled loop (never in the request).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from connectors.salesforce import SF_ID, object_for_id, to_18
from connectors.types import RecordRef
from syncd.config import Config


@dataclass(frozen=True)
class Rule:
    pattern: re.Pattern[str]
    crm: str
    obj: str | None      # None: derived from the id (Salesforce key prefix)

    def resolve(self, ext_id: str) -> RecordRef | None:
        if not self.pattern.fullmatch(ext_id):
            return None
        if self.crm == "salesforce":
            if not SF_ID.fullmatch(ext_id):   # a custom rule may be looser than Salesforce
                return None
            obj = self.obj or object_for_id(ext_id)
            return RecordRef("salesforce", obj, to_18(ext_id)) if obj else None
        if self.obj is None:
            return None
        return RecordRef(self.crm, self.obj, ext_id)


BUILTIN_RULES: tuple[tuple[str, str, str | None], ...] = (
    (r"^[0-9]+$", "hubspot", "contact"),       # all digits: HubSpot's, never Salesforce's
    (r"^lead_[A-Za-z0-9]+$", "close", "lead"),
    (r"^cont_[A-Za-z0-9]+$", "close", "contact"),
    (SF_ID.pattern, "salesforce", None),
)

MAX_ID_LEN = 128


class Router:
    def __init__(self, rules: list[Rule], enabled: list[str]):
        self.rules = rules
        self.enabled = set(enabled)

    @classmethod
    def from_config(cls, cfg: Config) -> "Router":
        rules = [Rule(re.compile(r.pattern), r.crm, r.object) for r in cfg.routing.rules]
        rules += [Rule(re.compile(p), crm, obj) for p, crm, obj in BUILTIN_RULES]
        return cls(rules, cfg.crm.enabled())

    def route_id(self, ext_id: str | None) -> RecordRef | None:
        """The record an id names in an enabled CRM, or None (then: phone lookup)."""
        if not ext_id or len(ext_id) > MAX_ID_LEN:
            return None
        for rule in self.rules:
            if rule.crm not in self.enabled:
                continue
            ref = rule.resolve(ext_id)
            if ref is not None:
                return ref
            if rule.pattern.fullmatch(ext_id):
                return None  # first match wins, even when it names no supported object
        return None

    def unroutable_reason(self, ext_id: str | None, phone: str | None, phone_raw: str | None) -> str | None:
        """Why an event can never be routed (checked in the request, without I/O)."""
        if self.route_id(ext_id) is not None or phone:
            return None
        if not self.enabled:
            return "no CRM is enabled"
        parts = []
        if ext_id:
            parts.append("externalLeadId matches no routing rule of an enabled CRM")
        else:
            parts.append("no externalLeadId")
        parts.append("phone does not parse" if phone_raw else "no phone")
        return "; ".join(parts)
