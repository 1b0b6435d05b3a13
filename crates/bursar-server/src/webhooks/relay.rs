//! The relay: sequences committed outbox rows (id, per-account `seq`, rendered body) and fans
//! them out to webhook deliveries in the same transaction (storage), then wakes the delivery
//! worker. Any number of relays may run against one database; the storage command
//! serialises them, so `seq` is handed out once and in commit order.

use crate::AppState;

/// Events sequenced per transaction.
const BATCH: u32 = 500;

/// A new public event id: `evt_` and a UUIDv7 (time-ordered, never contains `.`).
pub fn new_event_id() -> String {
    format!("evt_{}", uuid::Uuid::now_v7().simple())
}

/// One relay pass: how many events it sequenced.
pub async fn relay_once(state: &AppState) -> bursar_storage::Result<usize> {
    let events = state
        .store
        .sequence_events(BATCH, state.clock.now(), &new_event_id)
        .await?;
    if !events.is_empty() {
        state.webhooks.relayed.notify_waiters();
    }
    Ok(events.len())
}

/// Runs until the task is dropped; a failed pass is logged and retried after a pause.
pub async fn run(state: AppState) {
    let idle = state.webhooks.poll_interval();
    loop {
        match relay_once(&state).await {
            Ok(n) if n == BATCH as usize => continue,
            Ok(_) => tokio::time::sleep(idle).await,
            Err(e) => {
                tracing::warn!(error = %e, "event relay pass failed; will retry");
                tokio::time::sleep(idle * 20).await;
            }
        }
    }
}
