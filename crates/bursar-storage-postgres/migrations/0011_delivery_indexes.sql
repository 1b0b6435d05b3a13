-- Issue 5: every change of a delivery's state writes a new row version with an entry in every
-- index of the table (the state is indexed, so no update is HOT), and a delivery changes state
-- at least twice (claimed, completed). `(state, next_attempt_at)` served only retention, which
-- looks for finished rows by age; a partial index of finished rows by `updated_at` serves it
-- better and takes one entry per delivery, when it finishes, instead of one per version.
-- Claims read the partial indexes of migration 0010.
DROP INDEX webhook_deliveries_due;
CREATE INDEX webhook_deliveries_finished ON webhook_deliveries (updated_at)
    WHERE state IN ('succeeded', 'failed', 'cancelled');
