-- Idempotency storage tuning (SQLite flavour; parallel to the PostgreSQL file of the same name).
-- SQLite already compares text bytewise and stores headers as text.
-- The record names the resource it created (resource_id) instead of the resource naming the
-- record, so sweeping a record never needs orders.
ALTER TABLE idempotency_keys ADD COLUMN resource_id INTEGER;

-- SQLite cannot drop a column that takes part in a foreign key: orders.idempotency_key_id
-- stays, NULL from now on. This (empty) index keeps its ON DELETE SET NULL action from
-- scanning orders for every swept record.
CREATE INDEX orders_idempotency_key ON orders (idempotency_key_id)
    WHERE idempotency_key_id IS NOT NULL;
