"""What a CRM brings to syncd besides its connector: one :class:`CrmPlugin` per
connector module, listed once in :mod:`connectors.registry`.

A plugin names its ``crm.<name>`` settings model, builds its connector from those
settings, says which record ids are its own (routing), where a first poll starts
(its watermark format) and which optional capabilities it has. Everything here is
plain data and callables: the daemon loops over the registry and never branches on
a CRM's name.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Callable

from connectors.base import CrmConnector
from connectors.settings import CrmSettings
from connectors.types import RecordRef


@dataclass(frozen=True)
class BuildContext:
    """What a builder gets besides its own settings block: the shared HTTP and phone
    settings, a way to make a configured path absolute, and the mapping's
    ``email_unsubscribe`` options (None when the mapping has none)."""

    ca_bundle: str | None = None
    timeout: float = 30.0
    default_region: str = "US"
    resolve: Callable[[str], str] = str
    email_unsubscribe: dict[str, Any] | None = None


@dataclass(frozen=True)
class IdRule:
    """A built-in routing rule: ids matching ``pattern`` belong to this CRM; ``obj``
    None lets the plugin's :attr:`CrmPlugin.object_for_id` name the object. A
    ``broad`` pattern (one that also matches other CRMs' ids, such as Salesforce's
    15/18 alphanumerics) is tried only after every narrow one."""

    pattern: str
    obj: str | None = None
    broad: bool = False


@dataclass(frozen=True)
class QuotaLimits:
    """How much of the CRM's daily API quota syncd may use, and how often a paused
    CRM's quota is checked again (the connector offers ``api_usage``/``probe_quota``)."""

    budget_percent: float
    probe_seconds: float


def _same_id(ext_id: str) -> str | None:
    return ext_id


def _base_url(settings: Any) -> list[tuple[str, str]]:
    return [("base_url", settings.base_url)]


@dataclass(frozen=True)
class CrmPlugin:
    name: str                                   # the ``crm.<name>`` key and RecordRef.crm
    title: str                                  # how messages spell it ("Salesforce")
    settings: type[CrmSettings]                 # the pydantic model of ``crm.<name>``
    build: Callable[[Any, BuildContext], CrmConnector]
    watermark: Callable[[datetime], str]        # a moment in the CRM's own watermark format
    id_rules: tuple[IdRule, ...] = ()           # built-in routing rules, tried in order
    # The canonical form of an id routed to this CRM, or None when it cannot be one
    # of its ids (applied to config rules too, which may be looser than the CRM).
    normalise_id: Callable[[str], str | None] = _same_id
    object_for_id: Callable[[str], str | None] = lambda ext_id: None
    # ``@unsubscribe`` in a mapping: the CRM's own email-unsubscribe API. Without it,
    # ``unsubscribe_hint`` says what to map instead.
    email_unsubscribe: bool = False
    unsubscribe_hint: str = ""
    # Checks of the mapping's email_unsubscribe options against the account (problem
    # lines, e.g. "email_unsubscribe.subscription_id: ..."; the last argument masks
    # secrets and personal data in the CRM's error text), and the one line
    # ``syncd check`` prints saying how email opt-outs are applied.
    check_email_unsubscribe: Callable[[Any, dict[str, Any], Callable[[str], str]], list[str]] | None = None
    email_mode: Callable[[dict[str, Any] | None], str] | None = None
    quota: Callable[[Any], QuotaLimits] | None = None
    flag_types: frozenset[str] = field(default_factory=frozenset)  # field types beyond booleans a flag may use
    client_loggers: tuple[str, ...] = ()        # the client library's loggers (full URLs at DEBUG): kept quiet
    # For messages that say where a problem is: (key under ``crm.<name>``, URL) of the
    # first server the connector calls, and of the credentials and the URL that judges them.
    endpoints: Callable[[Any], list[tuple[str, str]]] = _base_url
    credentials: Callable[[Any], tuple[str, str]] | None = None
    # Objects whose records can become another record (a converted Salesforce Lead):
    # the router reads ``SUCCESSOR_FIELD`` of a named record of these and routes to it.
    successor_objects: frozenset[str] = field(default_factory=frozenset)

    def initial_watermark(self, at: datetime) -> str:
        """Where a first poll starts when it starts at ``at``."""
        return self.watermark(at)

    def resolve(self, ext_id: str, obj: str | None, pattern: re.Pattern[str]) -> RecordRef | None:
        """The record a matching rule names, or None (the id is not one of ours)."""
        if not pattern.fullmatch(ext_id):
            return None
        record_id = self.normalise_id(ext_id)
        if record_id is None:
            return None
        obj = obj or self.object_for_id(ext_id)
        return RecordRef(self.name, obj, record_id) if obj else None
