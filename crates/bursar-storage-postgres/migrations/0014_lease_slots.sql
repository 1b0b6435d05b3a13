-- Issue 5: a worker may lease a slot's next delivery before the previous one's attempt is
-- recorded (`claim_ahead`), so a slot can hold two deliveries under one lease token. The cap
-- then counts slots, each named by its lease token and this number; a delivery leased before
-- this column existed (NULL) counts as a slot of its own. Nullable, so adding it rewrites
-- nothing.
ALTER TABLE webhook_deliveries ADD COLUMN lease_slot INTEGER;
