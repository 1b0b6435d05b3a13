-- Issue 5: the event log (sequenced outbox) and webhook delivery.

-- Filled by the relay after commit, in one serialised step: the public id, the per-account
-- sequence and the rendered body that every transport sends byte for byte.
ALTER TABLE outbox_events ADD COLUMN event_id TEXT;
ALTER TABLE outbox_events ADD COLUMN seq BIGINT;
ALTER TABLE outbox_events ADD COLUMN body TEXT;
ALTER TABLE outbox_events ADD COLUMN sequenced_at BIGINT;
ALTER TABLE outbox_events ADD COLUMN published_at BIGINT;
CREATE UNIQUE INDEX outbox_events_event_id ON outbox_events (event_id);
CREATE UNIQUE INDEX outbox_events_seq ON outbox_events (account_id, seq);
CREATE INDEX outbox_events_unsequenced ON outbox_events (id) WHERE seq IS NULL;

-- The last seq handed out per account.
ALTER TABLE accounts ADD COLUMN event_seq BIGINT  NOT NULL DEFAULT 0;

CREATE TABLE webhook_endpoints (
    id                         BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    account_id                 BIGINT  NOT NULL REFERENCES accounts (id),
    url                        TEXT    NOT NULL,
    description                TEXT,
    event_types                TEXT    NOT NULL,              -- JSON array of patterns
    secret_enc                 TEXT    NOT NULL,              -- encrypted, never clear text
    previous_secret_enc        TEXT,
    previous_secret_expires_at BIGINT,
    enabled                    BOOLEAN NOT NULL DEFAULT TRUE,
    disabled_reason            TEXT,
    max_concurrency            BIGINT  NOT NULL DEFAULT 4,
    version                    BIGINT  NOT NULL DEFAULT 1,
    created_at                 BIGINT  NOT NULL,
    updated_at                 BIGINT  NOT NULL
);
CREATE INDEX webhook_endpoints_account ON webhook_endpoints (account_id, id);

CREATE TABLE webhook_deliveries (
    id               BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    account_id       BIGINT  NOT NULL REFERENCES accounts (id),
    endpoint_id      BIGINT  NOT NULL REFERENCES webhook_endpoints (id) ON DELETE CASCADE,
    event_id         TEXT    NOT NULL REFERENCES outbox_events (event_id),
    state            TEXT    NOT NULL CHECK (state IN
                       ('pending', 'in_flight', 'retrying', 'succeeded', 'failed', 'cancelled')),
    attempt_count    BIGINT  NOT NULL DEFAULT 0,
    next_attempt_at  BIGINT  NOT NULL,
    lease_token      TEXT,
    lease_expires_at BIGINT,
    last_status      BIGINT,
    last_error       TEXT,
    created_at       BIGINT  NOT NULL,
    updated_at       BIGINT  NOT NULL,
    UNIQUE (event_id, endpoint_id)
);
CREATE INDEX webhook_deliveries_due ON webhook_deliveries (state, next_attempt_at);
CREATE INDEX webhook_deliveries_endpoint ON webhook_deliveries (endpoint_id, id);

CREATE TABLE webhook_attempts (
    id               BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    delivery_id      BIGINT  NOT NULL REFERENCES webhook_deliveries (id) ON DELETE CASCADE,
    endpoint_id      BIGINT  NOT NULL,
    attempt_no       BIGINT  NOT NULL,
    status_code      BIGINT,
    duration_ms      BIGINT  NOT NULL,
    error_kind       TEXT,
    response_snippet TEXT,
    created_at       BIGINT  NOT NULL,
    UNIQUE (delivery_id, attempt_no)
);
CREATE INDEX webhook_attempts_endpoint ON webhook_attempts (endpoint_id, id);
