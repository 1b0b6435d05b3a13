-- Issue 5: the event log (sequenced outbox) and webhook delivery.

-- Filled by the relay after commit, in one serialised step: the public id, the per-account
-- sequence and the rendered body that every transport sends byte for byte.
ALTER TABLE outbox_events ADD COLUMN event_id TEXT;
ALTER TABLE outbox_events ADD COLUMN seq INTEGER;
ALTER TABLE outbox_events ADD COLUMN body TEXT;
ALTER TABLE outbox_events ADD COLUMN sequenced_at INTEGER;
ALTER TABLE outbox_events ADD COLUMN published_at INTEGER;
CREATE UNIQUE INDEX outbox_events_event_id ON outbox_events (event_id);
CREATE UNIQUE INDEX outbox_events_seq ON outbox_events (account_id, seq);
CREATE INDEX outbox_events_unsequenced ON outbox_events (id) WHERE seq IS NULL;

-- The last seq handed out per account.
ALTER TABLE accounts ADD COLUMN event_seq INTEGER NOT NULL DEFAULT 0;

CREATE TABLE webhook_endpoints (
    id                         INTEGER PRIMARY KEY AUTOINCREMENT,
    account_id                 INTEGER NOT NULL REFERENCES accounts (id),
    url                        TEXT    NOT NULL,
    description                TEXT,
    event_types                TEXT    NOT NULL,              -- JSON array of patterns
    secret_enc                 TEXT    NOT NULL,              -- encrypted, never clear text
    previous_secret_enc        TEXT,
    previous_secret_expires_at INTEGER,
    enabled                    INTEGER NOT NULL DEFAULT 1,
    disabled_reason            TEXT,
    max_concurrency            INTEGER NOT NULL DEFAULT 4,
    version                    INTEGER NOT NULL DEFAULT 1,
    created_at                 INTEGER NOT NULL,
    updated_at                 INTEGER NOT NULL
);
CREATE INDEX webhook_endpoints_account ON webhook_endpoints (account_id, id);

CREATE TABLE webhook_deliveries (
    id               INTEGER PRIMARY KEY AUTOINCREMENT,
    account_id       INTEGER NOT NULL REFERENCES accounts (id),
    endpoint_id      INTEGER NOT NULL REFERENCES webhook_endpoints (id) ON DELETE CASCADE,
    event_id         TEXT    NOT NULL REFERENCES outbox_events (event_id),
    state            TEXT    NOT NULL CHECK (state IN
                       ('pending', 'in_flight', 'retrying', 'succeeded', 'failed', 'cancelled')),
    attempt_count    INTEGER NOT NULL DEFAULT 0,
    next_attempt_at  INTEGER NOT NULL,
    lease_token      TEXT,
    lease_expires_at INTEGER,
    last_status      INTEGER,
    last_error       TEXT,
    created_at       INTEGER NOT NULL,
    updated_at       INTEGER NOT NULL,
    UNIQUE (event_id, endpoint_id)
);
CREATE INDEX webhook_deliveries_due ON webhook_deliveries (state, next_attempt_at);
CREATE INDEX webhook_deliveries_endpoint ON webhook_deliveries (endpoint_id, id);

CREATE TABLE webhook_attempts (
    id               INTEGER PRIMARY KEY AUTOINCREMENT,
    delivery_id      INTEGER NOT NULL REFERENCES webhook_deliveries (id) ON DELETE CASCADE,
    endpoint_id      INTEGER NOT NULL,
    attempt_no       INTEGER NOT NULL,
    status_code      INTEGER,
    duration_ms      INTEGER NOT NULL,
    error_kind       TEXT,
    response_snippet TEXT,
    created_at       INTEGER NOT NULL,
    UNIQUE (delivery_id, attempt_no)
);
CREATE INDEX webhook_attempts_endpoint ON webhook_attempts (endpoint_id, id);
