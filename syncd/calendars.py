"""Business-day calendars: the public holidays of a country or subdivision, from the
``holidays`` package. Shared by the config check and the compliance clock."""
from __future__ import annotations

import holidays as holidays_lib


def holiday_calendar(code: str | None) -> holidays_lib.HolidayBase | None:
    """The public holidays of ``US``, ``US-CA``, ``DE-BY``... (None: weekends only).
    Raises ValueError naming what is unknown."""
    if not code:
        return None
    country, _, subdiv = code.strip().upper().partition("-")
    supported = holidays_lib.list_supported_countries()
    if country not in supported:
        raise ValueError(f"unknown country {country!r} (an ISO 3166 code the holidays package knows, "
                         f"e.g. US, DE, GB)")
    if subdiv and subdiv not in [s.upper() for s in supported[country]]:
        raise ValueError(f"{country} has no subdivision {subdiv!r} (known: {', '.join(supported[country][:12])}"
                         f"{', ...' if len(supported[country]) > 12 else ''})")
    return holidays_lib.country_holidays(country, subdiv=subdiv or None)
