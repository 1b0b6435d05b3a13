-- Issue 5: per-(endpoint, aggregate) FIFO, opt-in per endpoint. A delivery to such an endpoint
-- carries its event's aggregate and sequence, so a claim can tell whether an earlier delivery of
-- the same aggregate to the same endpoint is still unfinished. Deliveries to other endpoints
-- (and those fanned out before the endpoint opted in) carry none, are never held back, and stay
-- out of the index, which holds unfinished FIFO rows only: endpoints that do not opt in pay
-- nothing for it.
ALTER TABLE webhook_endpoints ADD COLUMN fifo_per_aggregate INTEGER NOT NULL DEFAULT 0;
ALTER TABLE webhook_deliveries ADD COLUMN aggregate_key TEXT;
ALTER TABLE webhook_deliveries ADD COLUMN event_seq INTEGER;
CREATE INDEX webhook_deliveries_unfinished_aggregate
    ON webhook_deliveries (endpoint_id, aggregate_key, event_seq)
    WHERE aggregate_key IS NOT NULL AND state IN ('pending', 'retrying', 'in_flight');
