//! NATS JetStream (issue 5, spec §2.3): every sequenced event is published to
//! `<prefix>.events.<account>.<type>` with `Nats-Msg-Id` = the event id, so the stream stores
//! a re-publication once (within its duplicate window), and `published_at` is set only after
//! the PubAck — at least once, from the durable log, whatever dies in between.
//!
//! The same subjects carry the live tail across instances: every `bursar serve` holds a core
//! subscription to `<prefix>.events.>` and hands what arrives to its [`super::Hub`]. Core
//! NATS is at most once, which is fine here: a subscriber that misses a message sees the hole
//! in `seq` and reads the log (`super::stream`).

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, context::PublishAckFuture, publish::PublishAck};
use async_nats::{HeaderMap, header::NATS_MESSAGE_ID};
use bursar_storage::events::LoggedEvent;
use futures_util::StreamExt;
use tokio::sync::OnceCell;

use super::LiveEvent;
use crate::AppState;
use crate::config::NatsConfig;

/// Events read from the backlog and published per round.
const BATCH: u32 = 500;

/// A connection to NATS and the JetStream context events are published through.
pub struct Link {
    client: async_nats::Client,
    js: jetstream::Context,
    prefix: String,
    stream: String,
    duplicate_window: Duration,
    max_age: Duration,
    /// The stream is created (or found) once, on first use, so a NATS that is down at start
    /// delays publishing instead of failing the process.
    ready: OnceCell<()>,
}

impl std::fmt::Debug for Link {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Link")
            .field("prefix", &self.prefix)
            .field("stream", &self.stream)
            .finish_non_exhaustive()
    }
}

impl Link {
    /// Connects when `config.url` is set. The client reconnects by itself, also when the
    /// server is not up yet: events wait in the log meanwhile.
    pub async fn connect(config: &NatsConfig) -> anyhow::Result<Option<Arc<Link>>> {
        let Some(url) = config.url.as_deref().filter(|u| !u.is_empty()) else {
            return Ok(None);
        };
        let client = async_nats::ConnectOptions::new()
            .name("bursar")
            .retry_on_initial_connect()
            .connect(url)
            .await?;
        let js = jetstream::new(client.clone());
        Ok(Some(Arc::new(Link {
            client,
            js,
            prefix: config.subject_prefix.clone(),
            stream: config.stream_name(),
            duplicate_window: Duration::from_secs(config.duplicate_window_secs.max(1)),
            max_age: Duration::from_secs(config.max_age_secs),
            ready: OnceCell::new(),
        })))
    }

    /// The subject of an event: `<prefix>.events.<account>.<type>` (a type's dots are subject
    /// tokens, so `<prefix>.events.42.order.*` selects one account's order events).
    pub fn subject(&self, e: &LoggedEvent) -> String {
        format!("{}.events.{}.{}", self.prefix, e.account_id, e.event_type)
    }

    pub fn stream_name(&self) -> &str {
        &self.stream
    }

    pub fn jetstream(&self) -> &jetstream::Context {
        &self.js
    }

    async fn ensure_stream(&self) -> anyhow::Result<()> {
        self.ready
            .get_or_try_init(|| async {
                self.js
                    .get_or_create_stream(jetstream::stream::Config {
                        name: self.stream.clone(),
                        subjects: vec![format!("{}.events.>", self.prefix)],
                        duplicate_window: self.duplicate_window,
                        max_age: self.max_age,
                        ..Default::default()
                    })
                    .await
                    .map(|_| ())
                    .map_err(anyhow::Error::from)
            })
            .await
            .map(|_| ())
    }

    /// Publishes `events` and waits for every PubAck. A re-published event (same id, within
    /// the duplicate window) is acknowledged with `duplicate: true` and stored once.
    pub async fn publish(&self, events: &[LoggedEvent]) -> anyhow::Result<Vec<PublishAck>> {
        self.ensure_stream().await?;
        let mut pending: Vec<PublishAckFuture> = Vec::with_capacity(events.len());
        for e in events {
            let mut headers = HeaderMap::new();
            headers.insert(NATS_MESSAGE_ID, e.event_id.as_str());
            headers.insert("Bursar-Event-Type", e.event_type.as_str());
            headers.insert("Bursar-Seq", e.seq.to_string().as_str());
            headers.insert("Bursar-Request-Id", e.request_id.as_str());
            headers.insert("Bursar-Trace-Id", e.trace_id.as_str());
            pending.push(
                self.js
                    .publish_with_headers(self.subject(e), headers, e.body.clone().into())
                    .await?,
            );
        }
        let mut acks = Vec::with_capacity(pending.len());
        for ack in pending {
            acks.push(ack.await?);
        }
        Ok(acks)
    }
}

/// Publishes the backlog of sequenced, unpublished events until it is empty; returns how many
/// were published. Several instances may publish at once: a copy is dropped by the stream.
pub async fn publish_backlog(state: &AppState, link: &Link) -> anyhow::Result<usize> {
    let mut total = 0;
    loop {
        let batch = state.store.unpublished_events(BATCH).await?;
        if batch.is_empty() {
            return Ok(total);
        }
        link.publish(&batch).await?;
        let ids: Vec<String> = batch.iter().map(|e| e.event_id.clone()).collect();
        state.store.mark_published(&ids, state.clock.now()).await?;
        total += batch.len();
        if batch.len() < BATCH as usize {
            return Ok(total);
        }
    }
}

/// The publisher: woken by the relay, and every second regardless (a backlog left by a NATS
/// outage or another process). Runs until the task is dropped.
pub async fn run_publisher(state: AppState, link: Arc<Link>) {
    let mut failing = false;
    loop {
        match publish_backlog(&state, &link).await {
            Ok(_) => {
                if failing {
                    tracing::info!("publishing events to NATS recovered");
                    failing = false;
                }
            }
            Err(e) => {
                if !failing {
                    tracing::warn!(error = %e, "publishing events to NATS failed; they wait in the log and will be retried");
                    failing = true;
                }
            }
        }
        tokio::select! {
            () = state.live.sequenced.notified() => {}
            () = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
    }
}

/// Feeds this process's live hub from the subjects every instance publishes to. Runs until
/// the task is dropped; a lost subscription is re-made.
pub async fn run_subscriber(state: AppState, link: Arc<Link>) {
    let subject = format!("{}.events.>", link.prefix);
    loop {
        match link.client.subscribe(subject.clone()).await {
            Ok(mut messages) => {
                while let Some(m) = messages.next().await {
                    match LiveEvent::from_body(&m.payload) {
                        Some(e) => state.live.hub.publish(e),
                        None => {
                            tracing::warn!(subject = %m.subject, "ignoring a NATS message that is not a Bursar event")
                        }
                    }
                }
            }
            Err(e) => tracing::warn!(error = %e, "subscribing to NATS failed; will retry"),
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}
