-- The journal's statements, one named block each (loaded once by syncd/journal/engine.py).
-- Parameters are %(name)s; a list parameter expands to a comma list. Statements that
-- differ between SQLite and PostgreSQL are in sqlite.sql and postgresql.sql.

-- ===== events ========================================================================

-- name: insert_events
-- Rows in key order (the caller sorts them), so replicas take the unique index's locks
-- in one order; duplicates keep the existing row.
INSERT INTO events (source, source_event_id, event_type, kind, channel, external_lead_id, phone, phone_raw,
                    email, reason, occurred_at, received_at, details, raw, status, status_reason, updated_at)
VALUES %(rows)s
ON CONFLICT (source, source_event_id) DO NOTHING
RETURNING id, source, source_event_id;

-- name: event_id_by_key
SELECT id FROM events WHERE source = %(source)s AND source_event_id = %(source_event_id)s;

-- name: events_by_ids
SELECT id, source, source_event_id, event_type, kind, channel, external_lead_id, phone, phone_raw, email,
       reason, occurred_at, received_at, status, status_reason, route_attempts, details
FROM events WHERE id IN (%(ids)s) ORDER BY id;

-- name: event_by_id
SELECT id, source, source_event_id, event_type, kind, channel, external_lead_id, phone, phone_raw, email,
       reason, occurred_at, received_at, status, status_reason, route_attempts, details
FROM events WHERE id = %(id)s;

-- name: settle_new_event
-- quarantined, ignored, reconciled: only an event still waiting for routing.
UPDATE events SET status = %(status)s, status_reason = %(reason)s, updated_at = %(now)s
WHERE id = %(id)s AND status = 'new';

-- name: defer_event
UPDATE events SET route_attempts = route_attempts + 1, next_route_at = %(retry_at)s, route_owner = NULL,
                  status_reason = %(error)s, updated_at = %(now)s
WHERE id = %(id)s AND status = 'new';

-- name: mark_event_routed
-- reason: NULL, or why the event was routed short of a lookup (it gave up).
UPDATE events SET status = 'routed', status_reason = %(reason)s, updated_at = %(now)s
WHERE id = %(id)s AND status IN ('new', 'quarantined');

-- name: honour_routed_event
-- An opt-out whose targets were all done while a lookup was still owed (fan-out routes
-- the named record first) is honoured when routing ends, not at a later settle.
UPDATE events SET honoured_at = %(now_iso)s
WHERE id = %(id)s AND honoured_at IS NULL AND kind IN ('opt_out', 'do_not_contact')
  AND event_type = 'consent' AND status = 'routed'
  AND EXISTS (SELECT 1 FROM deliveries d WHERE d.event_id = events.id)
  AND NOT EXISTS (SELECT 1 FROM deliveries d WHERE d.event_id = events.id AND d.state <> 'done');

-- name: learn_event_email
-- The address an email opt-out named no address for, read from the record it named.
UPDATE events SET email = %(email)s, updated_at = %(now)s
WHERE id = %(id)s AND (email IS NULL OR TRIM(email) = '');

-- name: mark_quarantined_event_routed
-- A target found outside routing (the reflector's poll) ends a quarantine; an event
-- still 'new' keeps waiting for its own routing.
UPDATE events SET status = 'routed', status_reason = NULL, updated_at = %(now)s
WHERE id = %(id)s AND status = 'quarantined';

-- name: replay_quarantined_events
UPDATE events SET status = 'new', route_attempts = 0, next_route_at = 0, updated_at = %(now)s
WHERE status = 'quarantined';

-- name: replay_quarantined_event
UPDATE events SET status = 'new', route_attempts = 0, next_route_at = 0, updated_at = %(now)s
WHERE id = %(id)s AND status = 'quarantined';

-- ===== deliveries ====================================================================

-- name: insert_delivery
INSERT INTO deliveries (event_id, crm, obj, record_id, state, attempts, next_attempt_at, lease_until, created_at)
VALUES (%(event_id)s, %(crm)s, %(obj)s, %(record_id)s, 'pending', 0, %(now)s, 0, %(now_iso)s)
ON CONFLICT (event_id, crm, obj, record_id) DO NOTHING;

-- name: deliveries_by_ids
SELECT d.id, d.event_id, d.crm, d.obj, d.record_id, d.attempts, d.created_at,
       e.kind, e.channel, e.occurred_at, e.source, e.email, e.reason, e.received_at
FROM deliveries d JOIN events e ON e.id = d.event_id
WHERE d.id IN (%(ids)s) ORDER BY d.id;

-- name: settle_delivery_done
UPDATE deliveries SET state = 'done', delivered_at = %(now_iso)s, outcome = %(note)s, last_error = NULL,
                      lease_until = 0, lease_owner = NULL
WHERE id = %(id)s AND state = 'pending';

-- name: settle_delivery_retry
-- refund: 1 gives the claim's attempt back (a paused CRM is not the delivery's fault).
UPDATE deliveries SET next_attempt_at = %(retry_at)s, last_error = %(error)s, lease_until = 0, lease_owner = NULL,
                      attempts = attempts - %(refund)s
WHERE id = %(id)s AND state = 'pending';

-- name: settle_delivery_dead
UPDATE deliveries SET state = 'dead', last_error = %(error)s, outcome = %(note)s, lease_until = 0,
                      lease_owner = NULL
WHERE id = %(id)s AND state = 'pending';

-- name: advance_clock
INSERT INTO field_clocks (crm, obj, record_id, field, occurred_at, value, event_id)
VALUES (%(crm)s, %(obj)s, %(record_id)s, %(field)s, %(occurred_at)s, %(value)s, %(event_id)s)
ON CONFLICT (crm, obj, record_id, field) DO UPDATE SET
  occurred_at = excluded.occurred_at, value = excluded.value, event_id = excluded.event_id
WHERE field_clocks.occurred_at <= excluded.occurred_at;

-- name: clocks_of_records
-- A join, not a row-value IN: SQLite uses the primary key only for the join.
WITH wanted (crm, obj, record_id) AS (VALUES %(refs)s)
SELECT f.crm, f.obj, f.record_id, f.field, f.occurred_at, f.value
FROM wanted w JOIN field_clocks f ON f.crm = w.crm AND f.obj = w.obj AND f.record_id = w.record_id;

-- name: note_push
INSERT INTO crm_status (crm, last_push_at) VALUES (%(crm)s, %(now_iso)s)
ON CONFLICT (crm) DO UPDATE SET last_push_at = excluded.last_push_at;

-- name: release_leases
UPDATE deliveries SET lease_until = 0, lease_owner = NULL, attempts = attempts - 1
WHERE lease_owner = %(owner)s AND state = 'pending' AND attempts > 0;

-- name: replay_dead_deliveries
UPDATE deliveries SET state = 'pending', attempts = 0, next_attempt_at = %(now)s, lease_until = 0, outcome = NULL
WHERE state = 'dead';

-- name: replay_dead_delivery
UPDATE deliveries SET state = 'pending', attempts = 0, next_attempt_at = %(now)s, lease_until = 0, outcome = NULL
WHERE id = %(id)s AND state = 'dead';

-- name: requeue_delivery_for_audit
-- syncd audit --repair: a target found drifted in its CRM is pushed again (a done or dead
-- delivery back to pending; the field clocks keep the push idempotent).
UPDATE deliveries SET state = 'pending', attempts = 0, next_attempt_at = %(now)s, lease_until = 0,
                      lease_owner = NULL, last_error = NULL, outcome = NULL
WHERE event_id = %(event_id)s AND crm = %(crm)s AND obj = %(obj)s AND record_id = %(record_id)s
  AND state IN ('done', 'dead');

-- ===== reflections (CRM flags registered in Sinch) =====================================

-- name: sinch_kind
SELECT kind FROM sinch_state WHERE phone = %(phone)s AND channel = %(channel)s;

-- name: set_sinch_state
INSERT INTO sinch_state (phone, channel, kind, reflection_id, updated_at)
VALUES (%(phone)s, %(channel)s, %(kind)s, %(reflection_id)s, %(now_iso)s)
ON CONFLICT (phone, channel) DO UPDATE SET kind = excluded.kind, reflection_id = excluded.reflection_id,
                                           updated_at = excluded.updated_at;

-- name: forget_sinch_state
DELETE FROM sinch_state WHERE reflection_id = %(id)s;

-- name: insert_reflection
INSERT INTO reflections (crm, obj, record_id, phone, channel, kind, request_id, state, attempts, next_attempt_at,
                         lease_until, flagged_at, created_at)
VALUES (%(crm)s, %(obj)s, %(record_id)s, %(phone)s, %(channel)s, %(kind)s, %(request_id)s, 'pending', 0, %(now)s,
        0, %(flagged_at)s, %(now_iso)s)
RETURNING id;

-- name: note_poll
INSERT INTO crm_status (crm, last_poll_at) VALUES (%(crm)s, %(now_iso)s)
ON CONFLICT (crm) DO UPDATE SET last_poll_at = excluded.last_poll_at;

-- name: reflections_by_ids
SELECT id, crm, obj, record_id, phone, channel, kind, request_id, attempts, created_at
FROM reflections WHERE id IN (%(ids)s) ORDER BY id;

-- name: reflection_registered
-- Waiting for Sinch's OPT_OUT/OPT_IN notification until the deadline.
UPDATE reflections SET state = 'registered', registered_at = %(now_iso)s, next_attempt_at = %(deadline)s,
                       last_error = NULL, lease_until = 0
WHERE id = %(id)s AND state = 'pending';

-- name: reflection_retry
UPDATE reflections SET next_attempt_at = %(retry_at)s, last_error = %(error)s, lease_until = 0
WHERE id = %(id)s AND state = 'pending';

-- name: reflection_dead
UPDATE reflections SET state = 'dead', last_error = %(error)s, lease_until = 0 WHERE id = %(id)s;

-- name: registrations_past_deadline
SELECT id, attempts FROM reflections WHERE state = 'registered' AND next_attempt_at <= %(now)s;

-- name: reflection_pending_again
UPDATE reflections SET state = 'pending', next_attempt_at = %(now)s, last_error = %(error)s WHERE id = %(id)s;

-- name: reflection_by_request_id
SELECT id, attempts FROM reflections WHERE request_id = %(request_id)s;

-- name: open_reflection_by_phone
SELECT id, attempts FROM reflections
WHERE phone = %(phone)s AND channel = %(channel)s AND kind = %(kind)s AND state IN ('registered', 'pending')
ORDER BY id DESC LIMIT 1;

-- name: reflection_confirmed
UPDATE reflections SET state = 'done', done_at = %(now_iso)s, last_error = NULL, lease_until = 0
WHERE id = %(id)s AND state IN ('registered', 'pending');

-- name: reflection_refused
UPDATE reflections SET state = 'pending', next_attempt_at = %(retry_at)s, last_error = %(error)s, lease_until = 0
WHERE id = %(id)s AND state IN ('registered', 'pending');

-- name: dead_reflection_ids
SELECT id FROM reflections WHERE state = 'dead';

-- name: revive_reflection
UPDATE reflections SET state = 'pending', attempts = 0, next_attempt_at = %(now)s, lease_until = 0
WHERE id = %(id)s AND state = 'dead'
RETURNING phone, channel, kind;

-- ===== operations: CRM pauses, watermarks, health ====================================

-- name: crm_pause
SELECT paused_until, pause_reason FROM crm_status WHERE crm = %(crm)s;

-- name: pause_crm
INSERT INTO crm_status (crm, paused_until, pause_reason) VALUES (%(crm)s, %(until)s, %(reason)s)
ON CONFLICT (crm) DO UPDATE SET paused_until = excluded.paused_until, pause_reason = excluded.pause_reason;

-- name: take_pause_probe
UPDATE crm_status SET paused_until = %(next_until)s
WHERE crm = %(crm)s AND paused_until IS NOT NULL AND paused_until <= %(now)s;

-- name: resume_crm
UPDATE crm_status SET paused_until = NULL, pause_reason = NULL WHERE crm = %(crm)s;

-- name: get_watermark
SELECT ts, last_id FROM watermarks WHERE name = %(name)s;

-- name: set_watermark
INSERT INTO watermarks (name, ts, last_id, updated_at) VALUES (%(name)s, %(ts)s, %(last_id)s, %(now_iso)s)
ON CONFLICT (name) DO UPDATE SET ts = excluded.ts, last_id = excluded.last_id, updated_at = excluded.updated_at;

-- name: healthcheck
INSERT INTO watermarks (name, ts, updated_at) VALUES ('health', NULL, %(now_iso)s)
ON CONFLICT (name) DO UPDATE SET updated_at = excluded.updated_at;

-- ===== reports =======================================================================

-- name: deliveries_by_state
SELECT state, COUNT(*) AS n FROM deliveries GROUP BY state;

-- name: deliveries_retrying
SELECT COUNT(*) AS n FROM deliveries WHERE state = 'pending' AND attempts > 0 AND next_attempt_at > %(now)s;

-- name: consent_events_by_status
SELECT status, COUNT(*) AS n FROM events WHERE event_type = 'consent' GROUP BY status;

-- name: oldest_pending_delivery
SELECT MIN(created_at) AS at FROM deliveries WHERE state = 'pending';

-- name: oldest_unrouted_event
SELECT MIN(received_at) AS at FROM events WHERE status = 'new' AND event_type = 'consent';

-- name: crm_statuses
SELECT crm, last_push_at, last_poll_at, paused_until, pause_reason FROM crm_status ORDER BY crm;

-- name: reflections_by_state
SELECT state, COUNT(*) AS n FROM reflections GROUP BY state;

-- name: dead_deliveries
SELECT d.id, d.event_id, e.source, e.source_event_id, d.crm, d.obj, d.record_id, d.attempts, d.last_error,
       e.received_at, e.kind, e.channel
FROM deliveries d JOIN events e ON e.id = d.event_id WHERE d.state = 'dead' ORDER BY d.id;

-- name: quarantined_events
SELECT id, source, source_event_id, status_reason, received_at, kind, channel
FROM events WHERE status = 'quarantined' ORDER BY id;

-- name: dead_reflections
SELECT id, crm, obj, record_id, attempts, last_error, created_at, kind, channel
FROM reflections WHERE state = 'dead' ORDER BY id;

-- name: recent_activity
-- The newest consent events with their targets' delivery state (status page).
SELECT e.id AS event_id, e.source, e.received_at, e.occurred_at, e.kind, e.channel, e.status AS event_status,
       e.status_reason AS event_reason, d.id AS delivery_id, d.crm, d.obj, d.record_id, d.state, d.attempts,
       d.last_error, d.delivered_at
FROM (SELECT * FROM events WHERE event_type = 'consent' ORDER BY id DESC LIMIT %(limit)s) e
LEFT JOIN deliveries d ON d.event_id = e.id
ORDER BY e.id DESC, d.id;

-- name: events_per_hour
-- The status page's chart: events received per hour (YYYY-MM-DDTHH) since a time.
SELECT substr(received_at, 1, 13) AS hour, COUNT(*) AS n
FROM events WHERE received_at >= %(since)s
GROUP BY substr(received_at, 1, 13);

-- name: deliveries_done_since
-- The newest deliveries done since a time, with when their event arrived (time to honour).
SELECT d.crm, e.received_at, d.delivered_at
FROM deliveries d JOIN events e ON e.id = d.event_id
WHERE d.state = 'done' AND d.delivered_at >= %(since)s
ORDER BY d.id DESC LIMIT %(limit)s;

-- name: next_retry_per_crm
SELECT crm, MIN(next_attempt_at) AS next_attempt_at
FROM deliveries WHERE state = 'pending' AND attempts > 0
GROUP BY crm;

-- name: export_rows
-- With the newest registration in Sinch for the target record, if any: the proof that a
-- CRM-side flag also reached the messaging platform.
SELECT e.id AS event_id, e.source, e.source_event_id, e.received_at, e.occurred_at, e.kind, e.channel,
       e.status AS event_status, e.status_reason AS event_reason, d.crm, d.obj, d.record_id, d.state,
       d.delivered_at, d.attempts, d.last_error, d.outcome, r.state AS reflection_state,
       COALESCE(r.done_at, r.registered_at, r.created_at) AS reflection_at, r.last_error AS reflection_error,
       e.details, e.phone, e.email,
       e.honoured_at
FROM events e
LEFT JOIN deliveries d ON d.event_id = e.id
LEFT JOIN reflections r ON r.id = (SELECT MAX(x.id) FROM reflections x
                                   WHERE x.crm = d.crm AND x.obj = d.obj AND x.record_id = d.record_id)
WHERE e.event_type = 'consent' AND e.received_at >= %(since)s
ORDER BY e.id, d.id;

-- ===== trace (syncd trace, the status page's search) ==================================
-- One person's story: events by phone, email, record id or event id, their targets, and
-- the registrations in Sinch. No index covers phone, email or record_id alone: these
-- scan, which suits an operator's lookup (see README, "syncd trace").

-- name: trace_events_by_phone
SELECT id, source, event_type, kind, channel, external_lead_id, phone, email, occurred_at, received_at,
       status, status_reason, details
FROM events WHERE phone = %(phone)s;

-- name: trace_events_by_email
-- Stored as the source sent it; the ledger's identity is lower-cased and trimmed.
SELECT id, source, event_type, kind, channel, external_lead_id, phone, email, occurred_at, received_at,
       status, status_reason, details
FROM events WHERE LOWER(TRIM(email)) = %(email)s;

-- name: trace_events_by_record
-- The record the source named, or any record the event was delivered to (fan-out).
SELECT id, source, event_type, kind, channel, external_lead_id, phone, email, occurred_at, received_at,
       status, status_reason, details
FROM events
WHERE external_lead_id IN (%(ids)s) OR id IN (SELECT event_id FROM deliveries WHERE record_id IN (%(ids)s));

-- name: trace_crm_flags_by_record
-- A do-not-contact flag a CRM user set on the record (the reflector keeps the record in
-- details); the caller checks the parsed details, as LIKE's _ matches any character.
SELECT id, source, event_type, kind, channel, external_lead_id, phone, email, occurred_at, received_at,
       status, status_reason, details
FROM events WHERE event_type = 'crm_flag' AND details LIKE %(pattern)s;

-- name: trace_event_by_id
SELECT id, source, event_type, kind, channel, external_lead_id, phone, email, occurred_at, received_at,
       status, status_reason, details
FROM events WHERE id = %(id)s;

-- name: trace_targets
SELECT event_id, crm, obj, record_id, state, attempts, delivered_at, last_error
FROM deliveries WHERE event_id IN (%(event_ids)s) ORDER BY event_id, id;

-- name: trace_reflections_by_phone
SELECT id, crm, obj, record_id, phone, channel, kind, request_id, state, attempts, last_error, created_at,
       registered_at, done_at
FROM reflections WHERE phone IN (%(phones)s);

-- name: trace_reflections_by_record
SELECT id, crm, obj, record_id, phone, channel, kind, request_id, state, attempts, last_error, created_at,
       registered_at, done_at
FROM reflections WHERE record_id IN (%(ids)s);

-- name: trace_sinch_notifications
-- Sinch's notifications for these phones; joined to registrations by request_id (or the
-- registration the reflector matched them to, named in status_reason).
SELECT id, kind, occurred_at, received_at, status_reason, details
FROM events WHERE source = 'sinch' AND phone IN (%(phones)s) ORDER BY id;

-- ===== consent ledger ================================================================

-- name: ledger_upsert
-- Rows already folded by the caller (one per key). The WHERE is ledger.wins in SQL, so
-- two replicas writing the same key concurrently still keep the winner.
INSERT INTO consent_ledger (identity, channel, state, since, source, event_id)
VALUES %(rows)s
ON CONFLICT (identity, channel) DO UPDATE SET
  state = excluded.state, since = excluded.since, source = excluded.source, event_id = excluded.event_id
WHERE excluded.since > consent_ledger.since
   OR (excluded.since = consent_ledger.since AND excluded.state = 'opted_out'
       AND consent_ledger.state = 'opted_in');

-- name: ledger_states
SELECT identity, channel, state, since, source, event_id FROM consent_ledger
WHERE identity IN (%(identities)s);

-- name: ledger_state
SELECT identity, channel, state, since, source, event_id FROM consent_ledger
WHERE identity = %(identity)s AND channel = %(channel)s;

-- name: ledger_counts
-- By state over the consent_ledger_state index (a covering-index scan).
SELECT state, COUNT(*) AS n FROM consent_ledger GROUP BY state;

-- name: ledger_all
SELECT identity, channel, state, since, source, event_id FROM consent_ledger ORDER BY identity, channel;

-- name: ledger_clear
DELETE FROM consent_ledger;

-- name: ledger_events_after
SELECT id, source, event_type, kind, channel, phone, email, occurred_at FROM events
WHERE id > %(after)s ORDER BY id LIMIT %(limit)s;

-- ===== audit ==================================================================

-- name: audit_targets
-- Every record syncd has written (a done delivery), with the event that targeted it;
-- records with a delivery still pending are in flight and left out. all_crms = 1 reads
-- every CRM, else only %(crm)s.
SELECT d.crm, d.obj, d.record_id, d.event_id, e.event_type, e.kind, e.channel, e.phone, e.email,
       e.occurred_at, e.source
FROM deliveries d JOIN events e ON e.id = d.event_id
WHERE d.state = 'done' AND (%(all_crms)s = 1 OR d.crm = %(crm)s)
  AND NOT EXISTS (SELECT 1 FROM deliveries p WHERE p.crm = d.crm AND p.obj = d.obj
                  AND p.record_id = d.record_id AND p.state = 'pending')
ORDER BY d.crm, d.obj, d.record_id, d.event_id;
-- ===== compliance clock (syncd/compliance.py) ========================================
-- "Open" repeats the partial index events_compliance_open's predicate verbatim, so both
-- engines read only the open opt-outs; %(flags)s = 0 leaves CRM-side flags uncounted.

-- name: honour_settled_events
-- In the settle transaction: the events of deliveries just done whose every target is done.
UPDATE events SET honoured_at = %(now_iso)s
WHERE id IN (SELECT event_id FROM deliveries WHERE id IN (%(ids)s))
  AND honoured_at IS NULL AND kind IN ('opt_out', 'do_not_contact') AND event_type = 'consent'
  AND status = 'routed'
  AND NOT EXISTS (SELECT 1 FROM deliveries d WHERE d.event_id = events.id AND d.state <> 'done');

-- name: compliance_counts
SELECT COUNT(*) AS open,
       SUM(CASE WHEN received_at < %(breach_before)s THEN 1 ELSE 0 END) AS breached,
       SUM(CASE WHEN received_at >= %(breach_before)s AND received_at < %(risk_before)s THEN 1 ELSE 0 END)
         AS at_risk,
       MIN(received_at) AS oldest
FROM events
WHERE honoured_at IS NULL AND kind IN ('opt_out', 'do_not_contact')
  AND (event_type = 'crm_flag' OR (event_type = 'consent' AND status IN ('new', 'routed', 'quarantined')))
  AND (event_type = 'consent' OR %(flags)s = 1);

-- name: compliance_at_risk
-- The open opt-outs received in [from, before), oldest first, with their targets not yet done.
SELECT e.id, e.source, e.event_type, e.kind, e.channel, e.status, e.received_at, d.crm, d.obj, d.state
FROM (SELECT id, source, event_type, kind, channel, status, received_at FROM events
      WHERE honoured_at IS NULL AND kind IN ('opt_out', 'do_not_contact')
        AND (event_type = 'crm_flag' OR (event_type = 'consent' AND status IN ('new', 'routed', 'quarantined')))
        AND (event_type = 'consent' OR %(flags)s = 1)
        AND received_at >= %(from)s AND received_at < %(before)s
      ORDER BY received_at, id LIMIT %(limit)s) e
LEFT JOIN deliveries d ON d.event_id = e.id AND d.state <> 'done'
ORDER BY e.received_at, e.id, d.id;

-- name: mark_breached
UPDATE events SET breached_at = %(now_iso)s
WHERE honoured_at IS NULL AND kind IN ('opt_out', 'do_not_contact')
  AND (event_type = 'crm_flag' OR (event_type = 'consent' AND status IN ('new', 'routed', 'quarantined')))
  AND (event_type = 'consent' OR %(flags)s = 1)
  AND received_at < %(breach_before)s AND breached_at IS NULL;

-- name: breached_total
SELECT COUNT(*) AS n FROM events WHERE breached_at IS NOT NULL;

-- name: open_crm_flags
SELECT id, phone, received_at FROM events
WHERE honoured_at IS NULL AND kind IN ('opt_out', 'do_not_contact')
  AND (event_type = 'crm_flag' OR (event_type = 'consent' AND status IN ('new', 'routed', 'quarantined')))
  AND event_type = 'crm_flag' AND id > %(after)s
ORDER BY id LIMIT %(limit)s;

-- name: sinch_confirmations
-- What Sinch holds for these phones: a registration of ours confirmed (done) or Sinch's own change.
SELECT s.phone, s.channel, s.kind, r.state, COALESCE(r.done_at, s.updated_at) AS at, s.reflection_id
FROM sinch_state s LEFT JOIN reflections r ON r.id = s.reflection_id
WHERE s.phone IN (%(phones)s);

-- name: honour_event
UPDATE events SET honoured_at = %(at)s WHERE id = %(id)s AND honoured_at IS NULL;
