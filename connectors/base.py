"""The seam between the daemon and each CRM: what a connector must offer."""
from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

from connectors.types import FieldInfo, FoundRecord, Page, RecordRef, RecordUpdate, UpdateResult, Watermark


@runtime_checkable
class CrmConnector(Protocol):
    """A CRM client. Whole-call failures (auth, transport after short retries) raise
    a ``connectors.errors.ConnectorError``; per-record failures come back in
    ``UpdateResult.error``. Batching to the CRM's own limits happens inside."""

    name: str

    def update(self, updates: list[RecordUpdate]) -> list[UpdateResult]:
        """Write every update; one result per update, same order."""
        ...

    def find(self, phones: list[str], emails: list[str]) -> list[FoundRecord]:
        """Every supported record (leads, contacts) carrying one of these phones (E.164)
        or emails (lower-cased), each with the ones it carries; batched as the CRM
        allows. A value that cannot be a number or an address matches nothing."""
        ...

    def find_by_phone(self, e164: str) -> list[RecordRef]:
        """Every supported record (leads, contacts) carrying this phone number."""
        ...

    def read(self, refs: list[RecordRef], fields: list[str]) -> dict[RecordRef, dict[str, Any]]:
        """The current values of ``fields`` on known records (``syncd audit``), batched to
        the CRM's limits; a record the CRM no longer has is absent, not an error."""
        ...

    def changed_since(self, mark: Watermark, fields: list[str], limit: int = 200) -> Page:
        """Records modified after ``mark`` with the values of ``fields``, oldest first."""
        ...

    def fields(self, obj: str) -> dict[str, FieldInfo]:
        """The CRM's own field metadata for one object (authenticates as a side effect)."""
        ...
