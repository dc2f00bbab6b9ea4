"""Assembles the daemon's parts from a validated config, once at start-up."""
from __future__ import annotations

from dataclasses import dataclass, field

from connectors.base import CrmConnector
from syncd.config import Config
from syncd.journal import Journal, open_journal
from syncd.mapping import Mapping, load_mapping
from syncd.masking import register_secrets
from syncd.backoff import RetryPolicy
from syncd.metrics import Metrics
from syncd.pauses import CrmPauses, QuotaPolicy
from syncd.pusher import Pusher, TickStats
from syncd.reflector import Reflector, SinchNotifications
from syncd.router import EventRouter
from syncd.routing import Router
from syncd.sources import Source, build_sources


def load_mappings(cfg: Config) -> dict[str, Mapping]:
    return {name: load_mapping(cfg.resolve(getattr(cfg.crm, name).mapping)) for name in cfg.crm.enabled()}


def build_connectors(cfg: Config, mappings: dict[str, Mapping]) -> dict[str, CrmConnector]:
    """One connector per enabled CRM. Constructors do no network I/O."""
    found: dict[str, CrmConnector] = {}
    ca, timeout = cfg.http.ca_bundle, cfg.http.timeout_seconds
    if cfg.crm.salesforce:
        from connectors.salesforce import SalesforceConnector

        sf = cfg.crm.salesforce
        auth = sf.auth.model_dump()
        if sf.auth.private_key_file:
            auth["private_key_file"] = str(cfg.resolve(sf.auth.private_key_file))
        found["salesforce"] = SalesforceConnector(instance_url=sf.instance_url, api_version=sf.api_version,
                                                  auth=auth, ca_bundle=ca, timeout=timeout,
                                                  default_region=cfg.phone.default_region)
    if cfg.crm.hubspot:
        from connectors.hubspot import HubSpotConnector

        hs = cfg.crm.hubspot
        unsub = mappings["hubspot"].email_unsubscribe if "hubspot" in mappings else None
        kwargs = {}
        if unsub is not None:
            kwargs = {"email_subscription_id": unsub.subscription_id, "legal_basis": unsub.legal_basis,
                      "legal_basis_explanation": unsub.legal_basis_explanation}
        # HubSpot's search index trails writes by seconds: poll a little behind.
        found["hubspot"] = HubSpotConnector(base_url=hs.base_url, access_token=hs.access_token,
                                            ca_bundle=ca, timeout=timeout, poll_lag_seconds=30.0, **kwargs)
    if cfg.crm.close:
        from connectors.close import CloseConnector

        cl = cfg.crm.close
        found["close"] = CloseConnector(base_url=cl.base_url, api_key=cl.api_key, ca_bundle=ca, timeout=timeout)
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
    metrics: Metrics = field(default_factory=Metrics)
    reflector: Reflector | None = None

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
    quotas = {}
    if cfg.crm.salesforce:
        quotas["salesforce"] = QuotaPolicy(budget_percent=cfg.crm.salesforce.api_budget_percent,
                                           probe_seconds=cfg.crm.salesforce.limits_probe_seconds)
    policy = RetryPolicy(cfg.retry)
    pauses = CrmPauses(journal.ops, connectors, quotas)
    batch, lease = cfg.schedule.batch_size, cfg.schedule.lease_seconds
    pusher = Pusher(journal.deliveries, journal.ops, connectors, mappings, pauses, policy, batch_size=batch,
                    lease_seconds=lease, metrics=metrics)
    notifications = SinchNotifications(journal.reflections, journal.events, policy)
    routing = EventRouter(journal.events, journal.deliveries, journal.ops, router, connectors, pauses, policy,
                          notifications.reconcile, batch_size=batch, lease_seconds=lease, metrics=metrics)
    reflector = None
    sinch = build_sinch(cfg)
    if sinch is not None:
        reflector = Reflector(journal.reflections, journal.ops, connectors, mappings, sinch, cfg, metrics=metrics)
    return Runtime(cfg=cfg, journal=journal, sources=build_sources(cfg), router=router, mappings=mappings,
                   connectors=connectors, routing=routing, pusher=pusher, pauses=pauses, metrics=metrics,
                   reflector=reflector)
