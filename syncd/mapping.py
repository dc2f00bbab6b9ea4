"""Admin-edited YAML field mappings: (kind, channel) -> CRM field values.

A mapping file names, per CRM object, the fields each channel's consent lives in.
``do_not_contact`` (channel ``all``) writes every channel's fields; an event for
one channel never touches another channel's fields. ``@unsubscribe`` stands for
the CRM's own email-unsubscribe API (HubSpot, Close) instead of a field.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from connectors.types import RecordRef, RecordUpdate
from syncd.config import ConfigError, interpolate
from syncd.journal.base import Clock, Delivery

UNSUBSCRIBE = "@unsubscribe"
CHANNEL_NAMES = ("sms", "email", "call", "whatsapp")
_FIELD = re.compile(r"^(@unsubscribe|[A-Za-z_][A-Za-z0-9_. -]{0,127})$")  # Close names have spaces


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Values(_Strict):
    opt_out: Any = True
    opt_in: Any = False


class Audit(_Strict):
    reason: str | None = None
    source: str | None = None
    occurred_at: str | None = None


class ObjectMapping(_Strict):
    channels: dict[Literal["sms", "email", "call", "whatsapp"], list[str]]
    values: Values = Values()
    audit: Audit = Audit()

    @field_validator("channels")
    @classmethod
    def _names(cls, v: dict[str, list[str]]) -> dict[str, list[str]]:
        for channel, names in v.items():
            for name in names:
                if not _FIELD.match(name):
                    raise ValueError(f"{channel}: {name!r} is not a field name")
        return v

    def audit_fields(self) -> list[str]:
        return [f for f in (self.audit.reason, self.audit.source, self.audit.occurred_at) if f]


class EmailUnsubscribe(_Strict):
    """HubSpot email consent (communication preferences v4). ``subscription_id`` set:
    an opt-out sets that subscription type UNSUBSCRIBED and a newer opt-in sets it
    SUBSCRIBED, both with the legal basis below. Empty: an opt-out unsubscribes the
    address from all email, which an opt-in cannot undo (v4 resubscribes to a type)."""

    subscription_id: str | None = None
    legal_basis: Literal["LEGITIMATE_INTEREST_PQL", "LEGITIMATE_INTEREST_CLIENT", "PERFORMANCE_OF_CONTRACT",
                         "CONSENT_WITH_NOTICE", "NON_GDPR", "PROCESS_AND_STORE",
                         "LEGITIMATE_INTEREST_OTHER"] = "LEGITIMATE_INTEREST_CLIENT"
    legal_basis_explanation: str = "Recipient asked to stop email through a messaging platform."


class Reflect(_Strict):
    """What the reflector's poll reads: the CRM-side flags (``fields``) and the fields
    that identify the person (``phone_fields``, ``email_fields``), matched with the
    consent ledger."""

    fields: list[str] = []
    phone_fields: list[str] = []
    email_fields: list[str] = []


class Mapping(_Strict):
    objects: dict[str, ObjectMapping] = Field(min_length=1)
    email_unsubscribe: EmailUnsubscribe | None = None
    reflect: Reflect = Reflect()

    path: str = Field(default="", exclude=True)

    def for_object(self, obj: str) -> ObjectMapping | None:
        return self.objects.get(obj)


def load_mapping(path: Path, env: dict[str, str] | None = None) -> Mapping:
    """Load and validate one mapping file; ``${VAR}`` is read from the environment."""
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"mapping file not found: {path}") from None
    except yaml.YAMLError:
        raise ConfigError(f"{path}: not valid YAML") from None
    try:
        data = interpolate(data, "", dict(os.environ) if env is None else env)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    try:
        mapping = Mapping.model_validate(data or {})
    except ValidationError as exc:
        lines = [f"{path}: {'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()]
        raise ConfigError("\n".join(lines)) from None
    mapping.path = str(path)
    return mapping


# --- turning deliveries into one update per record ---------------------------------------

def _is_out(kind: str) -> bool:
    return kind in ("opt_out", "do_not_contact")


def _rank(occurred_at: str, out: bool) -> tuple[str, int]:
    # Same instant: the opt-out wins (the safe side of a legal obligation).
    return (occurred_at, 1 if out else 0)


@dataclass
class RecordPlan:
    """What to write on one record, and which delivery each written field came from."""

    ref: RecordRef
    deliveries: list[Delivery]
    update: RecordUpdate | None
    winners: dict[int, dict[str, Any]] = field(default_factory=dict)  # delivery id -> {field: value}
    problem: str | None = None  # set when the mapping cannot express these deliveries


def plan_record(ref: RecordRef, deliveries: list[Delivery], mapping: Mapping,
                clocks: dict[str, Clock]) -> RecordPlan:
    """Coalesce a record's backlog: per field, the newest ``occurred_at`` wins, also
    against what earlier pushes applied (the field clocks)."""
    om = mapping.for_object(ref.obj)
    if om is None:
        return RecordPlan(ref, deliveries, None, problem=f"{mapping.path}: no mapping for object {ref.obj}")
    best: dict[str, tuple[tuple[str, int], Delivery, Any]] = {}
    for d in deliveries:
        channels = CHANNEL_NAMES if d.channel == "all" else (d.channel,)
        names = [n for ch in channels for n in om.channels.get(ch, [])]  # type: ignore[call-overload]
        if not names:
            return RecordPlan(ref, deliveries, None, problem=(
                f"{mapping.path}: {ref.obj} maps no field for channel {d.channel}"))
        out = _is_out(d.kind)
        value = om.values.opt_out if out else om.values.opt_in
        rank = _rank(d.occurred_at, out)
        for name in names:
            clock = clocks.get(name)
            if clock is not None and _rank(clock.occurred_at, clock.value == om.values.opt_out) > rank:
                continue
            if name not in best or rank > best[name][0]:
                best[name] = (rank, d, value)
    if not best:
        return RecordPlan(ref, deliveries, None)
    winners: dict[int, dict[str, Any]] = {}
    for name, (_, d, value) in best.items():
        winners.setdefault(d.id, {})[name] = value
    newest = max((d for d in deliveries if d.id in winners), key=lambda d: _rank(d.occurred_at, _is_out(d.kind)))
    fields = {n: v for n, (_, _, v) in best.items() if n != UNSUBSCRIBE}
    if fields:
        for attr, name in (("reason", om.audit.reason), ("source", om.audit.source),
                           ("occurred_at", om.audit.occurred_at)):
            if name:
                fields[name] = getattr(newest, attr)
    unsub = best.get(UNSUBSCRIBE)
    options: dict[str, Any] = {}
    if unsub is not None and mapping.email_unsubscribe is not None:
        options = mapping.email_unsubscribe.model_dump()
    update = RecordUpdate(
        ref=ref, fields=fields,
        email=(unsub[1].email if unsub else None),
        email_unsubscribe=(None if unsub is None else bool(unsub[2] == om.values.opt_out)),
        options=options,
    )
    return RecordPlan(ref, deliveries, update, winners)
