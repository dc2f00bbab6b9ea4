"""``syncd check``: config, mappings and each CRM's own field metadata agree."""
from __future__ import annotations

from typing import Callable

import requests

from connectors.errors import AuthFailed, ConnectorError
from connectors.http import make_session, transport_cause
from connectors.plugin import CrmPlugin
from connectors.registry import CRM_PLUGINS
from syncd.config import Config, ConfigError, one_of
from syncd.mapping import UNSUBSCRIBE, Mapping
from syncd.masking import mask_text, register_secrets
from syncd.runtime import build_connectors, build_sinch, load_mappings

# Field types a flag may have in any CRM; a plugin adds its own (Close: "choices").
BOOLEAN_TYPES = frozenset({"boolean", "bool", "checkbox", "booleancheckbox"})


def run_check(cfg: Config, progress: Callable[[str], None] = lambda line: None) -> list[str]:
    """One line per problem; an empty list means all is well. ``progress`` hears what is
    being waited on, and which Salesforce instance the token answer pointed at."""
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
        unreachable = _unreachable(cfg, crm_endpoints(cfg, crm), progress)
        if unreachable:
            problems += unreachable
            continue
        progress(f"{crm}: reading field metadata")
        try:
            problems += _check_mapping(crm, mapping, connectors[crm])
        except AuthFailed as exc:
            key, url = crm_credentials(cfg, crm)
            problems.append(f"config: {key}: {crm} refused the credentials ({url}): {mask_text(str(exc))}")
            continue
        used = getattr(connectors[crm], "instance_in_use", None)
        if used:
            progress(f"{crm}: instance in use {used}")
    if cfg.sinch is not None:
        unreachable = _unreachable(cfg, [("sinch.auth_url", cfg.sinch.auth_url),
                                         ("sinch.base_url", cfg.sinch.base_url)], progress)
        problems += unreachable or _check_sinch(cfg)
    return problems


def crm_endpoints(cfg: Config, crm: str) -> list[tuple[str, str]]:
    """(config key, URL) of the first server each CRM's connector talks to."""
    settings = cfg.crm.blocks()[crm]
    return [(f"crm.{crm}.{key}", url) for key, url in CRM_PLUGINS[crm].endpoints(settings)]


def crm_credentials(cfg: Config, crm: str) -> tuple[str, str]:
    """(config key of the credentials, URL that judged them)."""
    plugin, settings = CRM_PLUGINS[crm], cfg.crm.blocks()[crm]
    if plugin.credentials is None:
        _, url = plugin.endpoints(settings)[0]
        return f"crm.{crm}", url
    key, url = plugin.credentials(settings)
    return f"crm.{crm}.{key}", url


def _unreachable(cfg: Config, endpoints: list[tuple[str, str]], progress: Callable[[str], None]) -> list[str]:
    """One problem line per URL whose server does not answer HTTP at all."""
    problems = []
    session = make_session(cfg.http.ca_bundle, min(cfg.http.timeout_seconds, 15.0))
    for key, url in endpoints:
        progress(f"connecting to {url} ({key})")
        cause = connection_cause(session, url)
        if cause:
            problems.append(f"config: {key}: cannot reach {url}: {cause}")
    return problems


def connection_cause(session: requests.Session, url: str) -> str | None:
    """None when the server answers HTTP (any status); else why not, in words:
    connection refused, DNS, TLS certificate, timeout."""
    try:
        session.get(url, allow_redirects=False)
        return None
    except requests.exceptions.Timeout:
        return "timed out (http.timeout_seconds)"
    except requests.exceptions.RequestException as exc:
        return transport_cause(exc)


def _check_mapping(crm: str, mapping: Mapping, connector) -> list[str]:
    plugin = CRM_PLUGINS[crm]
    flag_types = BOOLEAN_TYPES | plugin.flag_types
    problems: list[str] = []
    for obj, om in mapping.objects.items():
        try:
            meta = connector.fields(obj)
        except AuthFailed:
            raise  # one line against the credentials' config key, not per object
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
        for name in [*mapping.reflect.fields, *mapping.reflect.phone_fields, *mapping.reflect.email_fields]:
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
    except AuthFailed as exc:
        assert cfg.sinch is not None
        return [f"config: sinch.key_id/sinch.key_secret: Sinch refused the credentials ({cfg.sinch.auth_url}): "
                f"{mask_text(str(exc))}"]
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
