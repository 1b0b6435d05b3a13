-- Issue 5: the live fan-out's backlog. A sequenced event is "published" once JetStream
-- acknowledged it (or, without NATS, once this process's broadcast took it); the partial index
-- keeps the publisher's query proportional to the backlog, not to the log.
CREATE INDEX outbox_events_unpublished ON outbox_events (sequenced_at, account_id, seq)
    WHERE seq IS NOT NULL AND published_at IS NULL;
