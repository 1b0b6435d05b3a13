-- Idempotency records (SQLite flavour; parallel to the PostgreSQL file of the same name).
-- A record is written in the same transaction as the create it protects and holds the exact
-- response the client got, so a retry is answered byte for byte.

CREATE TABLE idempotency_keys (
    id               INTEGER PRIMARY KEY AUTOINCREMENT,
    account_id       INTEGER NOT NULL REFERENCES accounts (id),
    idem_key         TEXT    NOT NULL,
    method           TEXT    NOT NULL,
    route            TEXT    NOT NULL,
    fingerprint      TEXT    NOT NULL,
    response_status  INTEGER NOT NULL,
    response_headers TEXT    NOT NULL,
    response_body    BLOB    NOT NULL,
    created_at       INTEGER NOT NULL,
    expires_at       INTEGER NOT NULL,
    UNIQUE (account_id, idem_key)
);
CREATE INDEX idempotency_keys_expiry ON idempotency_keys (expires_at);

ALTER TABLE orders ADD COLUMN idempotency_key_id INTEGER
    REFERENCES idempotency_keys (id) ON DELETE SET NULL;
