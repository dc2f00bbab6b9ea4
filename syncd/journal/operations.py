"""The operations store: CRM pauses (a spent account-wide quota), poll watermarks,
leadership among replicas, the serve lock and the health probe. The pause lives
in the journal so every replica honours it and a restart does not forget it; the
pusher decides when to pause and resume."""
from __future__ import annotations

from syncd.events import iso, utcnow
from syncd.journal.engine import Engine


class OperationsStore:
    def __init__(self, engine: Engine):
        self.engine = engine

    # --- CRM pauses --------------------------------------------------------------------
    def crm_pause(self, crm: str) -> tuple[float, str | None] | None:
        """(paused until, reason) for a paused CRM, else None."""
        with self.engine.read() as tx:
            row = tx.one("crm_pause", crm=crm)
        if row is None or row["paused_until"] is None:
            return None
        return float(row["paused_until"]), row["pause_reason"]

    def pause_crm(self, crm: str, until: float, reason: str) -> None:
        with self.engine.begin() as tx:
            tx.execute("pause_crm", crm=crm, until=until, reason=reason)

    def take_pause_probe(self, crm: str, now: float, next_until: float) -> bool:
        """Whether this process checks an ended pause: the first to move ``paused_until``
        from the past to ``next_until`` does; the others see the pause go on meanwhile."""
        with self.engine.begin() as tx:
            return tx.execute("take_pause_probe", next_until=next_until, crm=crm, now=now) == 1

    def resume_crm(self, crm: str) -> None:
        with self.engine.begin() as tx:
            tx.execute("resume_crm", crm=crm)

    # --- watermarks --------------------------------------------------------------------
    def get_watermark(self, name: str) -> tuple[str | None, str | None]:
        with self.engine.read() as tx:
            row = tx.one("get_watermark", name=name)
        return (row["ts"], row["last_id"]) if row else (None, None)

    def set_watermark(self, name: str, ts: str | None, last_id: str | None) -> None:
        with self.engine.begin() as tx:
            tx.execute("set_watermark", name=name, ts=ts, last_id=last_id, now_iso=iso(utcnow()))

    # --- replicas ----------------------------------------------------------------------
    def try_leadership(self, name: str) -> bool:
        """Become (or stay) the one process running ``name`` (e.g. the reflector's polls)."""
        return self.engine.try_leadership(name)

    def is_leader(self, name: str) -> bool:
        return self.engine.is_leader(name)

    def resign(self, name: str) -> None:
        self.engine.resign(name)

    def acquire_serve_lock(self) -> None:
        """Refuse a second ``serve`` where the engine allows only one (raises JournalBusy)."""
        self.engine.acquire_serve_lock()

    def take_over_dead_leases(self) -> int:
        """Free the leases of processes that are gone (0 where the serve lock did it)."""
        return self.engine.take_over_dead_leases()

    def healthcheck(self) -> None:
        """Raises unless a write transaction can commit."""
        with self.engine.begin() as tx:
            tx.execute("healthcheck", now_iso=iso(utcnow()))
