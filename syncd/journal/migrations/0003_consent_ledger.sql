-- The consent ledger: the current consent per person identity (E.164 phone, or a
-- lower-cased trimmed email) and channel; a view of the events, kept in the same
-- transaction as each event insert. The runner fills it from the events an existing
-- journal holds (syncd/journal/ledger.py, rebuild_in_migration).
CREATE TABLE IF NOT EXISTS consent_ledger (
  identity TEXT NOT NULL,
  channel TEXT NOT NULL,
  state TEXT NOT NULL,
  since TEXT NOT NULL,
  source TEXT NOT NULL,
  event_id $bigint,
  PRIMARY KEY (identity, channel)
);
