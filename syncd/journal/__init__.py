"""The durable journal: small stores (events, deliveries, reflections, operations,
reports) over one engine, SQLite (embedded, one ``serve`` per file) or PostgreSQL
(shared by replicas), and one schema (``migrations/``). Both engines pass the same
test suite (tests/test_journal.py)."""
from __future__ import annotations

from syncd.journal.base import (Delivery, Journal, JournalBusy, JournalMissing, Outcome, Recorded,
                                StoredEvent)
from syncd.journal.compliance import ComplianceStore
from syncd.journal.deliveries import DeliveryStore
from syncd.journal.engine import Engine
from syncd.journal.events import DEFAULT_MAX_STORED_BODY_BYTES, EventStore
from syncd.journal.ledger import LedgerStore
from syncd.journal.operations import OperationsStore
from syncd.journal.reflections import ReflectionStore
from syncd.journal.reports import ReportStore


def open_journal(url: str, *, base_dir: str | None = None, max_stored_body_bytes: int | None = None,
                 must_exist: bool = False) -> Journal:
    """Open (and migrate) the journal named by ``journal.url``; raw bodies larger than
    ``max_stored_body_bytes`` are stored as their hash (see ``events.stored_body``).
    ``must_exist``: raise :class:`JournalMissing` instead of creating an empty one
    (read-only commands)."""
    return journal_on(open_engine(url, base_dir, must_exist), max_stored_body_bytes)


def journal_on(engine: Engine, max_stored_body_bytes: int | None = None) -> Journal:
    """The stores over ``engine``."""
    cap = DEFAULT_MAX_STORED_BODY_BYTES if max_stored_body_bytes is None else max_stored_body_bytes
    ledger = LedgerStore(engine)
    return Journal(events=EventStore(engine, cap, ledger), deliveries=DeliveryStore(engine),
                   reflections=ReflectionStore(engine), ops=OperationsStore(engine),
                   reports=ReportStore(engine), engine=engine, ledger=ledger,
                   compliance=ComplianceStore(engine))


def open_engine(url: str, base_dir: str | None = None, must_exist: bool = False) -> Engine:
    if url.startswith("sqlite:///"):
        from syncd.journal.sqlite import SqliteEngine

        return SqliteEngine.from_url(url, base_dir=base_dir, must_exist=must_exist)
    if url.startswith(("postgresql://", "postgres://")):
        try:
            from syncd.journal.postgres import PostgresEngine
        except ImportError as exc:  # psycopg is the [postgres] extra
            raise RuntimeError("journal.url is PostgreSQL but psycopg is not installed: "
                               "pip install 'syncd[postgres]'") from exc
        return PostgresEngine(url, must_exist=must_exist)
    raise ValueError("journal.url must start with sqlite:/// or postgresql://")


__all__ = ["Delivery", "Journal", "JournalBusy", "JournalMissing", "Outcome", "Recorded", "StoredEvent", "journal_on",
           "open_engine", "open_journal"]
