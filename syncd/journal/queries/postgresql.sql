-- PostgreSQL's own statements (see common.sql): replicas share the journal, so claims
-- skip rows another replica is claiming, and leases of a replica that died are freed.

-- name: lease_events_to_route
UPDATE events SET next_route_at = %(until)s, route_owner = %(owner)s
WHERE id IN (SELECT id FROM events WHERE status = 'new' AND next_route_at <= %(now)s ORDER BY id
             LIMIT %(limit)s FOR UPDATE SKIP LOCKED)
RETURNING id;

-- name: claim_lock
-- Serializes claims per schema (released at commit); see PostgresEngine.lock_claims.
SELECT pg_advisory_xact_lock(%(lock_class)s::int4, hashtext(%(schema)s));

-- name: claim_deliveries
WITH due AS (
  SELECT d.id FROM deliveries d
  WHERE d.state = 'pending' AND d.next_attempt_at <= %(now)s AND d.lease_until < %(now)s
    AND (%(crm)s::text IS NULL OR d.crm = %(crm)s::text)
    AND NOT EXISTS (SELECT 1 FROM deliveries o WHERE o.crm = d.crm AND o.obj = d.obj
                    AND o.record_id = d.record_id AND o.state = 'pending'
                    AND o.lease_until >= %(now)s)
  ORDER BY d.next_attempt_at, d.id
  LIMIT %(limit)s
  FOR UPDATE OF d SKIP LOCKED)
UPDATE deliveries SET lease_until = %(until)s, lease_owner = %(owner)s, attempts = attempts + 1
FROM due WHERE deliveries.id = due.id
RETURNING deliveries.id;

-- name: claim_reflections
WITH due AS (
  SELECT id FROM reflections
  WHERE state = 'pending' AND next_attempt_at <= %(now)s AND lease_until < %(now)s
  ORDER BY next_attempt_at, id
  LIMIT %(limit)s
  FOR UPDATE SKIP LOCKED)
UPDATE reflections SET lease_until = %(until)s, lease_owner = %(owner)s, attempts = attempts + 1
FROM due WHERE reflections.id = due.id
RETURNING reflections.id;

-- name: live_lease_owners
SELECT lease_owner AS owner FROM deliveries WHERE state = 'pending' AND lease_until >= %(now)s
UNION SELECT route_owner FROM events WHERE status = 'new' AND next_route_at >= %(now)s
UNION SELECT lease_owner FROM reflections WHERE state = 'pending' AND lease_until >= %(now)s;

-- name: try_xact_lock
-- Held until the transaction ends.
SELECT pg_try_advisory_xact_lock(hashtext(%(key)s)) AS got;

-- name: take_over_deliveries
UPDATE deliveries SET lease_until = 0, lease_owner = NULL WHERE lease_owner = %(owner)s AND state = 'pending';

-- name: take_over_events
UPDATE events SET next_route_at = 0, route_owner = NULL WHERE route_owner = %(owner)s AND status = 'new';

-- name: take_over_reflections
UPDATE reflections SET lease_until = 0, lease_owner = NULL WHERE lease_owner = %(owner)s AND state = 'pending';

-- name: ledger_states_packed
-- The entries of many identities as one row (a JSON array of objects), as on SQLite.
SELECT COALESCE(json_agg(json_build_object('identity', identity, 'channel', channel, 'state', state,
                                           'since', since, 'source', source, 'event_id', event_id)),
                '[]'::json)::text
       AS packed
FROM consent_ledger WHERE identity IN (%(identities)s);
