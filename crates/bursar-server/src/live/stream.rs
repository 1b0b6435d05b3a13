//! One live subscription, shared by SSE and WebSocket: the resume algorithm of spec §2.4.
//!
//! 1. Subscribe to the live tail first, so nothing sequenced from now on is missed.
//! 2. Backfill `seq > after` from the log, in pages.
//! 3. Follow the tail, skipping `seq ≤ cursor` (already sent, or a second copy) and reading
//!    the log again whenever an event skips past `cursor + 1` (a hole: an event this process
//!    never saw live). `seq` is dense per account, so a hole is always visible.
//!
//! The cursor advances over every event of the account, matching the filter or not, so a
//! filtered subscriber resumes from the last `seq` it was sent without re-reading what it
//! already passed over. The pump runs as its own task and writes into a small bounded
//! channel: a client that stops reading blocks the pump, the broadcast then overruns it
//! (`Lagged`), and the subscription ends — memory stays bounded and the client resumes
//! from its last `seq`.

use std::sync::Arc;

use bursar_domain::AccountId;
use bursar_storage::Storage;
use bursar_storage::events::type_matches;
use tokio::sync::broadcast::error::RecvError;
use tokio::sync::{broadcast, mpsc};

use super::LiveEvent;
use crate::AppState;

/// Events read from the log per query.
const PAGE: u32 = 500;
/// Items queued between the pump and the connection.
const OUT_BUFFER: usize = 64;

/// What a subscription asks for.
#[derive(Debug, Clone)]
pub struct Subscription {
    pub account: AccountId,
    /// Event-type patterns (`*`, `order.*`, exact); empty means all.
    pub patterns: Vec<String>,
    /// Resume after this `seq`; `None` starts at the live head.
    pub after: Option<i64>,
}

/// What a subscription yields.
#[derive(Debug, Clone)]
pub enum Item {
    Event(Arc<LiveEvent>),
    /// The requested cursor is ahead of the account's log (a cursor from another database,
    /// or made up): the client should reload over REST. The stream continues after `head`.
    Reset {
        head: i64,
    },
}

/// Why a subscription ended (the channel closes right after).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum End {
    /// The client fell further behind than the broadcast buffer; it resumes from its cursor.
    Lagged,
    /// A log read failed; the client resumes from its cursor.
    Unavailable,
}

/// The receiving side of a subscription: items, then (if the pump ended on its own) why.
pub struct Feed {
    pub items: mpsc::Receiver<Item>,
    pub end: tokio::sync::oneshot::Receiver<End>,
}

/// Starts a subscription's pump. It ends when the feed is dropped, when the client lags, or
/// when the log cannot be read.
pub fn start(state: &AppState, sub: Subscription) -> Feed {
    let (tx, items) = mpsc::channel(OUT_BUFFER);
    let (end_tx, end) = tokio::sync::oneshot::channel();
    // Step 1: the tail, before anything is read from the log.
    let live = state.live.hub.subscribe();
    let store = state.store.clone();
    let closed = state.live.closed();
    tokio::spawn(async move {
        tokio::select! {
            ended = pump(store, sub, live, &tx) => {
                if let Err(why) = ended {
                    let _ = end_tx.send(why);
                }
            }
            () = closed => {}
        }
    });
    Feed { items, end }
}

/// `Ok` when the client went away; `Err` when the subscription had to end.
async fn pump(
    store: Arc<dyn Storage>,
    sub: Subscription,
    mut live: broadcast::Receiver<Arc<LiveEvent>>,
    tx: &mpsc::Sender<Item>,
) -> Result<(), End> {
    let mut cursor = match sub.after {
        Some(after) => {
            let head = head(&*store, sub.account).await?;
            if after > head {
                send(tx, Item::Reset { head }).await?;
                Some(head)
            } else {
                Some(backfill(&*store, &sub, after, tx).await?)
            }
        }
        None => None,
    };
    loop {
        let event = tokio::select! {
            () = tx.closed() => return Ok(()),
            got = live.recv() => match got {
                Ok(event) => event,
                Err(RecvError::Lagged(missed)) => {
                    tracing::info!(account = sub.account, missed, "live subscriber lagged; closing its stream");
                    return Err(End::Lagged);
                }
                Err(RecvError::Closed) => return Ok(()),
            },
        };
        if event.account_id != sub.account {
            continue;
        }
        if let Some(at) = cursor {
            if event.seq <= at {
                continue;
            }
            if event.seq > at + 1 {
                let filled = backfill(&*store, &sub, at, tx).await?;
                cursor = Some(filled);
                if event.seq <= filled {
                    continue;
                }
            }
        }
        cursor = Some(event.seq);
        if wanted(&sub, &event.event_type) {
            send(tx, Item::Event(event)).await?;
        }
    }
}

fn wanted(sub: &Subscription, event_type: &str) -> bool {
    sub.patterns.is_empty() || type_matches(&sub.patterns, event_type)
}

/// A closed channel means the client left; the pump stops, and the reason it reports goes
/// to nobody (the feed, with its end receiver, was dropped).
async fn send(tx: &mpsc::Sender<Item>, item: Item) -> Result<(), End> {
    tx.send(item).await.map_err(|_| End::Unavailable)
}

/// The account's newest `seq` (0 before its first event).
async fn head(store: &dyn Storage, account: AccountId) -> Result<i64, End> {
    let newest = store
        .list_events(
            account,
            &[],
            bursar_storage::PageRequest {
                limit: 1,
                starting_after: None,
            },
        )
        .await
        .map_err(unavailable)?;
    Ok(newest.first().map_or(0, |e| e.seq))
}

/// Sends the logged events after `after`; returns the last `seq` read.
async fn backfill(
    store: &dyn Storage,
    sub: &Subscription,
    mut after: i64,
    tx: &mpsc::Sender<Item>,
) -> Result<i64, End> {
    loop {
        let page = store
            .events_after(sub.account, after, &[], PAGE)
            .await
            .map_err(unavailable)?;
        for e in &page {
            after = e.seq;
            if wanted(sub, &e.event_type) {
                send(tx, Item::Event(Arc::new(LiveEvent::from(e)))).await?;
            }
        }
        if page.len() < PAGE as usize {
            return Ok(after);
        }
    }
}

fn unavailable(e: bursar_storage::StorageError) -> End {
    tracing::warn!(error = %e, "reading the event log for a live subscriber failed; closing its stream");
    End::Unavailable
}
