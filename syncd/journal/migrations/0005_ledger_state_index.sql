-- The consent ledger's size by state (`syncd status`, the status page) is a count
-- over this index alone: on a 1,000,000-row ledger a covering-index scan instead
-- of reading every row.
CREATE INDEX IF NOT EXISTS consent_ledger_state ON consent_ledger (state);
