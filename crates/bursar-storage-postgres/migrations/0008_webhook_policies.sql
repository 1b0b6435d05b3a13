-- Issue 5, part 2: delivery policies (circuit breaker, concurrency cap, auto-disable,
-- operational events, manual replay).

-- Endpoint health. `first_failure_at`: when the current unbroken run of failed attempts began
-- (NULL again after any 2xx); `consecutive_failures`: how long that run is. An `open` circuit
-- sends nothing until `circuit_open_until`, then one probe at a time until an attempt ends.
ALTER TABLE webhook_endpoints ADD COLUMN first_failure_at BIGINT;
ALTER TABLE webhook_endpoints ADD COLUMN consecutive_failures BIGINT NOT NULL DEFAULT 0;
ALTER TABLE webhook_endpoints ADD COLUMN circuit_state TEXT NOT NULL DEFAULT 'closed'
    CHECK (circuit_state IN ('closed', 'open'));
ALTER TABLE webhook_endpoints ADD COLUMN circuit_open_until BIGINT;

-- Operational events (`webhook.*`) name the endpoint they are about; they are never delivered
-- to that endpoint. NULL for business events.
ALTER TABLE outbox_events ADD COLUMN about_endpoint_id BIGINT;
-- Replays select events by event time.
CREATE INDEX outbox_events_time ON outbox_events (account_id, created_at);

-- Manual replays, recorded with what they did (they run within the request).
CREATE TABLE webhook_replays (
    id                  BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    account_id          BIGINT  NOT NULL REFERENCES accounts (id),
    endpoint_id         BIGINT  NOT NULL REFERENCES webhook_endpoints (id) ON DELETE CASCADE,
    since_at            BIGINT  NOT NULL,
    until_at            BIGINT  NOT NULL,
    include_succeeded   BOOLEAN NOT NULL,
    status              TEXT    NOT NULL,
    events_matched      BIGINT  NOT NULL,
    deliveries_created  BIGINT  NOT NULL,
    deliveries_requeued BIGINT  NOT NULL,
    capped              BOOLEAN NOT NULL,
    next_since_at       BIGINT,            -- when capped: the first event time left out
    created_at          BIGINT  NOT NULL
);
CREATE INDEX webhook_replays_endpoint ON webhook_replays (endpoint_id, id);
