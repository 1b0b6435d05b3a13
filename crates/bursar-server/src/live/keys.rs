//! Which API keys this process's live streams run under, and when one of them stops being
//! valid. Streams outlive the request that authenticated them, so their keys are checked again
//! — but once per *key* by one task of the process, not by every stream: thousands of streams
//! on a handful of keys cost a handful of checks, and a stream itself only waits (on this
//! broadcast and on its key's expiry), with no timer of its own.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use bursar_domain::{AccountId, Timestamp};
use tokio::sync::broadcast;

use crate::AppState;

/// How often the watch looks at this instance's tombstones (a revoke here or broadcast over
/// Redis): in memory, per watched key.
const TOMBSTONE_CHECK: Duration = Duration::from_millis(250);
/// How often it reads each watched key from the database, for what this instance did not hear
/// of (a revoke elsewhere without Redis or with a lost broadcast, a roll that shortened the
/// expiry): the key cache's lifetime, the bound requests have too.
const KEY_RECHECK: Duration = Duration::from_secs(5);

/// The keys streams of this process run under, and the broadcast of those that ended.
#[derive(Debug)]
pub struct KeyWatch {
    ended: broadcast::Sender<i64>,
    /// Key id → (its account, how many streams watch it).
    watched: Mutex<HashMap<i64, (AccountId, usize)>>,
}

impl Default for KeyWatch {
    fn default() -> Self {
        KeyWatch {
            ended: broadcast::channel(256).0,
            watched: Mutex::default(),
        }
    }
}

/// One stream's interest in its key; dropping it (the stream ended) stops the checks once no
/// stream uses the key.
pub struct Watching {
    watch: Arc<KeyWatch>,
    key_id: i64,
    ended: broadcast::Receiver<i64>,
}

impl Drop for Watching {
    fn drop(&mut self) {
        let mut watched = lock(&self.watch.watched);
        if let Some((_, n)) = watched.get_mut(&self.key_id) {
            *n -= 1;
            if *n == 0 {
                watched.remove(&self.key_id);
            }
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl KeyWatch {
    /// Registers a stream on `key_id` (subscribing before the first check can see it, so no
    /// ending is missed).
    pub fn watch(self: &Arc<Self>, account: AccountId, key_id: i64) -> Watching {
        let ended = self.ended.subscribe();
        lock(&self.watched).entry(key_id).or_insert((account, 0)).1 += 1;
        Watching {
            watch: Arc::clone(self),
            key_id,
            ended,
        }
    }

    /// The watched keys, for one round of checks.
    fn keys(&self) -> Vec<(i64, AccountId)> {
        lock(&self.watched)
            .iter()
            .map(|(&id, &(account, _))| (id, account))
            .collect()
    }
}

impl Watching {
    /// Resolves when the key is revoked, or expires (at `expires_at` as the stream's request
    /// saw it, or earlier if a roll shortened it).
    pub async fn ended(&mut self, state: &AppState, expires_at: Option<Timestamp>) {
        let until_expiry = expires_at.map(|t| {
            let ms = u64::try_from(t.0 - state.clock.now().0).unwrap_or(0);
            tokio::time::sleep(Duration::from_millis(ms))
        });
        let expiry = async {
            match until_expiry {
                Some(sleep) => sleep.await,
                None => std::future::pending().await,
            }
        };
        let mut expiry = std::pin::pin!(expiry);
        loop {
            tokio::select! {
                () = &mut expiry => return,
                id = self.ended.recv() => match id {
                    Ok(id) if id == self.key_id => return,
                    Ok(_) => {}
                    // Missed some endings: ours may have been one of them.
                    Err(broadcast::error::RecvError::Lagged(_)) => {
                        if state.product.is_tombstoned(self.key_id) {
                            return;
                        }
                    }
                    Err(broadcast::error::RecvError::Closed) => std::future::pending().await,
                },
            }
        }
    }
}

/// Checks every watched key: tombstones every `TOMBSTONE_CHECK`, the key's row every
/// `KEY_RECHECK` (a failed read keeps the key: the next round decides). Runs for the life of
/// the server.
pub async fn run(state: AppState) {
    let watch = state.live.keys.clone();
    let mut tick = tokio::time::interval(TOMBSTONE_CHECK);
    let mut read_at = tokio::time::Instant::now();
    loop {
        tick.tick().await;
        let read = read_at.elapsed() >= KEY_RECHECK;
        if read {
            read_at = tokio::time::Instant::now();
        }
        for (id, account) in watch.keys() {
            let ended = if state.product.is_tombstoned(id) {
                true
            } else if read {
                match state.store.get_api_key(account, id).await {
                    Ok(Some(key)) => {
                        key.revoked_at.is_some()
                            || key.expires_at.is_some_and(|t| t <= state.clock.now())
                    }
                    Ok(None) => true,
                    Err(e) => {
                        tracing::debug!(error = %e, key_id = id, "stream key re-check failed");
                        false
                    }
                }
            } else {
                false
            };
            if ended {
                let _ = watch.ended.send(id);
            }
        }
    }
}
