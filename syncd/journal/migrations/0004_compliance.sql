-- The compliance clock (syncd/compliance.py). honoured_at: when the last target of an
-- opt-out settled done (or, for a CRM-side flag, when Sinch confirmed it); breached_at:
-- when the clock first saw the opt-out open past its deadline. Both stay once set.
ALTER TABLE events ADD COLUMN honoured_at TEXT;
ALTER TABLE events ADD COLUMN breached_at TEXT;
-- The opt-outs still open, by arrival: status, metrics and the at-risk check read only
-- these (the predicate is repeated verbatim by the queries that use the index).
CREATE INDEX IF NOT EXISTS events_compliance_open ON events (received_at)
  WHERE honoured_at IS NULL AND kind IN ('opt_out', 'do_not_contact')
    AND (event_type = 'crm_flag' OR (event_type = 'consent' AND status IN ('new', 'routed', 'quarantined')));
CREATE INDEX IF NOT EXISTS events_compliance_breached ON events (breached_at) WHERE breached_at IS NOT NULL;
-- Opt-outs an existing journal already delivered everywhere are honoured when their
-- last target was.
UPDATE events SET honoured_at = (SELECT MAX(d.delivered_at) FROM deliveries d WHERE d.event_id = events.id)
WHERE kind IN ('opt_out', 'do_not_contact') AND event_type = 'consent' AND status = 'routed'
  AND EXISTS (SELECT 1 FROM deliveries d WHERE d.event_id = events.id)
  AND NOT EXISTS (SELECT 1 FROM deliveries d WHERE d.event_id = events.id AND d.state <> 'done');
