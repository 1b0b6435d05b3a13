//! Live streams (issue 5): SSE and WebSocket subscribers follow an account's events as they
//! are sequenced, resuming from the durable log by `seq`.
//!
//! One per-process [`Hub`] (a bounded `tokio::sync::broadcast`) carries every sequenced event
//! to every subscriber of this process. It is fed from two sides: the relay of this process
//! hands it what it just sequenced, and — with NATS configured — a core subscription to the
//! JetStream subjects brings in what every instance published (`nats`). The broadcast is only
//! the live tail: each subscription ([`stream`]) keeps a cursor (the last `seq` it examined),
//! backfills from the log on connect and whenever it sees a hole, and skips what it has
//! already seen. So copies (an event arriving from both sides) and gaps (a lost NATS message,
//! another instance's relay) cost a log read, never correctness; a subscriber too slow for
//! the broadcast's buffer is closed and resumes with its last `seq`.

pub mod keys;
pub mod nats;
pub mod stream;

use std::sync::Arc;

use bursar_domain::AccountId;
use bursar_storage::events::LoggedEvent;
use serde::Deserialize;
use tokio::sync::broadcast;

/// What a live subscriber needs of an event; the body is the logged one, byte for byte.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LiveEvent {
    pub account_id: AccountId,
    pub seq: i64,
    pub event_type: String,
    pub event_id: String,
    pub body: String,
}

impl From<&LoggedEvent> for LiveEvent {
    fn from(e: &LoggedEvent) -> Self {
        LiveEvent {
            account_id: e.account_id,
            seq: e.seq,
            event_type: e.event_type.clone(),
            event_id: e.event_id.clone(),
            body: e.body.clone(),
        }
    }
}

/// The envelope fields a live subscriber routes on (the body is `events::render_body`'s).
#[derive(Deserialize)]
struct Head {
    id: String,
    #[serde(rename = "type")]
    event_type: String,
    seq: i64,
    account_id: AccountId,
}

impl LiveEvent {
    /// Rebuilds the routing fields from a published body (a NATS message carries only it).
    pub fn from_body(body: &[u8]) -> Option<LiveEvent> {
        let text = std::str::from_utf8(body).ok()?;
        let head: Head = serde_json::from_str(text).ok()?;
        Some(LiveEvent {
            account_id: head.account_id,
            seq: head.seq,
            event_type: head.event_type,
            event_id: head.id,
            body: text.to_owned(),
        })
    }
}

/// The live side of a process: its tail, and the wake-up the relay gives the NATS publisher.
#[derive(Debug)]
pub struct Live {
    pub hub: Hub,
    /// One stored permit per relay pass that sequenced something, so a publisher busy at
    /// that moment still runs again at once.
    pub sequenced: tokio::sync::Notify,
    /// Turns true when the server shuts down: every live stream ends.
    closing: tokio::sync::watch::Sender<bool>,
    /// The API keys of this process's streams, checked once per key (`keys::run`).
    pub keys: Arc<keys::KeyWatch>,
}

impl Live {
    pub fn new(capacity: usize) -> Live {
        Live {
            hub: Hub::new(capacity),
            sequenced: tokio::sync::Notify::new(),
            closing: tokio::sync::watch::channel(false).0,
            keys: Arc::default(),
        }
    }

    /// Ends every live stream of this process (shutdown).
    pub fn close(&self) {
        self.closing.send_replace(true);
    }

    /// Resolves once [`Live::close`] was called.
    pub fn closed(&self) -> impl Future<Output = ()> + Send + 'static {
        let mut rx = self.closing.subscribe();
        async move {
            let _ = rx.wait_for(|closing| *closing).await;
        }
    }
}

/// The per-process live tail. Memory is bounded by its capacity: a receiver that falls that
/// far behind gets `Lagged` and its stream is closed.
#[derive(Debug, Clone)]
pub struct Hub {
    tx: broadcast::Sender<Arc<LiveEvent>>,
}

impl Hub {
    pub fn new(capacity: usize) -> Hub {
        Hub {
            tx: broadcast::channel(capacity.max(1)).0,
        }
    }

    /// Hands an event to every current subscriber; without subscribers it is dropped (the log
    /// has it).
    pub fn publish(&self, event: LiveEvent) {
        let _ = self.tx.send(Arc::new(event));
    }

    pub fn subscribe(&self) -> broadcast::Receiver<Arc<LiveEvent>> {
        self.tx.subscribe()
    }

    /// Live subscribers in this process (a gauge for operators and tests).
    pub fn subscribers(&self) -> usize {
        self.tx.receiver_count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_published_body_routes_by_its_envelope() {
        let body = br#"{"id":"evt_1","type":"order.created","timestamp":"2026-01-01T00:00:00.000Z","seq":7,"account_id":3,"request_id":"r","trace_id":"t","data":{}}"#;
        let e = LiveEvent::from_body(body).unwrap();
        assert_eq!((e.account_id, e.seq), (3, 7));
        assert_eq!(e.event_type, "order.created");
        assert_eq!(e.event_id, "evt_1");
        assert_eq!(e.body.as_bytes(), body);
        assert!(LiveEvent::from_body(b"not json").is_none());
        assert!(LiveEvent::from_body(br#"{"id":"evt_1"}"#).is_none());
    }
}
