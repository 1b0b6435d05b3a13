-- Idempotency storage tuning (PostgreSQL flavour; parallel to the SQLite file of the same name).
-- Keys are opaque: compare them bytewise ("C"), never by a locale's collation rules.
-- Stored headers are only ever read back whole, so they are kept as the text that was
-- rendered, with no JSON parsing on the write path.
ALTER TABLE idempotency_keys
    ALTER COLUMN idem_key TYPE TEXT COLLATE "C",
    ALTER COLUMN response_headers TYPE TEXT USING response_headers::text;

-- Deleting an expired record sets orders.idempotency_key_id to NULL; without this index every
-- deleted record would scan the orders table.
CREATE INDEX orders_idempotency_key ON orders (idempotency_key_id)
    WHERE idempotency_key_id IS NOT NULL;
