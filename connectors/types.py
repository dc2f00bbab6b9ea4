"""Plain data exchanged between the daemon and connectors."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from connectors.errors import ConnectorError


# A pseudo-field for ``CrmConnector.read``: the record's own email addresses, as a list
# (Salesforce ``Email``; HubSpot ``email`` and ``hs_additional_emails``; a Close lead's
# contacts' addresses). The router reads it to fan out an email opt-out that named a
# record but carried no address (Apten's ``optOut``).
EMAILS_FIELD = "@emails"
# A pseudo-field for ``read``: the record this one has become, a ``RecordRef``, or None
# (a Salesforce Lead converted into a Contact is read-only from then on). Asked only of
# the objects a plugin lists in ``CrmPlugin.successor_objects``.
SUCCESSOR_FIELD = "@successor"

@dataclass(frozen=True)
class RecordRef:
    """One CRM record: ``crm`` is the connector name, ``obj`` the object type
    (``Lead``, ``Contact``, ``contact``, ``lead`` ...), ``record_id`` its validated id."""

    crm: str
    obj: str
    record_id: str


@dataclass(frozen=True)
class FoundRecord:
    """A record a batched lookup (``find``) found, with the looked-up phones (E.164)
    and emails (lower-cased, as passed in) it carries: what ties it to each event."""

    ref: RecordRef
    phones: tuple[str, ...] = ()
    emails: tuple[str, ...] = ()


@dataclass(frozen=True)
class RecordUpdate:
    """Field values to write on one record. ``fields`` maps CRM field name to value
    (bool, str, or None). ``email_unsubscribe`` asks the connector to unsubscribe
    ``email`` through the CRM's own unsubscribe API where the CRM has one (HubSpot,
    Close) instead of writing a field; ``subscribe`` True reverses it."""

    ref: RecordRef
    fields: dict[str, Any] = field(default_factory=dict)
    email: str | None = None
    email_unsubscribe: bool | None = None
    options: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class UpdateResult:
    """Outcome for one RecordUpdate: ``error`` is None on success."""

    ref: RecordRef
    error: ConnectorError | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass(frozen=True)
class FieldInfo:
    """A field as the CRM describes it (for ``syncd check``)."""

    name: str
    type: str
    updateable: bool
    label: str = ""


@dataclass(frozen=True)
class Watermark:
    """Where a poll stopped: ``ts`` is the CRM's own modification stamp (ISO
    string or epoch-ms string, connector-defined), ``last_id`` the id tie-breaker."""

    ts: str | None = None
    last_id: str | None = None


@dataclass
class ChangedRecord:
    ref: RecordRef
    values: dict[str, Any]
    modified: str


@dataclass
class Page:
    """One page of records changed since a watermark, oldest first. ``next_mark``
    is where the next poll starts; ``more`` says another page is ready now."""

    records: list[ChangedRecord]
    next_mark: Watermark
    more: bool = False
