-- Issues 4 and 5: tenant rows no longer name their account in a foreign key (ADR 0008).
--
-- A foreign-key check takes a KEY SHARE lock on the referenced row. Every order, event,
-- payment, posting and webhook delivery of an account referenced the same `accounts` row, so
-- concurrent transactions kept that row under a multixact of lockers, and each check had to
-- read the multixact's members (and the row's version chain, since the relay bumps the row's
-- `event_seq`) to pass. Measured on the bench: the checks were a third of PostgreSQL's time in
-- the payment phase and 28 % of it under webhook fan-out. Accounts are never deleted and every
-- `account_id` written comes from an authenticated key's account or from a row of the same
-- account, so these keys guarded nothing that can happen. Keys between tenant rows stay
-- (orders -> customers, payments -> orders, postings -> journal_entries ...), as do the two
-- low-volume tables written at account set-up (`api_keys`, `webhook_endpoints`).
--
-- A delivery's key to its event goes for the same reason: events are never deleted, and the
-- relay inserts deliveries only for the events it sequences in the same statement.
ALTER TABLE customers DROP CONSTRAINT customers_account_id_fkey;
ALTER TABLE orders DROP CONSTRAINT orders_account_id_fkey;
ALTER TABLE outbox_events DROP CONSTRAINT outbox_events_account_id_fkey;
ALTER TABLE idempotency_keys DROP CONSTRAINT idempotency_keys_account_id_fkey;
ALTER TABLE payments DROP CONSTRAINT payments_account_id_fkey;
ALTER TABLE refunds DROP CONSTRAINT refunds_account_id_fkey;
ALTER TABLE journal_entries DROP CONSTRAINT journal_entries_account_id_fkey;
ALTER TABLE postings DROP CONSTRAINT postings_account_id_fkey;
ALTER TABLE balances DROP CONSTRAINT balances_account_id_fkey;
ALTER TABLE fx_quotes DROP CONSTRAINT fx_quotes_account_id_fkey;
ALTER TABLE conversions DROP CONSTRAINT conversions_account_id_fkey;
ALTER TABLE webhook_deliveries DROP CONSTRAINT webhook_deliveries_account_id_fkey;
ALTER TABLE webhook_deliveries DROP CONSTRAINT webhook_deliveries_event_id_fkey;
ALTER TABLE webhook_replays DROP CONSTRAINT webhook_replays_account_id_fkey;
ALTER TABLE quota_usage DROP CONSTRAINT quota_usage_account_id_fkey;
ALTER TABLE quota_charges DROP CONSTRAINT quota_charges_account_id_fkey;
ALTER TABLE usage_daily DROP CONSTRAINT usage_daily_account_id_fkey;
