"""The durable journal: events, one delivery per target record, field clocks,
watermarks. Engines: SQLite (embedded, one ``serve`` per file) and PostgreSQL
(shared by replicas). Both pass the same test suite (tests/test_journal.py)."""
from __future__ import annotations

from syncd.journal.base import (Delivery, Journal, JournalBusy, JournalMissing, Outcome, Recorded,
                                StoredEvent)


def open_journal(url: str, *, base_dir: str | None = None, max_stored_body_bytes: int | None = None,
                 must_exist: bool = False) -> Journal:
    """Open (and migrate) the journal named by ``journal.url``; raw bodies larger than
    ``max_stored_body_bytes`` are stored as their hash (see ``sql.stored_body``).
    ``must_exist``: raise :class:`JournalMissing` instead of creating an empty one
    (read-only commands)."""
    journal = _open(url, base_dir, must_exist)
    if max_stored_body_bytes is not None:
        journal.max_stored_body_bytes = max_stored_body_bytes  # type: ignore[attr-defined]
    return journal


def _open(url: str, base_dir: str | None, must_exist: bool) -> Journal:
    if url.startswith("sqlite:///"):
        from syncd.journal.sqlite import SqliteJournal

        return SqliteJournal.from_url(url, base_dir=base_dir, must_exist=must_exist)
    if url.startswith(("postgresql://", "postgres://")):
        try:
            from syncd.journal.postgres import PostgresJournal
        except ImportError as exc:  # psycopg is the [postgres] extra
            raise RuntimeError("journal.url is PostgreSQL but psycopg is not installed: "
                               "pip install 'syncd[postgres]'") from exc
        return PostgresJournal(url, must_exist=must_exist)
    raise ValueError("journal.url must start with sqlite:/// or postgresql://")


__all__ = ["Delivery", "Journal", "JournalBusy", "JournalMissing", "Outcome", "Recorded", "StoredEvent", "open_journal"]
