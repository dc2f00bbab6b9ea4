"""The compliance clock: a legal deadline per opt-out, and whether it was kept.

**The rule.** An opt-out received at ``received_at`` must be honoured by the *end of
the N-th business day after the local day of receipt* (N = ``compliance.business_days``).
Days are counted in ``compliance.timezone``; a business day is a Monday to Friday that
is not a public holiday of ``compliance.holidays`` (a country such as ``US`` or a
country-subdivision such as ``US-CA``, from the ``holidays`` package). The day of
receipt never counts, whatever its hour, so an opt-out received Friday 23:30 and one
received Saturday noon both have the same deadline. The deadline is the last
microsecond of that day, local time (``23:59:59.999999``), reported in UTC.

An opt-out is *at risk* once only ``compliance.warn_business_days`` business days are
left: after the end of business day N - W (same counting) and until the deadline. It
is *breached* when the deadline passed before it was honoured.

**Which events count** (the partial index ``events_compliance_open``): opt-outs
(kind ``opt_out`` or ``do_not_contact``) from a messaging platform, while they wait
for routing, are routed, or sit in quarantine (a quarantined opt-out stays open, so the
operator sees it); and CRM-side flags (``crm_flag`` events) when Sinch is configured.
Opt-ins, events on a channel syncd does not model (``ignored``) and Sinch's answers to
our own registrations (``reconciled``) do not count.

**Honoured** = every delivery target of the opt-out settled done (stamped by the
journal in the settle transaction; a dead letter keeps the event open and the clock
running until a replay succeeds). A CRM-side flag has no CRM target: it is honoured
when Sinch confirmed the opt-out for its phone on every configured Sinch channel
(:class:`ComplianceCheck` stamps it). For an opt-out that came *from* a messaging
platform, that platform already has it; its honouring does not wait for a Sinch
registration of the CRM records it reached.
"""
from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from datetime import date, datetime, time, timedelta, timezone
from functools import lru_cache
from typing import TYPE_CHECKING, Any, Callable
from zoneinfo import ZoneInfo

from syncd.calendars import holiday_calendar
from syncd.events import iso, parse_iso, utcnow

if TYPE_CHECKING:
    from syncd.alerts import Alerts
    from syncd.config import Config
    from syncd.journal.base import Compliance, Operations
    from syncd.metrics import Metrics

log = logging.getLogger("syncd.compliance")

END_OF_DAY = time(23, 59, 59, 999999)
MAX_ALERTS_PER_CHECK = 20   # one message per opt-out up to this many per check, then one for the rest


@dataclass(frozen=True)
class Cutoffs:
    """For one ``now``: open opt-outs received before ``breach_before`` are breached;
    received before ``risk_before`` (and not breached) are at risk."""

    now: datetime
    breach_before: datetime
    risk_before: datetime


class ComplianceClock:
    """Deadlines per opt-out, counted as the module docstring says. Built once at
    start-up; ``now`` is injected (tests pass a fake clock)."""

    def __init__(self, business_days: int = 10, holidays: str | None = "US", tz: str = "America/New_York",
                 warn_business_days: int = 2, *, count_crm_flags: bool = False,
                 now: Callable[[], datetime] = utcnow):
        self.business_days = business_days
        self.warn_business_days = warn_business_days
        self.holidays_code = holidays
        self.tz = ZoneInfo(tz)
        self.count_crm_flags = count_crm_flags   # CRM-side flags count only when Sinch is configured
        self.now = now
        self._holidays = holiday_calendar(holidays)
        self._lock = threading.Lock()            # the holidays object fills years lazily
        self._end_of = lru_cache(maxsize=4096)(self._end_of_uncached)

    @classmethod
    def from_config(cls, cfg: Config, now: Callable[[], datetime] = utcnow) -> ComplianceClock:
        c = cfg.compliance
        return cls(c.business_days, c.holidays, c.timezone, c.warn_business_days,
                   count_crm_flags=cfg.sinch is not None, now=now)

    # --- the calendar ------------------------------------------------------------------
    def is_business_day(self, day: date) -> bool:
        if day.weekday() >= 5:
            return False
        if self._holidays is None:
            return True
        with self._lock:
            return day not in self._holidays

    def add_business_days(self, day: date, n: int) -> date:
        """The n-th business day after ``day`` (``day`` itself for n = 0)."""
        while n > 0:
            day += timedelta(days=1)
            if self.is_business_day(day):
                n -= 1
        return day

    def _end_of_uncached(self, day: date, n: int) -> datetime:
        last = self.add_business_days(day, n)
        return datetime.combine(last, END_OF_DAY, tzinfo=self.tz).astimezone(timezone.utc)

    def local_day(self, at: datetime) -> date:
        if at.tzinfo is None:
            at = at.replace(tzinfo=timezone.utc)
        return at.astimezone(self.tz).date()

    # --- the public API (``syncd trace`` calls deadline) ---------------------------------
    def deadline(self, received_at: datetime) -> datetime:
        """The end (local) of the N-th business day after the local day of receipt, in UTC."""
        return self._end_of(self.local_day(received_at), self.business_days)

    def warn_at(self, received_at: datetime) -> datetime:
        """From this moment on, the opt-out is at risk (W business days left)."""
        return self._end_of(self.local_day(received_at), max(0, self.business_days - self.warn_business_days))

    def within_deadline(self, received_at: datetime, honoured_at: datetime | None,
                        now: datetime | None = None) -> bool | None:
        """True/False once decided; None while open and the deadline is still ahead."""
        limit = self.deadline(received_at)
        if honoured_at is not None:
            return honoured_at <= limit
        return False if (now or self.now()) > limit else None

    def cutoffs(self, now: datetime | None = None) -> Cutoffs:
        """Deadlines never go backwards as arrivals get later, so "breached at ``now``"
        is "received before the first local day whose deadline is not past"."""
        now = now or self.now()
        return Cutoffs(now, self._first_day_start(now, self.business_days),
                       self._first_day_start(now, max(0, self.business_days - self.warn_business_days)))

    def _first_day_start(self, now: datetime, n: int) -> datetime:
        day = self.local_day(now)
        while self._end_of(day - timedelta(days=1), n) >= now:
            day -= timedelta(days=1)
        return datetime.combine(day, time(0), tzinfo=self.tz).astimezone(timezone.utc)

    # --- reads for status, metrics, the status page --------------------------------------
    def summary(self, store: Compliance, now: datetime | None = None) -> dict[str, Any]:
        """``syncd status --json``'s ``compliance`` object (plus ``breached_total`` for
        the metrics; callers print only the contract's four keys)."""
        cut = self.cutoffs(now)
        c = store.counts(iso(cut.breach_before) or "", iso(cut.risk_before) or "", self.count_crm_flags)
        age = None
        if c["oldest"]:
            age = max(0.0, (cut.now - parse_iso(str(c["oldest"]))).total_seconds())
        return {"open": c["open"], "at_risk": c["at_risk"], "breached": c["breached"],
                "oldest_open_age_seconds": age, "breached_total": c["breached_total"]}

    def at_risk(self, store: Compliance, now: datetime | None = None, limit: int = 500) -> list[dict[str, Any]]:
        """The at-risk opt-outs, oldest first, each with its ``deadline`` (ISO UTC)."""
        cut = self.cutoffs(now)
        rows = store.open_between(iso(cut.breach_before) or "", iso(cut.risk_before) or "",
                                  self.count_crm_flags, limit)
        for r in rows:
            r["deadline"] = iso(self.deadline(parse_iso(str(r["received_at"]))))
        return rows

    def export_columns(self, row: dict[str, Any], now: datetime | None = None) -> dict[str, Any]:
        """``deadline``, ``honoured_at``, ``within_deadline`` of one export row (opt-outs
        only; other kinds get None)."""
        if row.get("kind") not in ("opt_out", "do_not_contact") or not row.get("received_at"):
            return {"deadline": None, "honoured_at": None, "within_deadline": None}
        received = parse_iso(str(row["received_at"]))
        honoured = row.get("honoured_at")
        return {"deadline": iso(self.deadline(received)), "honoured_at": honoured,
                "within_deadline": self.within_deadline(received, parse_iso(honoured) if honoured else None,
                                                        now)}


class ComplianceCheck:
    """The scheduled step: honours CRM-side flags Sinch confirmed, stamps breaches, and
    alerts once per opt-out when it turns at risk. Leader only on PostgreSQL."""

    def __init__(self, clock: ComplianceClock, store: Compliance, *, ops: Operations | None = None,
                 alerts: Alerts | None = None, sinch_channels: list[str] | None = None):
        self.clock = clock
        self.store = store
        self.ops = ops
        self.alerts = alerts
        self.sinch_channels = [c.upper() for c in (sinch_channels or [])]
        self._alerted: set[int] = set()   # at-risk events already announced by this process

    def run_once(self) -> dict[str, int]:
        if self.ops is not None and not self.ops.try_leadership("compliance"):
            return {}
        now = self.clock.now()
        honoured = self.honour_confirmed_flags() if self.clock.count_crm_flags else 0
        cut = self.clock.cutoffs(now)
        breached = self.store.mark_breached(iso(cut.breach_before) or "", iso(now) or "", self.clock.count_crm_flags)
        if breached:
            log.warning("opt-outs past their deadline", extra={"count": breached})
        alerted = self.announce_at_risk(now)
        return {"honoured": honoured, "breached": breached, "alerted": alerted}

    def announce_at_risk(self, now: datetime) -> int:
        """One warning line and one alert per opt-out that turned at risk; beyond
        ``MAX_ALERTS_PER_CHECK`` in one check (a CRM down for days), one message counts
        the rest instead of flooding the channel."""
        risky = self.clock.at_risk(self.store, now)
        ids = {r["event_id"] for r in risky}
        self._alerted &= ids          # an event that left the at-risk set may be announced again
        fresh = [r for r in risky if r["event_id"] not in self._alerted]
        for n, r in enumerate(fresh):
            self._alerted.add(r["event_id"])
            log.warning("opt-out at risk", extra={"event_id": r["event_id"], "deadline": r["deadline"],
                                                  "pending": r["pending"], "status": r["status"]})
            if self.alerts is not None and n < MAX_ALERTS_PER_CHECK:
                self.alerts.opt_out_at_risk(r["event_id"], r["deadline"], r["pending"] or [r["status"]])
        rest = fresh[MAX_ALERTS_PER_CHECK:]
        if rest and self.alerts is not None:
            self.alerts.notify(f"at_risk:more:{rest[0]['event_id']}", "at_risk",
                               f"syncd: {len(rest)} more opt-outs turned at risk (deadlines from "
                               f"{rest[0]['deadline']}); see syncd status and the status page",
                               {"opt-outs": str(len(rest)), "first event": str(rest[0]["event_id"]),
                                "first deadline": rest[0]["deadline"]})
        return len(fresh)

    def honour_confirmed_flags(self) -> int:
        """A CRM-side flag is honoured when Sinch holds an opt-out for its phone on every
        configured channel, each confirmed (our registration done, or Sinch's own change)."""
        stamps: list[tuple[int, str]] = []
        after = 0
        while True:
            flags = self.store.open_crm_flags(after)
            if not flags:
                break
            held = self.store.sinch_confirmations([f["phone"] for f in flags if f["phone"]])
            for f in flags:
                at = self._confirmed_at(held.get(f["phone"] or "", {}))
                if at is not None:
                    stamps.append((f["id"], max(str(at), str(f["received_at"]))))
            after = flags[-1]["id"]
        return self.store.honour(stamps)

    def _confirmed_at(self, by_channel: dict[str, tuple[str, str | None, Any]]) -> Any:
        times = []
        for channel in self.sinch_channels:
            kind, state, at = by_channel.get(channel, ("", None, None))
            if kind != "opt_out" or state not in (None, "done") or at is None:
                return None
            times.append(str(at))
        return max(times) if times else None


def watch_metrics(metrics: Metrics, clock: ComplianceClock, store: Compliance, max_age_seconds: float = 5.0) -> None:
    """The compliance gauges and the breached counter on ``/metrics``, read from the journal."""
    metrics.watch_compliance(lambda: clock.summary(store), max_age_seconds)


class ComplianceReads:
    """The status page's compliance panel: the summary and the at-risk opt-outs, each
    read at most once per ``max_age`` seconds however often the page is reloaded."""

    def __init__(self, clock: ComplianceClock, store: Compliance, max_age: float = 5.0, limit: int = 100):
        from syncd.metrics import CachedRead

        self.clock = clock
        self.summary = CachedRead(lambda: clock.summary(store), max_age)
        self.at_risk = CachedRead(lambda: clock.at_risk(store, limit=limit), max_age)
        self.limit = limit
