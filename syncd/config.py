"""Load and validate ``config.yaml``.

``${VAR}`` and ``${VAR:-default}`` are read from the environment before
validation. Every problem becomes one :class:`ConfigError` line naming the key,
so ``syncd`` can exit with a clear message instead of a traceback.
"""
from __future__ import annotations

import difflib
import functools
import logging
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Iterable, Literal

import yaml
from pydantic import (AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, ValidationError,
                      create_model, field_validator, model_validator)
from pydantic_core import ErrorDetails

from connectors.plugin import CrmPlugin
from connectors.registry import CRM_PLUGINS
from connectors.settings import SECRET, CrmSettings, OutboundUrl

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
                "sinch": "syncd-demo-sinch-secret-do-not-use",
                "api": "syncd-demo-consent-api-token-do-not-use"}   # api.token: the consent API
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


def one_of(words: Iterable[str], quote: str = "") -> str:
    """``'a', 'b' or 'c'``: a list of choices as a message says it."""
    items = [f"{quote}{w}{quote}" for w in words]
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " or " + items[-1]


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


class CrmBlocks(_Strict):
    """``crm:``: one optional block per CRM plugin (``connectors.registry``), each
    validated by that plugin's settings model."""

    def enabled(self) -> list[str]:
        return [name for name in type(self).model_fields if getattr(self, name) is not None]

    def blocks(self) -> dict[str, CrmSettings]:
        """The enabled CRMs' settings, in registry order."""
        return {name: getattr(self, name) for name in self.enabled()}


def crm_config_model(plugins: Iterable[CrmPlugin]) -> type[CrmBlocks]:
    fields: dict[str, Any] = {p.name: (p.settings | None, None) for p in plugins}
    return create_model("CrmConfig", __base__=CrmBlocks, **fields)


if TYPE_CHECKING:
    CrmConfig = CrmBlocks
else:
    CrmConfig = crm_config_model(CRM_PLUGINS.values())


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
    audit_interval_hours: float = Field(24.0, ge=0, le=8760)   # report-only drift sweep; 0 turns it off


class RetryConfig(_Strict):
    max_attempts: int = Field(15, ge=1, le=1000)
    max_age_hours: float = Field(72.0, gt=0)
    initial_backoff_seconds: float = Field(5.0, gt=0)
    max_backoff_seconds: float = Field(3600.0, gt=0)


class RoutingRule(_Strict):
    pattern: str
    crm: str
    object: str | None = None

    @field_validator("crm")
    @classmethod
    def _known(cls, v: str) -> str:
        if v not in CRM_PLUGINS:
            raise ValueError(f"Input should be {one_of(CRM_PLUGINS, quote=chr(39))}")
        return v

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
    fan_out: bool = True    # every record sharing the event's phone/email, not only the named one


class AlertsConfig(_Strict):
    webhook_url: OutboundUrl | None = None  # Slack-compatible incoming webhook; None: no alerts
    cooldown_seconds: float = Field(3600.0, ge=0, le=7 * 86400)  # one message per cause per this long



class ComplianceConfig(_Strict):
    """The compliance clock (syncd/compliance.py): a deadline per opt-out."""
    business_days: int = Field(10, ge=1, le=365)      # FCC 24-24 / CAN-SPAM: 10 business days
    holidays: str | None = "US"                       # country or country-subdivision (US-CA, DE-BY); null: none
    timezone: str = "America/New_York"                # where business days are counted
    warn_business_days: int = Field(2, ge=0, le=365)  # at risk with this many business days left

    @field_validator("holidays")
    @classmethod
    def _holidays(cls, v: str | None) -> str | None:
        from syncd.calendars import holiday_calendar   # imports the holidays package: only when set

        holiday_calendar(v)   # ValueError names what is unknown
        return v.strip().upper() if v else None

    @field_validator("timezone")
    @classmethod
    def _timezone(cls, v: str) -> str:
        from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

        try:
            ZoneInfo(v)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"unknown time zone {v!r} (an IANA name such as America/New_York)") from None
        return v

    @model_validator(mode="after")
    def _warn(self) -> "ComplianceConfig":
        if self.warn_business_days > self.business_days:
            raise ValueError(f"warn_business_days ({self.warn_business_days}) must not exceed "
                             f"business_days ({self.business_days})")
        return self


class ApiConfig(_Strict):
    """The consent API on the receiver's public port."""
    token: OptionalOwnSecret = None   # bearer token; empty: the API is off (404)


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
    crm: CrmConfig = Field(default_factory=CrmConfig)
    sinch: SinchConfig | None = None
    schedule: ScheduleConfig = ScheduleConfig()
    retry: RetryConfig = RetryConfig()
    routing: RoutingConfig = RoutingConfig()
    api: ApiConfig = Field(default_factory=ApiConfig)
    logging: LoggingConfig = LoggingConfig()
    alerts: AlertsConfig = AlertsConfig()
    compliance: ComplianceConfig = ComplianceConfig()

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

        def walk(obj: Any, key: str = "", marked: bool = False) -> None:
            if isinstance(obj, BaseModel):
                for name, info in type(obj).model_fields.items():
                    walk(getattr(obj, name), name, SECRET in info.metadata)
            elif isinstance(obj, str) and (marked or any(w in key for w in ("secret", "token", "password",
                                                                              "api_key"))):
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

    model: type[BaseModel] = Config
    for part in loc[:-1]:
        if isinstance(part, int) or str(part).startswith("function-"):
            continue
        field = model.model_fields.get(str(part))
        if field is None:
            return None
        candidates = [field.annotation, *typing.get_args(field.annotation)]
        candidates += [a for c in candidates for a in typing.get_args(c)]
        inner = next((c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)), None)
        if inner is None:
            return None
        model = inner
    return model


def _format_error(err: ErrorDetails) -> str:
    loc = ".".join(str(p) for p in err["loc"] if not str(p).startswith("function-"))
    msg = err["msg"]
    if err["type"] == "extra_forbidden":
        model = _model_at(tuple(err["loc"]))
        msg = "unknown key" + (_did_you_mean(str(err["loc"][-1]), model.model_fields) if model else "")
    elif err["type"] == "missing":
        msg = "required key is missing"
    msg = msg.removeprefix("Value error, ")
    return f"{loc}: {msg}" if loc else msg


@functools.lru_cache(maxsize=8)
def _config_model(plugins: tuple[CrmPlugin, ...]) -> type[Config]:
    """``Config``, or, for a plugin registered after start-up, a subclass whose
    ``crm:`` block has that plugin's key too."""
    if tuple(p.name for p in plugins) == tuple(CrmConfig.model_fields):
        return Config
    crm = crm_config_model(plugins)
    return create_model("Config", __base__=Config, crm=(crm, Field(default_factory=crm)))


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
        cfg = _config_model(tuple(CRM_PLUGINS.values())).model_validate(data)
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
