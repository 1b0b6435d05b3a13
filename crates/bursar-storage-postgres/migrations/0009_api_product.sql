-- Issue 6: the API as a product — key management, plans, monthly quotas, usage metering.

-- NULL: the configured default plan. `bursar admin accounts set-plan` changes it.
ALTER TABLE accounts ADD COLUMN plan TEXT;

-- Keys: a label, scopes (space-separated, NULL = full access), expiry, the key a roll came
-- from, and the rate-limit identity (the first key of the roll chain; NULL = the key itself).
-- `last_used_at` moves with the usage flush, not on every request.
ALTER TABLE api_keys ADD COLUMN name TEXT NOT NULL DEFAULT '';
ALTER TABLE api_keys ADD COLUMN scopes TEXT;
ALTER TABLE api_keys ADD COLUMN expires_at BIGINT;
ALTER TABLE api_keys ADD COLUMN last_used_at BIGINT;
ALTER TABLE api_keys ADD COLUMN rotated_from BIGINT REFERENCES api_keys (id);
ALTER TABLE api_keys ADD COLUMN limit_id BIGINT;
CREATE INDEX api_keys_account ON api_keys (account_id, id);

-- Monthly quota counters: charged with `used + cost <= limit` in one statement.
CREATE TABLE quota_usage (
    account_id    BIGINT  NOT NULL REFERENCES accounts (id),
    period_start  BIGINT  NOT NULL,
    used          BIGINT  NOT NULL CHECK (used >= 0),
    PRIMARY KEY (account_id, period_start)
);

-- Idempotency keys already charged in a period: a replay is not charged again.
CREATE TABLE quota_charges (
    account_id       BIGINT  NOT NULL REFERENCES accounts (id),
    period_start     BIGINT  NOT NULL,
    idempotency_key  TEXT    NOT NULL,
    PRIMARY KEY (account_id, period_start, idempotency_key)
);

-- Metered requests per account, key, route class and UTC day (midnight, Unix ms), flushed
-- from memory in batches.
CREATE TABLE usage_daily (
    account_id   BIGINT  NOT NULL REFERENCES accounts (id),
    day          BIGINT  NOT NULL,
    key_id       BIGINT  NOT NULL,
    route_class  TEXT    NOT NULL,
    requests     BIGINT  NOT NULL,
    PRIMARY KEY (account_id, day, key_id, route_class)
);
