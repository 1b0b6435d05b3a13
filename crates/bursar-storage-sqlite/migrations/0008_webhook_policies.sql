-- Issue 5, part 2: delivery policies (circuit breaker, concurrency cap, auto-disable,
-- operational events, manual replay).

-- Endpoint health. `first_failure_at`: when the current unbroken run of failed attempts began
-- (NULL again after any 2xx); `consecutive_failures`: how long that run is. An `open` circuit
-- sends nothing until `circuit_open_until`, then one probe at a time until an attempt ends.
ALTER TABLE webhook_endpoints ADD COLUMN first_failure_at INTEGER;
ALTER TABLE webhook_endpoints ADD COLUMN consecutive_failures INTEGER NOT NULL DEFAULT 0;
ALTER TABLE webhook_endpoints ADD COLUMN circuit_state TEXT NOT NULL DEFAULT 'closed'
    CHECK (circuit_state IN ('closed', 'open'));
ALTER TABLE webhook_endpoints ADD COLUMN circuit_open_until INTEGER;

-- Operational events (`webhook.*`) name the endpoint they are about; they are never delivered
-- to that endpoint. NULL for business events.
ALTER TABLE outbox_events ADD COLUMN about_endpoint_id INTEGER;
-- Replays select events by event time.
CREATE INDEX outbox_events_time ON outbox_events (account_id, created_at);

-- Manual replays, recorded with what they did (they run within the request).
CREATE TABLE webhook_replays (
    id                  INTEGER PRIMARY KEY AUTOINCREMENT,
    account_id          INTEGER NOT NULL REFERENCES accounts (id),
    endpoint_id         INTEGER NOT NULL REFERENCES webhook_endpoints (id) ON DELETE CASCADE,
    since_at            INTEGER NOT NULL,
    until_at            INTEGER NOT NULL,
    include_succeeded   INTEGER NOT NULL,
    status              TEXT    NOT NULL,
    events_matched      INTEGER NOT NULL,
    deliveries_created  INTEGER NOT NULL,
    deliveries_requeued INTEGER NOT NULL,
    capped              INTEGER NOT NULL,
    next_since_at       INTEGER,           -- when capped: the first event time left out
    created_at          INTEGER NOT NULL
);
CREATE INDEX webhook_replays_endpoint ON webhook_replays (endpoint_id, id);
