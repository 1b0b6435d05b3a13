-- Payments, refunds, the double-entry ledger and conversions (SQLite flavour; parallel to the
-- PostgreSQL file of the same name). Money is integer minor units; rates are decimal text.
-- operation_id names the idempotency record whose phased work wrote the row: a rerun of that
-- work finds its row, and can never write a second one.

-- The payment being made or authorized for an order (the idempotency record of its work):
-- claimed before the processor is called, so a second payment of the order cannot start.
ALTER TABLE orders ADD COLUMN payment_operation_id INTEGER;

CREATE TABLE payments (
    id              INTEGER PRIMARY KEY AUTOINCREMENT,
    account_id      INTEGER NOT NULL REFERENCES accounts (id),
    order_id        INTEGER NOT NULL REFERENCES orders (id),
    operation_id    INTEGER NOT NULL UNIQUE,
    processor_id    TEXT,
    payment_method  TEXT    NOT NULL,
    amount_minor    INTEGER NOT NULL CHECK (amount_minor > 0),
    currency        TEXT    NOT NULL,
    status          TEXT    NOT NULL,
    captured_minor  INTEGER NOT NULL DEFAULT 0,
    refunded_minor  INTEGER NOT NULL DEFAULT 0,
    failure_code    TEXT,
    failure_message TEXT,
    version         INTEGER NOT NULL DEFAULT 1,
    created_at      INTEGER NOT NULL,
    updated_at      INTEGER NOT NULL,
    CHECK (captured_minor BETWEEN 0 AND amount_minor),
    CHECK (refunded_minor BETWEEN 0 AND captured_minor)
);
CREATE INDEX payments_account ON payments (account_id, id);
CREATE INDEX payments_account_order ON payments (account_id, order_id, id);

CREATE TABLE refunds (
    id            INTEGER PRIMARY KEY AUTOINCREMENT,
    account_id    INTEGER NOT NULL REFERENCES accounts (id),
    payment_id    INTEGER NOT NULL REFERENCES payments (id),
    operation_id  INTEGER NOT NULL UNIQUE,
    amount_minor  INTEGER NOT NULL CHECK (amount_minor > 0),
    currency      TEXT    NOT NULL,
    status        TEXT    NOT NULL,
    processor_id  TEXT,
    failure_code  TEXT,
    created_at    INTEGER NOT NULL,
    updated_at    INTEGER NOT NULL
);
CREATE INDEX refunds_account ON refunds (account_id, id);
CREATE INDEX refunds_account_payment ON refunds (account_id, payment_id, id);

-- Journal entries and their postings are append-only: corrections are new entries.
CREATE TABLE journal_entries (
    id              INTEGER PRIMARY KEY AUTOINCREMENT,
    account_id      INTEGER NOT NULL REFERENCES accounts (id),
    kind            TEXT    NOT NULL,
    reference_type  TEXT    NOT NULL,
    reference_id    INTEGER NOT NULL,
    created_at      INTEGER NOT NULL
);
CREATE INDEX journal_entries_account ON journal_entries (account_id, id);

CREATE TABLE postings (
    id              INTEGER PRIMARY KEY AUTOINCREMENT,
    entry_id        INTEGER NOT NULL REFERENCES journal_entries (id),
    account_id      INTEGER NOT NULL REFERENCES accounts (id),
    ledger_account  TEXT    NOT NULL,
    currency        TEXT    NOT NULL,
    amount_minor    INTEGER NOT NULL CHECK (amount_minor <> 0)
);
CREATE INDEX postings_entry ON postings (entry_id);

-- The running sum of each ledger account's postings, kept in the posting transaction, split
-- over shards (PostgreSQL spreads card movements over 16, so concurrent payments of one
-- account do not queue on one row; SQLite has one writer and uses shard 0): a balance is the
-- sum of its shards.
CREATE TABLE balances (
    account_id      INTEGER NOT NULL REFERENCES accounts (id),
    ledger_account  TEXT    NOT NULL,
    currency        TEXT    NOT NULL,
    shard           INTEGER NOT NULL DEFAULT 0,
    amount_minor    INTEGER NOT NULL,
    updated_at      INTEGER NOT NULL,
    PRIMARY KEY (account_id, currency, ledger_account, shard)
);

-- Market rates, shared by every account.
CREATE TABLE fx_rates (
    base_currency   TEXT    NOT NULL,
    quote_currency  TEXT    NOT NULL,
    rate            TEXT    NOT NULL,
    set_at          INTEGER NOT NULL,
    PRIMARY KEY (base_currency, quote_currency)
);

CREATE TABLE fx_quotes (
    id              INTEGER PRIMARY KEY AUTOINCREMENT,
    account_id      INTEGER NOT NULL REFERENCES accounts (id),
    from_currency   TEXT    NOT NULL,
    from_minor      INTEGER NOT NULL CHECK (from_minor > 0),
    to_currency     TEXT    NOT NULL,
    to_minor        INTEGER NOT NULL CHECK (to_minor > 0),
    market_rate     TEXT    NOT NULL,
    rate            TEXT    NOT NULL,
    spread_bps      INTEGER NOT NULL,
    created_at      INTEGER NOT NULL,
    expires_at      INTEGER NOT NULL,
    used_at         INTEGER
);
CREATE INDEX fx_quotes_account ON fx_quotes (account_id, id);

CREATE TABLE conversions (
    id              INTEGER PRIMARY KEY AUTOINCREMENT,
    account_id      INTEGER NOT NULL REFERENCES accounts (id),
    quote_id        INTEGER NOT NULL UNIQUE REFERENCES fx_quotes (id),
    from_currency   TEXT    NOT NULL,
    from_minor      INTEGER NOT NULL,
    to_currency     TEXT    NOT NULL,
    to_minor        INTEGER NOT NULL,
    rate            TEXT    NOT NULL,
    created_at      INTEGER NOT NULL
);
CREATE INDEX conversions_account ON conversions (account_id, id);

-- The journal is append-only: a correction is a new entry, never an edit.
CREATE TRIGGER journal_entries_no_update BEFORE UPDATE ON journal_entries
BEGIN SELECT RAISE(ABORT, 'journal entries are immutable'); END;
CREATE TRIGGER journal_entries_no_delete BEFORE DELETE ON journal_entries
BEGIN SELECT RAISE(ABORT, 'journal entries are immutable'); END;
CREATE TRIGGER postings_no_update BEFORE UPDATE ON postings
BEGIN SELECT RAISE(ABORT, 'postings are immutable'); END;
CREATE TRIGGER postings_no_delete BEFORE DELETE ON postings
BEGIN SELECT RAISE(ABORT, 'postings are immutable'); END;
