"""Settings types shared by every CRM plugin's settings model.

They live here, not in ``syncd.config``, because connectors never import the
daemon; ``syncd.config`` re-uses them for its own keys.
"""
from __future__ import annotations

import ipaddress
from typing import Annotated
from urllib.parse import urlsplit

from pydantic import AfterValidator, BaseModel, ConfigDict


def _outbound_url(value: str) -> str:
    """Outbound calls carry credentials: https only, except to this machine (the sandboxes)."""
    value = value.strip()
    parts = urlsplit(value)
    host = parts.hostname or ""
    if parts.scheme not in ("http", "https") or not host:  # ``api.hubapi.com`` alone is a typo
        raise ValueError(f"{value!r} is not a URL: it must start with https:// and name a host")
    if parts.scheme == "https" or is_loopback(host):
        return value
    where = f"{parts.scheme}://{host}"
    raise ValueError(f"must be an https:// URL (http:// only for a loopback host such as 127.0.0.1); "
                     f"got {where}")


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


OutboundUrl = Annotated[str, AfterValidator(_outbound_url)]


class SecretMark:
    """Marks a settings field as a credential: syncd masks its value in logs and errors
    whatever the key is called."""

    def __repr__(self) -> str:
        return "SECRET"


SECRET = SecretMark()
Secret = Annotated[str, SECRET]
OptionalSecret = Annotated[str | None, SECRET]


class Strict(BaseModel):
    """A settings block that refuses unknown keys (a typo is an error, not a silent default)."""

    model_config = ConfigDict(extra="forbid")


class CrmSettings(Strict):
    """The keys every ``crm.<name>`` block has; a plugin's settings model extends it."""

    mapping: str
