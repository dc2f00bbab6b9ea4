"""Assembles the daemon's parts from a validated config, once at start-up."""
from __future__ import annotations

from dataclasses import dataclass, field

from connectors.base import CrmConnector
from connectors.plugin import BuildContext
from connectors.registry import CRM_PLUGINS
from syncd.alerts import Alerts
from syncd.backoff import RetryPolicy
from syncd.compliance import ComplianceCheck, ComplianceClock
from syncd.config import Config, ConfigError
from syncd.crm_health import CrmHealthBook
from syncd.journal import Journal, open_journal
from syncd.mapping import Mapping, load_mapping
from syncd.masking import register_secrets
from syncd.metrics import Metrics
from syncd.pauses import CrmPauses, QuotaPolicy
from syncd.pusher import Pusher, TickStats
from syncd.reflector import Reflector, SinchNotifications
from syncd.router import EventRouter
from syncd.routing import Router
from syncd.sources import Source, build_sources


def load_mappings(cfg: Config) -> dict[str, Mapping]:
    found: dict[str, Mapping] = {}
    for name, block in cfg.crm.blocks().items():
        path = cfg.resolve(block.mapping)
        if not path.is_file():  # name the config key that points at it
            raise ConfigError(f"crm.{name}.mapping: mapping file not found: {path}")
        found[name] = load_mapping(path)
    return found


def build_context(cfg: Config, mapping: Mapping | None) -> BuildContext:
    """What every CRM plugin's builder gets besides its own ``crm.<name>`` block."""
    unsub = mapping.email_unsubscribe if mapping is not None else None
    return BuildContext(ca_bundle=cfg.http.ca_bundle, timeout=cfg.http.timeout_seconds,
                        default_region=cfg.phone.default_region, resolve=lambda path: str(cfg.resolve(path)),
                        email_unsubscribe=unsub.model_dump() if unsub is not None else None)


def build_connectors(cfg: Config, mappings: dict[str, Mapping]) -> dict[str, CrmConnector]:
    """One connector per enabled CRM. Constructors do no network I/O."""
    return {name: CRM_PLUGINS[name].build(block, build_context(cfg, mappings.get(name)))
            for name, block in cfg.crm.blocks().items()}


def quota_policies(cfg: Config) -> dict[str, QuotaPolicy]:
    """API budgets of the enabled CRMs whose plugin has a daily quota."""
    found = {}
    for name, block in cfg.crm.blocks().items():
        quota = CRM_PLUGINS[name].quota
        if quota is not None:
            limits = quota(block)
            found[name] = QuotaPolicy(budget_percent=limits.budget_percent, probe_seconds=limits.probe_seconds)
    return found


def build_sinch(cfg: Config):
    if cfg.sinch is None:
        return None
    from connectors.sinch import SinchConnector

    s = cfg.sinch
    return SinchConnector(base_url=s.base_url, auth_url=s.auth_url, project_id=s.project_id, app_id=s.app_id,
                          key_id=s.key_id, key_secret=s.key_secret, channels=tuple(s.channels),
                          ca_bundle=cfg.http.ca_bundle, timeout=cfg.http.timeout_seconds)


@dataclass
class Runtime:
    cfg: Config
    journal: Journal
    sources: dict[str, Source]
    router: Router
    mappings: dict[str, Mapping]
    connectors: dict[str, CrmConnector]
    routing: EventRouter
    pusher: Pusher
    pauses: CrmPauses
    health: CrmHealthBook       # each CRM's calls, for the status page
    metrics: Metrics = field(default_factory=Metrics)
    reflector: Reflector | None = None
    alerts: Alerts | None = None  # alerts.webhook_url; the compliance check calls alerts.opt_out_at_risk
    compliance: ComplianceCheck | None = None  # the deadline clock's scheduled check

    def tick(self) -> TickStats:
        """The scheduled work, in order: route new events, then push due deliveries."""
        routed = self.routing.tick()
        stats = self.pusher.run_once()
        stats.routed, stats.quarantined = routed.routed, routed.quarantined
        return stats

    def stop_ticking(self) -> None:
        """SIGTERM: each step finishes the batch in hand and takes no more."""
        self.routing.stopping.set()
        self.pusher.stopping.set()


def open_runtime(cfg: Config) -> Runtime:
    register_secrets(cfg.secrets())
    mappings = load_mappings(cfg)
    connectors = build_connectors(cfg, mappings)
    journal = open_journal(cfg.journal.url, base_dir=str(cfg.base_dir),
                           max_stored_body_bytes=cfg.receiver.max_stored_body_bytes)
    router = Router.from_config(cfg)
    metrics = Metrics()
    policy = RetryPolicy(cfg.retry)
    pauses = CrmPauses(journal.ops, connectors, quota_policies(cfg))
    alerts = None
    if cfg.alerts.webhook_url:
        alerts = Alerts(cfg.alerts.webhook_url, cooldown_seconds=cfg.alerts.cooldown_seconds,
                        timeout=min(cfg.http.timeout_seconds, 10.0), ca_bundle=cfg.http.ca_bundle)
    health = CrmHealthBook(journal.ops, connectors, alerts)
    batch, lease = cfg.schedule.batch_size, cfg.schedule.lease_seconds
    pusher = Pusher(journal.deliveries, journal.ops, connectors, mappings, pauses, policy, batch_size=batch,
                    lease_seconds=lease, metrics=metrics, health=health, alerts=alerts)
    notifications = SinchNotifications(journal.reflections, journal.events, policy)
    routing = EventRouter(journal.events, journal.deliveries, journal.ops, router, connectors, pauses, policy,
                          notifications.reconcile, batch_size=batch, lease_seconds=lease, metrics=metrics,
                          health=health, fan_out=cfg.routing.fan_out,
                          successor_objects={crm: CRM_PLUGINS[crm].successor_objects
                                             for crm in connectors if crm in CRM_PLUGINS})
    reflector = None
    sinch = build_sinch(cfg)
    if connectors:   # the poll runs for every enabled CRM; Sinch registrations only when configured
        reflector = Reflector(journal.reflections, journal.ops, connectors, mappings, sinch, cfg, metrics=metrics,
                              events=journal.events, ledger=journal.ledger, deliveries=journal.deliveries)
    return Runtime(cfg=cfg, journal=journal, sources=build_sources(cfg), router=router, mappings=mappings,
                   connectors=connectors, routing=routing, pusher=pusher, pauses=pauses, health=health,
                   metrics=metrics, reflector=reflector, alerts=alerts,
                   compliance=build_compliance(cfg, journal, alerts))


def build_compliance(cfg: Config, journal: Journal, alerts: Alerts | None) -> ComplianceCheck:
    return ComplianceCheck(ComplianceClock.from_config(cfg), journal.compliance, ops=journal.ops, alerts=alerts,
                           sinch_channels=cfg.sinch.channels if cfg.sinch is not None else None)
