-- The journal's first schema. ``$name`` placeholders are the runner's dialect types
-- (syncd/journal/migrate.py): $id an auto-increment primary key, $bigint an id
-- column, $blob raw bytes, $real epoch seconds.
CREATE TABLE IF NOT EXISTS events (
  id $id,
  source TEXT NOT NULL,
  source_event_id TEXT NOT NULL,
  event_type TEXT NOT NULL DEFAULT 'consent',
  kind TEXT, channel TEXT,
  external_lead_id TEXT, phone TEXT, phone_raw TEXT, email TEXT, reason TEXT, message TEXT,
  occurred_at TEXT NOT NULL,
  received_at TEXT NOT NULL,
  details TEXT NOT NULL DEFAULT '{}',
  raw $blob NOT NULL,
  status TEXT NOT NULL,
  status_reason TEXT,
  route_attempts INTEGER NOT NULL DEFAULT 0,
  next_route_at $real NOT NULL DEFAULT 0,
  updated_at TEXT NOT NULL,
  UNIQUE (source, source_event_id)
);
CREATE INDEX IF NOT EXISTS events_status ON events (status, next_route_at);
CREATE INDEX IF NOT EXISTS events_received ON events (received_at);
CREATE TABLE IF NOT EXISTS deliveries (
  id $id,
  event_id $bigint NOT NULL REFERENCES events (id),
  crm TEXT NOT NULL, obj TEXT NOT NULL, record_id TEXT NOT NULL,
  state TEXT NOT NULL,
  attempts INTEGER NOT NULL DEFAULT 0,
  next_attempt_at $real NOT NULL,
  lease_until $real NOT NULL DEFAULT 0,
  lease_owner TEXT,
  last_error TEXT,
  outcome TEXT,
  created_at TEXT NOT NULL,
  delivered_at TEXT,
  UNIQUE (event_id, crm, obj, record_id)
);
CREATE INDEX IF NOT EXISTS deliveries_due ON deliveries (state, next_attempt_at);
CREATE INDEX IF NOT EXISTS deliveries_record ON deliveries (crm, obj, record_id, state);
CREATE TABLE IF NOT EXISTS field_clocks (
  crm TEXT NOT NULL, obj TEXT NOT NULL, record_id TEXT NOT NULL, field TEXT NOT NULL,
  occurred_at TEXT NOT NULL, value TEXT, event_id $bigint,
  PRIMARY KEY (crm, obj, record_id, field)
);
CREATE TABLE IF NOT EXISTS watermarks (
  name TEXT PRIMARY KEY, ts TEXT, last_id TEXT, updated_at TEXT
);
CREATE TABLE IF NOT EXISTS crm_status (
  crm TEXT PRIMARY KEY, last_push_at TEXT, last_poll_at TEXT, paused_until $real,
  pause_reason TEXT
);
CREATE TABLE IF NOT EXISTS reflections (
  id $id,
  crm TEXT NOT NULL, obj TEXT NOT NULL, record_id TEXT NOT NULL,
  phone TEXT NOT NULL, channel TEXT NOT NULL, kind TEXT NOT NULL,
  request_id TEXT NOT NULL UNIQUE,
  state TEXT NOT NULL,
  attempts INTEGER NOT NULL DEFAULT 0,
  next_attempt_at $real NOT NULL,
  lease_until $real NOT NULL DEFAULT 0,
  last_error TEXT,
  flagged_at TEXT,
  created_at TEXT NOT NULL,
  registered_at TEXT,
  done_at TEXT
);
CREATE INDEX IF NOT EXISTS reflections_due ON reflections (state, next_attempt_at);
CREATE INDEX IF NOT EXISTS reflections_phone ON reflections (phone, channel, state);
CREATE INDEX IF NOT EXISTS reflections_record ON reflections (crm, obj, record_id);
CREATE TABLE IF NOT EXISTS sinch_state (
  phone TEXT NOT NULL, channel TEXT NOT NULL, kind TEXT NOT NULL, reflection_id $bigint,
  updated_at TEXT NOT NULL,
  PRIMARY KEY (phone, channel)
);
CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL);
