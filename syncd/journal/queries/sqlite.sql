-- SQLite's own statements (see common.sql). One process writes a SQLite journal,
-- through one connection, so a claim needs no row locks.

-- name: lease_events_to_route
UPDATE events SET next_route_at = %(until)s, route_owner = %(owner)s
WHERE id IN (SELECT id FROM events WHERE status = 'new' AND next_route_at <= %(now)s ORDER BY id LIMIT %(limit)s)
RETURNING id;

-- name: claim_deliveries
-- Never two live leases on one record.
UPDATE deliveries SET lease_until = %(until)s, lease_owner = %(owner)s, attempts = attempts + 1
WHERE id IN (
  SELECT d.id FROM deliveries d
  WHERE d.state = 'pending' AND d.next_attempt_at <= %(now)s AND d.lease_until < %(now)s
    AND (%(crm)s IS NULL OR d.crm = %(crm)s)
    AND NOT EXISTS (SELECT 1 FROM deliveries o WHERE o.crm = d.crm AND o.obj = d.obj
                    AND o.record_id = d.record_id AND o.state = 'pending' AND o.lease_until >= %(now)s)
  ORDER BY d.next_attempt_at, d.id LIMIT %(limit)s)
RETURNING id;

-- name: claim_reflections
UPDATE reflections SET lease_until = %(until)s, lease_owner = %(owner)s, attempts = attempts + 1
WHERE id IN (SELECT id FROM reflections WHERE state = 'pending' AND next_attempt_at <= %(now)s
             AND lease_until < %(now)s ORDER BY next_attempt_at, id LIMIT %(limit)s)
RETURNING id;

-- name: free_delivery_leases
-- Holding the serve lock proves every live lease belongs to a process that died.
UPDATE deliveries SET lease_until = 0, lease_owner = NULL WHERE state = 'pending' AND lease_until > 0;

-- name: free_reflection_leases
UPDATE reflections SET lease_until = 0 WHERE state = 'pending' AND lease_until > 0;

-- name: free_routing_leases
UPDATE events SET next_route_at = 0 WHERE status = 'new' AND next_route_at > 0;

-- name: ledger_states_packed
-- The entries of many identities as one row (a JSON array of objects): one step of the
-- statement however many keys it answers (the consent API's grouped lookups).
SELECT json_group_array(json_object('identity', identity, 'channel', channel, 'state', state, 'since', since,
                                     'source', source, 'event_id', event_id)) AS packed
FROM consent_ledger WHERE identity IN (%(identities)s);
