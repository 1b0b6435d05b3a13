//! The relay: sequences committed outbox rows (id, per-account `seq`, rendered body) and fans
//! them out to webhook deliveries in the same transaction (storage), then wakes the delivery
//! worker, hands the events to this process's live subscribers and wakes the NATS publisher. Any number of relays may run against one database; the storage command
//! serialises them, so `seq` is handed out once and in commit order.

use bursar_storage::events::EventRenderer;
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::AppState;
use crate::http::render;
use crate::live::LiveEvent;

/// Events sequenced per transaction.
const BATCH: u32 = 500;

/// A new public event id: `evt_` and a UUIDv7 (time-ordered, never contains `.`).
pub fn new_event_id() -> String {
    format!("evt_{}", uuid::Uuid::now_v7().simple())
}

/// Events as the public sees them: `evt_` ids, and `data.object` in the form the API serves
/// the resource in (decimal amounts, RFC 3339 times), not the storage snapshot — so a webhook,
/// an SSE frame and `GET /api/orders/{id}` describe an order the same way.
pub struct PublicEvents;

impl EventRenderer for PublicEvents {
    fn new_id(&self) -> String {
        new_event_id()
    }

    fn object(&self, aggregate_type: &str, payload: &str) -> Option<String> {
        fn api<R: DeserializeOwned, A: Serialize>(payload: &str, f: fn(&R) -> A) -> Option<String> {
            let record: R = serde_json::from_str(payload).ok()?;
            serde_json::to_string(&f(&record)).ok()
        }
        let object = match aggregate_type {
            "customer" => api(payload, render::customer),
            "order" => api(payload, render::order),
            "payment" => api(payload, render::payment),
            "refund" => api(payload, render::refund),
            "conversion" => api(payload, render::conversion),
            // Operational events (`webhook.*`) are written in their public form already.
            _ => return None,
        };
        if object.is_none() {
            tracing::error!(
                aggregate_type,
                "an event snapshot did not parse; it is sent as stored"
            );
        }
        object
    }
}

/// One relay pass: how many events it sequenced.
pub async fn relay_once(state: &AppState) -> bursar_storage::Result<usize> {
    // Without NATS the broadcast below is the publication: the sequencing transaction marks
    // the events published, which keeps the backlog (and its metric) meaning "not yet handed
    // on" without a second write per pass.
    let published = state.nats.is_none();
    let events = state
        .store
        .sequence_events(BATCH, state.clock.now(), &PublicEvents, published)
        .await?;
    if events.is_empty() {
        return Ok(0);
    }
    state.webhooks.relayed.notify_waiters();
    // This process's live subscribers get them now; other instances through NATS.
    for e in &events {
        state.live.hub.publish(LiveEvent::from(e));
    }
    if !published {
        state.live.sequenced.notify_one();
    }
    Ok(events.len())
}

/// How long the relay waits after a wake-up before its pass, by backend.
///
/// SQLite: 12 ms, so that under a stream of writes its passes come at most about that often.
/// Each pass holds SQLite's one writer, which payments and creates need too, and a pass per
/// write would take it from them (5 ms cost 7–17 % of creates and payments, measured).
///
/// PostgreSQL: none. Passes there take no lock a request needs, and once the worker's
/// completions were planned once per session (`completion_sessions` in the PostgreSQL store)
/// the worker had room for the CPU that more, smaller passes take. At 500 events/s the
/// event then waits 3 ms for its pass instead of about 35, and each pass hands the worker a
/// smaller burst (docs/PERFORMANCE.md).
fn wake_floor(backend: &str) -> std::time::Duration {
    match backend {
        "sqlite" => std::time::Duration::from_millis(12),
        _ => std::time::Duration::ZERO,
    }
}

/// Middleware: a successful write request (`POST`, `PATCH`, `DELETE` …) may have committed
/// events; it wakes this process's relay, which otherwise finds them at its next poll. Events
/// committed elsewhere (another instance, the completer, the worker) wait for the poll.
pub async fn wake_on_write(
    axum::extract::State(state): axum::extract::State<AppState>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    let writes = !req.method().is_safe();
    let resp = next.run(req).await;
    if writes && resp.status().is_success() {
        state.webhooks.committed.notify_one();
    }
    resp
}

/// Runs until the task is dropped; a failed pass is logged and retried after a pause. Between
/// passes it waits for the poll interval or, sooner, for a write of this process
/// ([`wake_on_write`]).
pub async fn run(state: AppState) {
    let idle = state.webhooks.poll_interval();
    let floor = wake_floor(state.store.backend()).min(idle);
    loop {
        match relay_once(&state).await {
            Ok(n) if n == BATCH as usize => continue,
            Ok(_) => {
                tokio::select! {
                    () = tokio::time::sleep(idle) => {}
                    () = state.webhooks.committed.notified() => {
                        if !floor.is_zero() {
                            tokio::time::sleep(floor).await;
                        }
                    }
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "event relay pass failed; will retry");
                tokio::time::sleep(idle * 20).await;
            }
        }
    }
}
