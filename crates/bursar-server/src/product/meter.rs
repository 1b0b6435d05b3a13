//! Usage metering without a database write on the hot path: requests are counted in memory
//! per (account, key, route class, UTC day) and written in batches (`ProductStore::add_usage`)
//! every `metering.flush_interval_ms`, and once more on shutdown. A failed flush keeps its
//! counts for the next one, so nothing counted is dropped while the process lives.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use bursar_domain::pricing::day_of;
use bursar_domain::{AccountId, Timestamp};
use bursar_storage::{Storage, UsageRow};

type Slot = (AccountId, i64, &'static str, i64);

/// Pending counts since the last flush: `(requests, latest request time)` per slot.
#[derive(Default)]
pub struct Meter {
    pending: Mutex<HashMap<Slot, (i64, i64)>>,
    /// One flush at a time, so counts taken out are written before the next batch is.
    flushing: tokio::sync::Mutex<()>,
}

impl Meter {
    /// Counts one billable request. A short lock on a small map; no I/O.
    pub fn record(&self, account: AccountId, key_id: i64, class: &'static str, at: Timestamp) {
        let slot = (account, key_id, class, day_of(at).0);
        let mut pending = self.pending.lock().expect("meter lock");
        let entry = pending.entry(slot).or_insert((0, at.0));
        entry.0 += 1;
        entry.1 = entry.1.max(at.0);
    }

    /// Writes what was counted; on failure the counts go back into the map.
    pub async fn flush(&self, store: &dyn Storage) -> bursar_storage::Result<usize> {
        let _one = self.flushing.lock().await;
        let taken = std::mem::take(&mut *self.pending.lock().expect("meter lock"));
        if taken.is_empty() {
            return Ok(0);
        }
        let rows: Vec<UsageRow> = taken
            .iter()
            .map(
                |(&(account_id, key_id, class, day), &(requests, last))| UsageRow {
                    account_id,
                    key_id,
                    route_class: class.to_owned(),
                    day: Timestamp(day),
                    requests,
                    last_at: Timestamp(last),
                },
            )
            .collect();
        match store.add_usage(&rows).await {
            Ok(()) => Ok(rows.len()),
            Err(e) => {
                let mut pending = self.pending.lock().expect("meter lock");
                for (slot, (n, last)) in taken {
                    let entry = pending.entry(slot).or_insert((0, last));
                    entry.0 += n;
                    entry.1 = entry.1.max(last);
                }
                Err(e)
            }
        }
    }

    /// Requests counted but not yet written.
    pub fn pending(&self) -> i64 {
        self.pending
            .lock()
            .expect("meter lock")
            .values()
            .map(|v| v.0)
            .sum()
    }
}

/// Flushes every `every` until the task is aborted; the caller flushes once more at shutdown.
pub async fn run(meter: Arc<Meter>, store: Arc<dyn Storage>, every: std::time::Duration) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        if let Err(e) = meter.flush(store.as_ref()).await {
            metrics::counter!("usage_flush_failures_total").increment(1);
            tracing::warn!(error = %e, "usage flush failed; the counts are kept for the next one");
        }
    }
}
