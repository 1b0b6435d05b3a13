-- Idempotency storage tuning (PostgreSQL flavour; parallel to the SQLite file of the same name).
-- Keys are opaque: compare them bytewise ("C"), never by a locale's collation rules.
-- Stored headers are only ever read back whole, so they are kept as the text that was
-- rendered, with no JSON parsing on the write path.
-- The record names the resource it created (resource_id) instead of the resource naming the
-- record: sweeping a record then never touches orders, and a keyed create checks one foreign
-- key less. orders.idempotency_key_id, whose ON DELETE SET NULL made every swept record look
-- up orders, goes.
ALTER TABLE idempotency_keys
    ALTER COLUMN idem_key TYPE TEXT COLLATE "C",
    ALTER COLUMN response_headers TYPE TEXT USING response_headers::text,
    ADD COLUMN resource_id BIGINT;

ALTER TABLE orders DROP COLUMN idempotency_key_id;
