"""Load and validate ``config.yaml``.

``${VAR}`` and ``${VAR:-default}`` are read from the environment before
validation. Every problem becomes one :class:`ConfigError` line naming the key,
so ``syncd`` can exit with a clear message instead of a traceback.
"""
from __future__ import annotations

import difflib
import ipaddress
import logging
import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

import yaml
from pydantic import (AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, ValidationError,
                      field_validator, model_validator)

_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-(.*?))?\}")

# Secrets syncd itself checks (webhook secrets and tokens, the status page's token): the
# operator chooses them, so they must be long enough not to be guessed. Credentials a
# vendor issues (CRM client secrets, API keys, Sinch key secrets) are the vendor's to shape.
MIN_SECRET_LENGTH = 24
GENERATE_SECRET = 'python -c "import secrets; print(secrets.token_urlsafe(32))"'
# The sandbox stack's webhook secrets (``syncd demo``, the tests and benchmarks sign with
# them). They are published with the source, so a config carrying one is refused unless
# DEMO_ENV=1, which the demo stack (syncd.stack) sets for itself and its child processes.
DEMO_SECRETS = {"apten": "syncd-demo-apten-secret-do-not-use",
                "lox24": "syncd-demo-lox24-token-do-not-use",
                "sinch": "syncd-demo-sinch-secret-do-not-use"}
DEMO_ENV = "SYNCD_DEMO"


def _own_secret(value: str) -> str:
    if len(value) < MIN_SECRET_LENGTH:
        raise ValueError(f"must be at least {MIN_SECRET_LENGTH} characters (this one has {len(value)}); "
                         f"generate one with: {GENERATE_SECRET}")
    if value in DEMO_SECRETS.values() and os.environ.get(DEMO_ENV) != "1":
        raise ValueError(f"is the published value of syncd demo and works only there; "
                         f"generate your own with: {GENERATE_SECRET}")
    return value


def _empty_is_none(value: Any) -> Any:
    return None if value == "" else value


OwnSecret = Annotated[str, AfterValidator(_own_secret)]
OptionalOwnSecret = Annotated[OwnSecret | None, BeforeValidator(_empty_is_none)]  # empty: the feature is off


def _outbound_url(value: str) -> str:
    """Outbound calls carry credentials: https only, except to this machine (the sandboxes)."""
    value = value.strip()
    parts = urlsplit(value)
    host = parts.hostname or ""
    if parts.scheme not in ("http", "https") or not host:  # ``api.hubapi.com`` alone is a typo
        raise ValueError(f"{value!r} is not a URL: it must start with https:// and name a host")
    if parts.scheme == "https" or _is_loopback(host):
        return value
    where = f"{parts.scheme}://{host}"
    raise ValueError(f"must be an https:// URL (http:// only for a loopback host such as 127.0.0.1); "
                     f"got {where}")


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


OutboundUrl = Annotated[str, AfterValidator(_outbound_url)]


class ConfigError(Exception):
    """A configuration problem, already phrased for the operator."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class JournalConfig(_Strict):
    url: str = "sqlite:///syncd.db"

    @field_validator("url")
    @classmethod
    def _scheme(cls, v: str) -> str:
        if not (v.startswith("sqlite:///") or v.startswith(("postgresql://", "postgres://"))):
            raise ValueError("must start with sqlite:/// or postgresql://")
        return v


class ReceiverConfig(_Strict):
    host: str = "127.0.0.1"
    port: int = Field(8080, ge=0, le=65535)
    max_body_bytes: int = Field(1_048_576, ge=1024, le=64 * 1024 * 1024)
    max_stored_body_bytes: int = Field(65_536, ge=0, le=64 * 1024 * 1024)  # beyond it, the body's hash
    threads: int = Field(8, ge=1, le=256)
    # waitress's own defaults (100 connections, 120 s idle) let ~100 stalled clients lock
    # everyone else out; these are passed to waitress as connection_limit / channel_timeout.
    connection_limit: int = Field(1000, ge=10, le=100_000)
    channel_timeout_seconds: int = Field(15, ge=1, le=3600)
    status_token: OptionalOwnSecret = None  # deprecated: admin.status_token (moved with the page)


class AdminConfig(_Strict):
    """The private listener: /metrics, /readyz, /status (and /healthz)."""
    host: str = "127.0.0.1"
    port: int = Field(9090, ge=0, le=65535)
    status_token: OptionalOwnSecret = None
    min_free_disk_mb: int = Field(512, ge=0)  # /readyz fails below this; 0 turns the check off


class HttpConfig(_Strict):
    timeout_seconds: float = Field(30.0, gt=0, le=600)
    ca_bundle: str | None = None

    @field_validator("ca_bundle")
    @classmethod
    def _exists(cls, v: str | None) -> str | None:
        if v and not Path(v).is_file():
            raise ValueError(f"file not found: {v}")
        return v or None


class PhoneConfig(_Strict):
    default_region: str = "US"

    @field_validator("default_region")
    @classmethod
    def _region(cls, v: str) -> str:
        import phonenumbers

        if v.upper() not in phonenumbers.SUPPORTED_REGIONS:
            raise ValueError(f"unknown region code {v!r}")
        return v.upper()


class AptenSource(_Strict):
    secret: OwnSecret


class Lox24Source(_Strict):
    token: OwnSecret
    allow_query_token: bool = False  # ?token= ends up in proxy logs and histories: weaker


class SinchSource(_Strict):
    secret: OwnSecret
    max_skew_seconds: int = Field(300, ge=1, le=3600)


class SourcesConfig(_Strict):
    apten: AptenSource | None = None
    lox24: Lox24Source | None = None
    sinch: SinchSource | None = None


class SalesforceAuth(_Strict):
    flow: Literal["client_credentials", "jwt", "password", "access_token"]
    login_url: OutboundUrl | None = None
    client_id: str | None = None
    client_secret: str | None = None
    username: str | None = None
    password: str | None = None
    private_key_file: str | None = None
    audience: str | None = None  # jwt aud; default: login.salesforce.com / test.salesforce.com
    access_token: str | None = None


    @model_validator(mode="after")
    def _needs(self) -> "SalesforceAuth":
        needs = {
            "client_credentials": ("login_url", "client_id", "client_secret"),
            "jwt": ("login_url", "client_id", "username", "private_key_file"),
            "password": ("login_url", "client_id", "client_secret", "username", "password"),
            "access_token": ("access_token",),
        }[self.flow]
        missing = [k for k in needs if not getattr(self, k)]
        if missing:
            raise ValueError(f"flow {self.flow} needs {', '.join(missing)}")
        return self


class SalesforceConfig(_Strict):
    instance_url: OutboundUrl
    api_version: str = "62.0"
    auth: SalesforceAuth
    mapping: str = "mappings/salesforce.yaml"
    # Share of the org's daily API quota syncd may use (other integrations need the rest);
    # at it, pushes pause and /limits is checked every limits_probe_seconds until quota is back.
    api_budget_percent: float = Field(90.0, gt=0, le=100)
    limits_probe_seconds: float = Field(300.0, gt=0, le=3600)


    @field_validator("api_version")
    @classmethod
    def _version(cls, v: str) -> str:
        if not re.fullmatch(r"\d{2,3}\.0", v):
            raise ValueError("must look like \"62.0\"")
        return v


class HubSpotConfig(_Strict):
    base_url: OutboundUrl = "https://api.hubapi.com"
    access_token: str
    mapping: str = "mappings/hubspot.yaml"



class CloseConfig(_Strict):
    base_url: OutboundUrl = "https://api.close.com/api/v1"
    api_key: str
    mapping: str = "mappings/close.yaml"



class CrmConfig(_Strict):
    salesforce: SalesforceConfig | None = None
    hubspot: HubSpotConfig | None = None
    close: CloseConfig | None = None

    def enabled(self) -> list[str]:
        return [name for name in ("salesforce", "hubspot", "close") if getattr(self, name) is not None]


class SinchConfig(_Strict):
    base_url: OutboundUrl = "https://us.conversation.api.sinch.com"
    auth_url: OutboundUrl = "https://auth.sinch.com/oauth2/token"
    project_id: str
    app_id: str
    key_id: str
    key_secret: str
    channels: list[str] = ["WHATSAPP"]
    reflect_opt_in: bool = False
    reflect_backfill: bool = False       # first poll reads every flag already set
    notification_timeout_seconds: float = Field(600.0, gt=0)


    @field_validator("channels")
    @classmethod
    def _channels(cls, v: list[str]) -> list[str]:
        if not v or not all(re.fullmatch(r"[A-Z][A-Z_]{0,31}", c.upper()) for c in v):
            raise ValueError("must be a non-empty list of Sinch channel names such as WHATSAPP")
        return [c.upper() for c in v]


class ScheduleConfig(_Strict):
    push_interval_seconds: float = Field(2.0, gt=0, le=3600)
    poll_interval_seconds: float = Field(60.0, gt=0, le=86400)
    batch_size: int = Field(1000, ge=1, le=10000)
    lease_seconds: float = Field(120.0, ge=5, le=3600)


class RetryConfig(_Strict):
    max_attempts: int = Field(15, ge=1, le=1000)
    max_age_hours: float = Field(72.0, gt=0)
    initial_backoff_seconds: float = Field(5.0, gt=0)
    max_backoff_seconds: float = Field(3600.0, gt=0)


class RoutingRule(_Strict):
    pattern: str
    crm: Literal["salesforce", "hubspot", "close"]
    object: str | None = None

    @field_validator("pattern")
    @classmethod
    def _compiles(cls, v: str) -> str:
        try:
            re.compile(v)
        except re.error as exc:
            raise ValueError(f"not a regular expression: {exc}") from None
        return v


class RoutingConfig(_Strict):
    rules: list[RoutingRule] = []


class AlertsConfig(_Strict):
    webhook_url: OutboundUrl | None = None  # Slack-compatible incoming webhook; None: no alerts
    cooldown_seconds: float = Field(3600.0, ge=0, le=7 * 86400)  # one message per cause per this long



class LoggingConfig(_Strict):
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    format: Literal["json", "text"] = "json"


class Config(_Strict):
    journal: JournalConfig = JournalConfig()
    receiver: ReceiverConfig = ReceiverConfig()
    admin: AdminConfig = Field(default_factory=AdminConfig)
    http: HttpConfig = HttpConfig()
    phone: PhoneConfig = PhoneConfig()
    sources: SourcesConfig = SourcesConfig()
    crm: CrmConfig = CrmConfig()
    sinch: SinchConfig | None = None
    schedule: ScheduleConfig = ScheduleConfig()
    retry: RetryConfig = RetryConfig()
    routing: RoutingConfig = RoutingConfig()
    logging: LoggingConfig = LoggingConfig()
    alerts: AlertsConfig = AlertsConfig()

    # Where the file lives: relative mapping and journal paths resolve against it.
    base_dir: Path = Field(default=Path("."), exclude=True)

    @model_validator(mode="after")
    def _admin(self) -> "Config":
        """``receiver.status_token`` still works (the page moved to the admin listener)."""
        if self.receiver.status_token and not self.admin.status_token:
            logging.getLogger("syncd.config").warning(
                "receiver.status_token is deprecated: set admin.status_token instead")
            self.admin.status_token = self.receiver.status_token
        if self.admin.port and (self.admin.host, self.admin.port) == (self.receiver.host, self.receiver.port):
            raise ValueError("admin.port: must differ from receiver.port (the admin listener is a second port)")
        return self

    def resolve(self, path: str) -> Path:
        p = Path(path)
        return p if p.is_absolute() else (self.base_dir / p)

    def secrets(self) -> list[str]:
        """Every configured secret value, for log masking."""
        found: list[str] = []

        def walk(obj: Any, key: str = "") -> None:
            if isinstance(obj, BaseModel):
                for name in type(obj).model_fields:
                    walk(getattr(obj, name), name)
            elif isinstance(obj, str) and any(w in key for w in ("secret", "token", "password", "api_key")):
                found.append(obj)

        walk(self)
        return [s for s in found if s]


def interpolate(value: Any, path: str, env: dict[str, str], missing: list[tuple[str, str]] | None = None) -> Any:
    """Substitute ``${VAR}`` references. With ``missing``, unset variables are collected
    there as ``(key path, name)`` (and left empty) instead of raising at the first."""
    if isinstance(value, dict):
        return {k: interpolate(v, f"{path}.{k}" if path else str(k), env, missing) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, f"{path}[{i}]", env, missing) for i, v in enumerate(value)]
    if not isinstance(value, str):
        return value

    def sub(m: re.Match[str]) -> str:
        name, default = m.group(1), m.group(2)
        if name in env and env[name] != "":
            return env[name]
        if default is not None:
            return default
        if missing is None:
            raise ConfigError(f"{path}: environment variable {name} is not set")
        missing.append((path, name))
        return ""

    return _ENV_REF.sub(sub, value)


def _did_you_mean(word: str, choices: Any) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f" (did you mean {close[0]}?)" if close else ""


def _model_at(loc: tuple[Any, ...]) -> type[BaseModel] | None:
    """The config model that holds the key at ``loc`` (for "did you mean")."""
    import typing

    model: Any = Config
    for part in loc[:-1]:
        if isinstance(part, int) or str(part).startswith("function-"):
            continue
        field = model.model_fields.get(str(part)) if isinstance(model, type) else None
        if field is None:
            return None
        candidates = [field.annotation, *typing.get_args(field.annotation)]
        candidates += [a for c in candidates for a in typing.get_args(c)]
        model = next((c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)), None)
        if model is None:
            return None
    return model


def _format_error(err: dict[str, Any]) -> str:
    loc = ".".join(str(p) for p in err["loc"] if not str(p).startswith("function-"))
    msg = err["msg"]
    if err["type"] == "extra_forbidden":
        model = _model_at(tuple(err["loc"]))
        msg = "unknown key" + (_did_you_mean(str(err["loc"][-1]), model.model_fields) if model else "")
    elif err["type"] == "missing":
        msg = "required key is missing"
    msg = msg.removeprefix("Value error, ")
    return f"{loc}: {msg}" if loc else msg


def parse_config(data: Any, base_dir: Path | str = ".", env: dict[str, str] | None = None) -> Config:
    """Validate; every problem (unset variables and invalid or unknown keys alike) is
    reported in one :class:`ConfigError`, one line each."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError("config: the top level must be a mapping of keys")
    env = dict(os.environ) if env is None else env
    missing: list[tuple[str, str]] = []
    data = interpolate(data, "", env, missing)
    problems = [f"{path}: environment variable {name} is not set{_did_you_mean(name, env)}"
                for path, name in missing]
    unset = {path for path, _ in missing}
    cfg = None
    try:
        cfg = Config.model_validate(data)
    except ValidationError as exc:
        for e in exc.errors():
            line = _format_error(e)
            if line.split(": ", 1)[0] not in unset:  # already reported as an unset variable
                problems.append(line)
    if problems or cfg is None:
        raise ConfigError("\n".join(problems))
    cfg.base_dir = Path(base_dir)
    return cfg


def load_config(path: str | Path, env: dict[str, str] | None = None) -> Config:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}:{where} is not valid YAML") from None
    return parse_config(data, base_dir=path.parent.resolve(), env=env)
