"""``syncd check``: config, mappings and each CRM's own field metadata agree."""
from __future__ import annotations

from connectors.errors import ConnectorError
from connectors.plugin import CrmPlugin
from connectors.registry import CRM_PLUGINS
from syncd.config import Config, ConfigError, one_of
from syncd.mapping import UNSUBSCRIBE, Mapping
from syncd.masking import mask_text, register_secrets
from syncd.runtime import build_connectors, build_sinch, load_mappings

# Field types a flag may have in any CRM; a plugin adds its own (Close: "choices").
BOOLEAN_TYPES = frozenset({"boolean", "bool", "checkbox", "booleancheckbox"})


def run_check(cfg: Config) -> list[str]:
    """One line per problem; an empty list means all is well."""
    register_secrets(cfg.secrets())
    problems: list[str] = []
    if not cfg.crm.enabled():
        blocks = one_of(f"crm.{name}" for name in CRM_PLUGINS)
        problems.append(f"config: crm: no CRM is enabled (add a {blocks} block)")
    if not any((cfg.sources.apten, cfg.sources.lox24, cfg.sources.sinch)):
        problems.append("config: sources: no webhook source is enabled")
    try:
        mappings = load_mappings(cfg)
    except ConfigError as exc:
        return problems + str(exc).splitlines()
    connectors = build_connectors(cfg, mappings)
    for crm, mapping in mappings.items():
        problems += _check_mapping(crm, mapping, connectors[crm])
    if cfg.sinch is not None:
        problems += _check_sinch(cfg)
    return problems


def _check_mapping(crm: str, mapping: Mapping, connector) -> list[str]:
    plugin = CRM_PLUGINS[crm]
    flag_types = BOOLEAN_TYPES | plugin.flag_types
    problems: list[str] = []
    for obj, om in mapping.objects.items():
        try:
            meta = connector.fields(obj)
        except ConnectorError as exc:
            problems.append(f"{mapping.path}: {obj}: cannot read field metadata from {crm}: {mask_text(str(exc))}")
            continue
        booleans = isinstance(om.values.opt_out, bool) and isinstance(om.values.opt_in, bool)
        for channel, names in om.channels.items():
            for name in names:
                if name == UNSUBSCRIBE:
                    problems += _check_unsubscribe(plugin, mapping, f"{obj}.{channel}", connector)
                    continue
                problems += _check_field(mapping.path, crm, obj, name, meta, flag_types if booleans else frozenset())
        for name in om.audit_fields():
            problems += _check_field(mapping.path, crm, obj, name, meta, frozenset())
        for name in [*mapping.reflect.fields, *mapping.reflect.phone_fields]:
            if name not in meta:
                problems.append(f"{mapping.path}: reflect: {obj}.{name}: no such field in {crm}")
    return problems


def _check_unsubscribe(plugin: CrmPlugin, mapping: Mapping, where: str, connector) -> list[str]:
    """``@unsubscribe`` needs the CRM's own unsubscribe API; its options must suit the account."""
    if not plugin.email_unsubscribe:
        hint = f"; {plugin.unsubscribe_hint}" if plugin.unsubscribe_hint else ""
        return [f"{mapping.path}: {where}: {UNSUBSCRIBE} is not supported for {plugin.title}{hint}"]
    if plugin.check_email_unsubscribe is None:
        return []
    options = mapping.email_unsubscribe.model_dump() if mapping.email_unsubscribe else {}
    return [f"{mapping.path}: {line}" for line in plugin.check_email_unsubscribe(connector, options, mask_text)]


def email_modes(cfg: Config) -> list[str]:
    """The lines ``check`` prints saying how each CRM applies email opt-outs
    (information, not problems; none for a CRM that maps no email or says nothing)."""
    try:
        mappings = load_mappings(cfg)
    except ConfigError:
        return []
    lines = []
    for crm, mapping in mappings.items():
        describe = CRM_PLUGINS[crm].email_mode
        if describe is None:
            continue
        if not any(UNSUBSCRIBE in names for om in mapping.objects.values() for names in om.channels.values()):
            continue
        options = mapping.email_unsubscribe.model_dump() if mapping.email_unsubscribe else None
        lines.append(f"{crm}: email mode: {describe(options)}")
    return lines


def _check_field(path: str, crm: str, obj: str, name: str, meta: dict, flag_types: frozenset[str]) -> list[str]:
    """``flag_types``: the types a flag field may have; empty for a field that is no flag."""
    info = meta.get(name)
    if info is None:
        return [f"{path}: {obj}.{name}: no such field in {crm}"]
    out = []
    if not info.updateable:
        out.append(f"{path}: {obj}.{name}: field is read-only in {crm}")
    if flag_types and info.type.lower() not in flag_types:
        out.append(f"{path}: {obj}.{name}: field type is {info.type}, expected a checkbox/boolean")
    return out


def _check_sinch(cfg: Config) -> list[str]:
    problems = _sinch_channel_warnings(cfg.sinch.channels if cfg.sinch else [])
    try:
        sinch = build_sinch(cfg)
        assert sinch is not None
        sinch.check()
    except (ConnectorError, ValueError) as exc:
        return problems + [f"config: sinch: {mask_text(str(exc))}"]
    return problems


# Sinch documents the Conversation API opt-in/opt-out registration for WhatsApp only;
# another channel answers OPT_OUT_STATUS_UNSPECIFIED ("doesn't support Opt-out").
SINCH_REGISTRATION_CHANNELS = {"WHATSAPP"}


def _sinch_channel_warnings(channels: list[str]) -> list[str]:
    return [f"config: sinch.channels: {ch}: Sinch documents opt-out registration for WHATSAPP only; "
            f"registrations on {ch} will fail (OPT_OUT_STATUS_UNSPECIFIED). Remove it and block sending "
            "on it with Sinch consent management (README: Reflecting CRM flags to Sinch)"
            for ch in channels if ch.upper() not in SINCH_REGISTRATION_CHANNELS]
