"""Which CRM record(s) an event targets.

An ``externalLeadId`` is matched against the rules (``routing.rules`` from config
first, then each CRM plugin's own; first match wins). Only ids that match a pattern are
ever used, so an id never reaches a URL unvalidated. Events with no routable id
are resolved by phone in the scheduled loop (never in the request).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterable

from connectors.plugin import CrmPlugin
from connectors.registry import CRM_PLUGINS
from connectors.types import RecordRef
from syncd.config import Config


@dataclass(frozen=True)
class Rule:
    pattern: re.Pattern[str]
    plugin: CrmPlugin
    obj: str | None      # None: derived from the id by the plugin (Salesforce's key prefix)

    @property
    def crm(self) -> str:
        return self.plugin.name

    def resolve(self, ext_id: str) -> RecordRef | None:
        return self.plugin.resolve(ext_id, self.obj, self.pattern)


def builtin_rules(plugins: Iterable[CrmPlugin]) -> list[Rule]:
    """Every plugin's own id rules: narrow patterns first, broad ones after, each
    group in registry order."""
    rules = [(r.broad, Rule(re.compile(r.pattern), p, r.obj)) for p in plugins for r in p.id_rules]
    return [rule for _, rule in sorted(rules, key=lambda pair: pair[0])]


MAX_ID_LEN = 128


class Router:
    def __init__(self, rules: list[Rule], enabled: list[str]):
        self.rules = rules
        self.enabled = set(enabled)

    @classmethod
    def from_config(cls, cfg: Config) -> "Router":
        rules = [Rule(re.compile(r.pattern), CRM_PLUGINS[r.crm], r.object) for r in cfg.routing.rules]
        rules += builtin_rules(CRM_PLUGINS.values())
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
