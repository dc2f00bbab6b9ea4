"""The consent ledger: per person identity (E.164 phone; lower-cased, trimmed email)
and channel, the current consent. The events are the record and the ledger a view:
each event insert applies its entries in the same transaction, and :meth:`rebuild`
recomputes the whole ledger from the events.

Rules (:func:`wins`): the newest ``occurred_at`` wins; an opt-out wins a tie; so
only an explicit newer opt-in undoes an opt-out. ``do_not_contact`` and channel
``all`` cover every channel; an event with no modelled channel changes nothing."""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Literal, Mapping, Sequence, cast

from syncd.journal.engine import Engine, Tx

CHANNELS = ("sms", "email", "call", "whatsapp")
PHONE_CHANNELS = ("sms", "call", "whatsapp")
State = Literal["opted_out", "opted_in"]
REBUILD_CHUNK = 5000


@dataclass(frozen=True)
class Entry:
    identity: str
    channel: str
    state: State
    since: str          # occurred_at, ISO UTC fixed width: sorts as text
    source: str
    event_id: int | None

    def row(self) -> tuple[Any, ...]:
        return (self.identity, self.channel, self.state, self.since, self.source, self.event_id)


def entry_from(fields: tuple[str, str, str, str, str], event_id: int) -> Entry:
    """An entry sent as plain data (identity, channel, state, since, source)."""
    return Entry(fields[0], fields[1], cast(State, fields[2]), fields[3], fields[4], event_id)


def wins(new: Entry, current: Entry | None) -> bool:
    """Whether ``new`` replaces ``current`` for the same identity and channel."""
    if current is None or new.since > current.since:
        return True
    return new.since == current.since and new.state == "opted_out" and current.state == "opted_in"


def normalize_email(email: str) -> str:
    return email.strip().lower()


def entries_for(event: Mapping[str, Any], event_id: int | None) -> list[Entry]:
    """The ledger entries one consent event makes (``event``: the journal's column names)."""
    if (event.get("event_type") or "consent") not in ("consent", "crm_flag"):
        return []
    kind, channel = event.get("kind"), event.get("channel")
    if channel is None or kind not in ("opt_out", "opt_in", "do_not_contact"):
        return []
    channels = CHANNELS if (kind == "do_not_contact" or channel == "all") else (channel,)
    if not set(channels) <= set(CHANNELS):
        return []
    state: State = "opted_in" if kind == "opt_in" else "opted_out"
    since, source = str(event["occurred_at"]), str(event["source"])
    out = []
    phone, email = event.get("phone"), event.get("email")
    for ch in channels:
        if phone and ch in PHONE_CHANNELS:
            out.append(Entry(phone, ch, state, since, source, event_id))
        if email and email.strip() and ch == "email":
            out.append(Entry(normalize_email(email), ch, state, since, source, event_id))
    return out


def fold(entries: Iterable[Entry], into: dict[tuple[str, str], Entry] | None = None
         ) -> dict[tuple[str, str], Entry]:
    """Apply ``entries`` in order: the winner per (identity, channel)."""
    out = {} if into is None else into
    for entry in entries:
        key = (entry.identity, entry.channel)
        if wins(entry, out.get(key)):
            out[key] = entry
    return out


def entry_of(row: Mapping[str, Any]) -> Entry:
    return Entry(row["identity"], row["channel"], row["state"], row["since"], row["source"],
                 None if row["event_id"] is None else int(row["event_id"]))


def apply_in(tx: Tx, entries: list[Entry]) -> None:
    """Write ``entries`` (in event order) in the caller's transaction."""
    folded = fold(entries)
    if folded:   # in key order: replicas upserting overlapping keys lock them in one order (no deadlock)
        tx.execute("ledger_upsert", rows=[folded[key].row() for key in sorted(folded)])


def _all_entries(read_events: Callable[[int], Sequence[Mapping[str, Any]]]) -> dict[tuple[str, str], Entry]:
    folded: dict[tuple[str, str], Entry] = {}
    after = 0
    while True:
        rows = read_events(after)
        if not rows:
            return folded
        for row in rows:
            fold(entries_for(row, int(row["id"])), folded)
        after = int(rows[-1]["id"])


def rebuild_in_migration(execute: Callable[..., Any], dialect: str) -> None:
    """Fill the ledger from the events a journal holds (the migration runner's
    transaction; ``execute(sql, params)`` is the driver's own)."""
    mark = "?" if dialect == "sqlite" else "%s"
    cols = ("id", "source", "event_type", "kind", "channel", "phone", "email", "occurred_at")

    def read(after: int) -> list[Mapping[str, Any]]:
        cur = execute(f"SELECT {', '.join(cols)} FROM events WHERE id > {mark} ORDER BY id LIMIT {REBUILD_CHUNK:d}",
                      (after,))
        return [dict(zip(cols, r)) for r in cur.fetchall()]

    execute("DELETE FROM consent_ledger")
    insert = f"INSERT INTO consent_ledger (identity, channel, state, since, source, event_id) " \
             f"VALUES ({', '.join([mark] * 6)})"
    for entry in _all_entries(read).values():
        execute(insert, entry.row())


class LedgerStore:
    def __init__(self, engine: Engine):
        self.engine = engine

    def apply(self, tx: Tx, events: list[tuple[int, Mapping[str, Any]]]) -> None:
        """Enter newly inserted events (id, columns) in the caller's transaction."""
        self.apply_entries(tx, [(event_id, entries_for(event, event_id)) for event_id, event in events])

    def apply_entries(self, tx: Tx, entries: list[tuple[int, list[Entry]]]) -> None:
        """Enter each new event's entries (event id, entries) in event order."""
        apply_in(tx, [e for _, mine in sorted(entries, key=lambda p: p[0]) for e in mine])

    def state(self, identity: str, channel: str) -> Entry | None:
        """One key: a single primary-key read on its own."""
        row = self.engine.read_one("ledger_state", identity=identity, channel=channel)
        return None if row is None else entry_of(row)

    def states(self, keys: list[tuple[str, str]]) -> list[Entry | None]:
        """One lookup for many (identity, channel) keys, answered in order."""
        if not keys:
            return []
        found: dict[tuple[str, str], Entry] = {}
        identities = sorted({identity for identity, _ in keys})
        with self.engine.read() as tx:
            for start in range(0, len(identities), 500):
                for row in tx.all("ledger_states", identities=identities[start:start + 500]):
                    found[(row["identity"], row["channel"])] = entry_of(row)
        return [found.get(key) for key in keys]

    def states_at_once(self, keys: list[tuple[str, str]]) -> list[Entry | None]:
        """:meth:`states` as one statement that answers in one row (a JSON array of objects),
        however many keys: the consent API's grouped lookups (syncd/lookup_group.py),
        at most a few hundred keys at a time."""
        if not keys:
            return []
        row = self.engine.read_one("ledger_states_packed", identities=sorted({identity for identity, _ in keys}))
        found = {(r["identity"], r["channel"]): entry_of(r) for r in json.loads(row["packed"] if row else "[]")}
        return [found.get(key) for key in keys]

    def all(self) -> list[Entry]:
        with self.engine.read() as tx:
            return [entry_of(r) for r in tx.all("ledger_all")]

    def rebuild(self) -> int:
        """Recompute the ledger from the events (one transaction); the number of entries."""
        with self.engine.begin() as tx:
            folded = _all_entries(lambda after: tx.all("ledger_events_after", after=after, limit=REBUILD_CHUNK))
            tx.execute("ledger_clear")
            rows = [e.row() for e in folded.values()]
            for start in range(0, len(rows), 500):
                tx.execute("ledger_upsert", rows=rows[start:start + 500])
            return len(rows)
