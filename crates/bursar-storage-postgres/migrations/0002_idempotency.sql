-- Idempotency records (PostgreSQL flavour; parallel to the SQLite file of the same name).
-- A record is written in the same transaction as the create it protects and holds the exact
-- response the client got, so a retry is answered byte for byte.

CREATE TABLE idempotency_keys (
    id               BIGINT  GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    account_id       BIGINT  NOT NULL REFERENCES accounts (id),
    idem_key         TEXT    NOT NULL,
    method           TEXT    NOT NULL,
    route            TEXT    NOT NULL,
    fingerprint      TEXT    NOT NULL,
    response_status  INTEGER NOT NULL,
    response_headers JSONB   NOT NULL,
    response_body    BYTEA   NOT NULL,
    created_at       BIGINT  NOT NULL,
    expires_at       BIGINT  NOT NULL,
    CONSTRAINT idempotency_keys_account_key UNIQUE (account_id, idem_key)
);
CREATE INDEX idempotency_keys_expiry ON idempotency_keys (expires_at);

ALTER TABLE orders ADD COLUMN idempotency_key_id BIGINT
    REFERENCES idempotency_keys (id) ON DELETE SET NULL;
