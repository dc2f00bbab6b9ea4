"""The status page's per-CRM health table and its two charts, drawn server-side as
inline SVG (no script, no external asset: the page's CSP allows neither).

- Events per hour over the last 7 days: one bar per hour.
- Time to honour per CRM over the last 7 days: per day, the median time from an
  event's receipt to its delivery being done (bar) and the 95th percentile (tick).
"""
from __future__ import annotations

import statistics
from datetime import datetime, timedelta, timezone
from typing import Any, Callable

from markupsafe import Markup, escape

from syncd.events import iso, parse_iso
from syncd.masking import mask_text

DAYS = 7
CRM_COLORS = ["#0969da", "#bf3989", "#1a7f37", "#9a6700", "#8250df"]


def _when(epoch: float | None) -> str:
    if epoch is None:
        return ""
    return datetime.fromtimestamp(epoch, timezone.utc).strftime("%Y-%m-%d %H:%M:%SZ")


def duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s" if seconds >= 10 else f"{seconds:.1f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    if seconds < 172800:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} d"


def page_extras(journal: Any, health: Callable[[], dict[str, dict[str, Any]]] | None,
                crm_counts: dict[str, dict[str, Any]], now: datetime | None = None) -> dict[str, Any]:
    """Everything the page adds to the counts: health rows and the two SVGs."""
    now = now or datetime.now(timezone.utc)
    since = (now - timedelta(days=DAYS)).replace(minute=0, second=0, microsecond=0)
    stats = journal.page_stats(iso(since))  # declared by the Reports store (and its cached reads)
    report = health() if health else {}
    return {"health": health_rows(report, crm_counts, stats["next_attempt"]),
            "events_chart": events_per_hour_svg(stats["per_hour"], now),
            "honour_chart": time_to_honour_svg(stats["done"], now)}


def health_rows(report: dict[str, dict[str, Any]], crm_counts: dict[str, dict[str, Any]],
                next_attempt: dict[str, float]) -> list[dict[str, str]]:
    rows = []
    for crm in sorted(set(report) | set(crm_counts) | set(next_attempt)):
        h, c = report.get(crm, {}), crm_counts.get(crm, {})
        if h.get("paused_until"):
            state = "paused"
        elif h.get("failing_since"):
            state = "failing"
        elif h.get("last_success") or c.get("last_push_at"):
            state = "ok"
        else:
            state = "idle"
        rows.append({
            "crm": crm, "state": state,
            "last_success": _when(h.get("last_success")) or (c.get("last_push_at") or ""),
            "last_error": mask_text(h.get("last_error") or ""),
            "last_error_at": _when(h.get("last_error_at")),
            "failing_since": _when(h.get("failing_since")),
            "next_attempt": _when(next_attempt.get(crm)),
            "paused_until": _when(h.get("paused_until")),
        })
    return rows


def events_per_hour_svg(per_hour: dict[str, int], now: datetime) -> Markup:
    end = now.replace(minute=0, second=0, microsecond=0)
    hours = [end - timedelta(hours=DAYS * 24 - 1 - i) for i in range(DAYS * 24)]
    counts = [per_hour.get(h.strftime("%Y-%m-%dT%H"), 0) for h in hours]
    top = max(max(counts), 1)
    left, width, plot_h, base = 44, 5, 120, 130
    parts = [f'<svg class="chart" id="events-chart" role="img" viewBox="0 0 {left + len(hours) * width + 8} 160" '
             f'xmlns="http://www.w3.org/2000/svg" aria-labelledby="events-chart-title">',
             f'<title id="events-chart-title">Events received per hour, last {DAYS} days '
             f'({sum(counts)} in all, at most {top} in an hour)</title>',
             f'<line x1="{left}" y1="{base}" x2="{left + len(hours) * width}" y2="{base}" stroke="#8c959f"/>',
             f'<text x="{left - 6}" y="{base}" text-anchor="end" font-size="11" fill="#57606a">0</text>',
             f'<text x="{left - 6}" y="{base - plot_h + 4}" text-anchor="end" font-size="11" fill="#57606a">{top}</text>']
    for i, (hour, n) in enumerate(zip(hours, counts)):
        x = left + i * width
        if hour.hour == 0 or (i == 0 and hour.hour < 12):  # a label needs half a day of room
            parts.append(f'<line x1="{x}" y1="{base}" x2="{x}" y2="{base + 5}" stroke="#8c959f"/>'
                         f'<text x="{x + 2}" y="{base + 18}" font-size="11" fill="#57606a">'
                         f'{escape(hour.strftime("%a %d"))}</text>')
        if n:
            h = max(1.0, plot_h * n / top)
            parts.append(f'<rect x="{x}" y="{base - h:.1f}" width="{width - 1}" height="{h:.1f}" fill="#0969da">'
                         f'<title>{escape(hour.strftime("%Y-%m-%d %H:00"))} UTC: {n} events</title></rect>')
    parts.append("</svg>")
    return Markup("".join(parts))


def _honour_by_day(done: list[tuple[str, str, str]], days: list[str]) -> dict[str, dict[str, list[float]]]:
    found: dict[str, dict[str, list[float]]] = {}
    for crm, received, delivered in done:
        day = delivered[:10]
        if day not in days:
            continue
        try:
            seconds = (parse_iso(delivered) - parse_iso(received)).total_seconds()
        except ValueError:
            continue
        found.setdefault(crm, {}).setdefault(day, []).append(max(0.0, seconds))
    return found


def _p95(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))]


def time_to_honour_svg(done: list[tuple[str, str, str]], now: datetime) -> Markup:
    days = [(now - timedelta(days=DAYS - 1 - i)).strftime("%Y-%m-%d") for i in range(DAYS)]
    by_crm = _honour_by_day(done, days)
    if not by_crm:
        return Markup('<p class="empty">No deliveries done in the last 7 days.</p>')
    crms = sorted(by_crm)
    top = max(_p95(v) for per_day in by_crm.values() for v in per_day.values()) or 1.0
    left, group, plot_h, base = 56, 110, 120, 140
    bar = min(24, (group - 20) // len(crms))
    total_w = left + DAYS * group + 8
    parts = [f'<svg class="chart" id="honour-chart" role="img" viewBox="0 0 {total_w} 190" '
             f'xmlns="http://www.w3.org/2000/svg" aria-labelledby="honour-chart-title">',
             f'<title id="honour-chart-title">Time to honour per CRM, last {DAYS} days: median per day (bar) '
             f'and 95th percentile (tick)</title>',
             f'<line x1="{left}" y1="{base}" x2="{left + DAYS * group}" y2="{base}" stroke="#8c959f"/>',
             f'<text x="{left - 6}" y="{base}" text-anchor="end" font-size="11" fill="#57606a">0</text>',
             f'<text x="{left - 6}" y="{base - plot_h + 4}" text-anchor="end" font-size="11" fill="#57606a">'
             f'{escape(duration(top))}</text>']
    for d, day in enumerate(days):
        gx = left + d * group
        parts.append(f'<text x="{gx + 10}" y="{base + 16}" font-size="11" fill="#57606a">{escape(day[5:])}</text>')
        for c, crm in enumerate(crms):
            values = by_crm[crm].get(day)
            if not values:
                continue
            color = CRM_COLORS[c % len(CRM_COLORS)]
            med, p95 = statistics.median(values), _p95(values)
            x = gx + 10 + c * bar
            h = max(1.0, plot_h * med / top)
            t = base - plot_h * p95 / top
            label = escape(f"{crm} {day}: median {duration(med)}, p95 {duration(p95)}, {len(values)} deliveries")
            parts.append(f'<g><title>{label}</title>'
                         f'<rect x="{x}" y="{base - h:.1f}" width="{bar - 3}" height="{h:.1f}" fill="{color}"/>'
                         f'<line x1="{x}" y1="{t:.1f}" x2="{x + bar - 3}" y2="{t:.1f}" stroke="{color}" '
                         f'stroke-width="2"/></g>')
    for c, crm in enumerate(crms):
        x = left + c * 140
        every = [v for per_day in by_crm[crm].values() for v in per_day]
        parts.append(f'<rect x="{x}" y="{base + 30}" width="10" height="10" '
                     f'fill="{CRM_COLORS[c % len(CRM_COLORS)]}"/>'
                     f'<text x="{x + 14}" y="{base + 39}" font-size="11" fill="#1b1f24">{escape(crm)} '
                     f'median {escape(duration(statistics.median(every)))}</text>')
    parts.append("</svg>")
    return Markup("".join(parts))
