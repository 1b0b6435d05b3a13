-- Bursar schema, SQLite flavour. Kept line-for-line parallel to the PostgreSQL migration of the
-- same name so the two can be diffed. Money is integer minor units; times are Unix milliseconds.

CREATE TABLE accounts (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    name        TEXT    NOT NULL UNIQUE,
    created_at  INTEGER NOT NULL
);

CREATE TABLE api_keys (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    account_id  INTEGER NOT NULL REFERENCES accounts (id),
    mode        TEXT    NOT NULL CHECK (mode IN ('test', 'live')),
    key_hash    TEXT    NOT NULL UNIQUE,
    start       TEXT    NOT NULL,
    last4       TEXT    NOT NULL,
    created_at  INTEGER NOT NULL,
    revoked_at  INTEGER
);

CREATE TABLE customers (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    account_id  INTEGER NOT NULL REFERENCES accounts (id),
    name        TEXT,
    email       TEXT,
    metadata    TEXT    NOT NULL DEFAULT '{}',
    version     INTEGER NOT NULL DEFAULT 1,
    created_at  INTEGER NOT NULL,
    updated_at  INTEGER NOT NULL
);
CREATE INDEX customers_account ON customers (account_id, id);

CREATE TABLE orders (
    id           INTEGER PRIMARY KEY AUTOINCREMENT,
    account_id   INTEGER NOT NULL REFERENCES accounts (id),
    customer_id  INTEGER NOT NULL REFERENCES customers (id),
    amount_minor INTEGER NOT NULL CHECK (amount_minor > 0),
    currency     TEXT    NOT NULL,
    status       TEXT    NOT NULL,
    description  TEXT,
    metadata     TEXT    NOT NULL DEFAULT '{}',
    version      INTEGER NOT NULL DEFAULT 1,
    created_at   INTEGER NOT NULL,
    updated_at   INTEGER NOT NULL
);
CREATE INDEX orders_account ON orders (account_id, id);
CREATE INDEX orders_account_customer ON orders (account_id, customer_id, id);
CREATE INDEX orders_account_status ON orders (account_id, status, id);
CREATE INDEX orders_account_created ON orders (account_id, created_at);

-- The transactional outbox: every state change appends here in the same transaction.
CREATE TABLE outbox_events (
    id                INTEGER PRIMARY KEY AUTOINCREMENT,
    account_id        INTEGER NOT NULL REFERENCES accounts (id),
    event_type        TEXT    NOT NULL,
    aggregate_type    TEXT    NOT NULL,
    aggregate_id      INTEGER NOT NULL,
    aggregate_version INTEGER NOT NULL,
    payload           TEXT    NOT NULL,
    request_id        TEXT    NOT NULL,
    trace_id          TEXT    NOT NULL,
    created_at        INTEGER NOT NULL
);
CREATE INDEX outbox_events_aggregate ON outbox_events (account_id, aggregate_type, aggregate_id, id);
