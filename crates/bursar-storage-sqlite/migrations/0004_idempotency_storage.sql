-- Idempotency storage tuning (SQLite flavour; parallel to the PostgreSQL file of the same name).
-- SQLite already compares text bytewise and stores headers as text; only the index is new.

-- Deleting an expired record sets orders.idempotency_key_id to NULL; without this index every
-- deleted record would scan the orders table.
CREATE INDEX orders_idempotency_key ON orders (idempotency_key_id)
    WHERE idempotency_key_id IS NOT NULL;
