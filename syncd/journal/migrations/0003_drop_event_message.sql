-- The opt-out's message text was stored twice (its column and the raw body) and the
-- column was never read: personal data kept for nothing. The raw body keeps it.
ALTER TABLE events DROP COLUMN message;
