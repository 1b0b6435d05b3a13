-- Phased work that leaves the database (SQLite flavour; parallel to the PostgreSQL file of
-- the same name). An idempotency record doubles as the work's progress marker: its recovery
-- point, the JSON state the phases committed, and a lease with a fencing token. Records of
-- single-transaction creates are born 'finished' and never use the other columns.
-- Until a record finishes, its response columns hold placeholders (status 0) and its
-- expires_at is the largest integer: retention starts when the work finishes.

ALTER TABLE idempotency_keys ADD COLUMN recovery_point TEXT NOT NULL DEFAULT 'finished';
ALTER TABLE idempotency_keys ADD COLUMN phase_state    TEXT;
ALTER TABLE idempotency_keys ADD COLUMN fence          INTEGER NOT NULL DEFAULT 0;
ALTER TABLE idempotency_keys ADD COLUMN locked_until   INTEGER;
ALTER TABLE idempotency_keys ADD COLUMN last_run_at    INTEGER;
ALTER TABLE idempotency_keys ADD COLUMN attempts       INTEGER NOT NULL DEFAULT 0;
ALTER TABLE idempotency_keys ADD COLUMN request_body   BLOB;
ALTER TABLE idempotency_keys ADD COLUMN request_id     TEXT;
ALTER TABLE idempotency_keys ADD COLUMN trace_id       TEXT;

-- The completer's scan: only unfinished records, by when they last ran.
CREATE INDEX idempotency_keys_unfinished ON idempotency_keys (last_run_at)
    WHERE recovery_point <> 'finished';
