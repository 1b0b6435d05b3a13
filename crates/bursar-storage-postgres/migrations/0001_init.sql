-- Bursar schema, PostgreSQL flavour. Kept line-for-line parallel to the SQLite migration of the
-- same name so the two can be diffed. Money is integer minor units; times are Unix milliseconds.

CREATE TABLE accounts (
    id          BIGINT  GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    name        TEXT    NOT NULL UNIQUE,
    created_at  BIGINT  NOT NULL
);

CREATE TABLE api_keys (
    id          BIGINT  GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    account_id  BIGINT  NOT NULL REFERENCES accounts (id),
    mode        TEXT    NOT NULL CHECK (mode IN ('test', 'live')),
    key_hash    TEXT    NOT NULL UNIQUE,
    start       TEXT    NOT NULL,
    last4       TEXT    NOT NULL,
    created_at  BIGINT  NOT NULL,
    revoked_at  BIGINT 
);

CREATE TABLE customers (
    id          BIGINT  GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    account_id  BIGINT  NOT NULL REFERENCES accounts (id),
    name        TEXT,
    email       TEXT,
    metadata    JSONB   NOT NULL DEFAULT '{}',
    version     BIGINT  NOT NULL DEFAULT 1,
    created_at  BIGINT  NOT NULL,
    updated_at  BIGINT  NOT NULL
);
CREATE INDEX customers_account ON customers (account_id, id);

CREATE TABLE orders (
    id           BIGINT  GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    account_id   BIGINT  NOT NULL REFERENCES accounts (id),
    customer_id  BIGINT  NOT NULL REFERENCES customers (id),
    amount_minor BIGINT  NOT NULL CHECK (amount_minor > 0),
    currency     TEXT    NOT NULL,
    status       TEXT    NOT NULL,
    description  TEXT,
    metadata     JSONB   NOT NULL DEFAULT '{}',
    version      BIGINT  NOT NULL DEFAULT 1,
    created_at   BIGINT  NOT NULL,
    updated_at   BIGINT  NOT NULL
);
CREATE INDEX orders_account ON orders (account_id, id);
CREATE INDEX orders_account_customer ON orders (account_id, customer_id, id);
CREATE INDEX orders_account_status ON orders (account_id, status, id);
CREATE INDEX orders_account_created ON orders (account_id, created_at);

-- The transactional outbox: every state change appends here in the same transaction.
CREATE TABLE outbox_events (
    id                BIGINT  GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    account_id        BIGINT  NOT NULL REFERENCES accounts (id),
    event_type        TEXT    NOT NULL,
    aggregate_type    TEXT    NOT NULL,
    aggregate_id      BIGINT  NOT NULL,
    aggregate_version BIGINT  NOT NULL,
    payload           JSONB   NOT NULL,
    request_id        TEXT    NOT NULL,
    trace_id          TEXT    NOT NULL,
    created_at        BIGINT  NOT NULL
);
CREATE INDEX outbox_events_aggregate ON outbox_events (account_id, aggregate_type, aggregate_id, id);
