-- Issue 5: a claim takes each endpoint's oldest due deliveries from these, so its cost follows
-- what it takes, not the size of the backlog (before, every claim ranked every due delivery).
-- Partial: finished deliveries, the bulk of the table, are in neither.
CREATE INDEX webhook_deliveries_endpoint_due ON webhook_deliveries (endpoint_id, next_attempt_at, id)
    WHERE state IN ('pending', 'retrying');
CREATE INDEX webhook_deliveries_endpoint_leased ON webhook_deliveries (endpoint_id, lease_expires_at)
    WHERE state = 'in_flight';
