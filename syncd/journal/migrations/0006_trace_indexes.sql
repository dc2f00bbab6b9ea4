-- `syncd trace` and the status page's search look a person up by phone, email or
-- record id; without these they read every event and delivery (1.4 s for an email
-- on a 200,000-event journal). The email index is on the expression the trace query
-- compares (the ledger's identity: lower-cased, trimmed).
CREATE INDEX IF NOT EXISTS events_phone ON events (phone);
CREATE INDEX IF NOT EXISTS events_email ON events (LOWER(TRIM(email)));
CREATE INDEX IF NOT EXISTS events_external_lead_id ON events (external_lead_id);
CREATE INDEX IF NOT EXISTS deliveries_record_id ON deliveries (record_id);
CREATE INDEX IF NOT EXISTS reflections_phone ON reflections (phone);
CREATE INDEX IF NOT EXISTS reflections_record_id ON reflections (record_id);
-- A record's CRM-side flags are found among the crm_flag events only (their record id
-- is in details).
CREATE INDEX IF NOT EXISTS events_crm_flags ON events (id) WHERE event_type = 'crm_flag';
