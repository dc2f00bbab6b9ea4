"""Webhook sources: each verifies its own authentication and parses its own payloads
into :class:`syncd.events.ConsentEvent`. They do no I/O beyond reading the request."""
from __future__ import annotations

from syncd.config import Config
from syncd.sources.apten import AptenSource
from syncd.sources.base import BadPayload, Ignored, Source, Unauthorized
from syncd.sources.lox24 import Lox24Source
from syncd.sources.sinch import SinchSource


def build_sources(cfg: Config) -> dict[str, Source]:
    """The enabled sources, keyed by their URL name (built once at start-up)."""
    found: dict[str, Source] = {}
    region = cfg.phone.default_region
    if cfg.sources.apten:
        found["apten"] = AptenSource(cfg.sources.apten.secret, region)
    if cfg.sources.lox24:
        found["lox24"] = Lox24Source(cfg.sources.lox24.token, region,
                                     allow_query_token=cfg.sources.lox24.allow_query_token)
    if cfg.sources.sinch:
        found["sinch"] = SinchSource(cfg.sources.sinch.secret, region,
                                     max_skew_seconds=cfg.sources.sinch.max_skew_seconds)
    return found


__all__ = ["BadPayload", "Ignored", "Source", "Unauthorized", "build_sources"]
