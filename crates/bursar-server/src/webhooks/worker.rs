//! The delivery worker: claims due deliveries under a lease (storage: `SKIP LOCKED` /
//! `BEGIN IMMEDIATE`), sends each outside any transaction, and completes it in one
//! transaction guarded by the lease token — so a worker that stalled past its lease writes
//! nothing but a `lease_lost` attempt. Any number of workers, in any number of processes.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bursar_domain::Timestamp;
use bursar_domain::webhook::{self, WebhookSecret};
use bursar_storage::StorageError;
use bursar_storage::events::{Attempt, ClaimedDelivery, Completion, Outcome};
use rand::RngExt;
use reqwest::StatusCode;
use reqwest::header::{HeaderMap, HeaderValue, RETRY_AFTER};
use tokio::sync::{Semaphore, mpsc, oneshot, watch};

use crate::AppState;
use crate::ssrf;

/// At most this much of a receiver's answer is kept.
pub const SNIPPET_BYTES: usize = 16 * 1024;
/// `Retry-After` is honoured up to this long.
const RETRY_AFTER_CAP: Duration = Duration::from_secs(24 * 3600);

/// How one send went.
#[derive(Debug)]
struct Sent {
    status: Option<StatusCode>,
    error_kind: Option<&'static str>,
    retry_after: Option<Duration>,
    snippet: Option<String>,
}

/// Runs until `stop` turns true; then claims nothing more, lets sends in flight finish for
/// up to `grace`, and hands back the leases of those that did not (due again at once).
pub async fn run(state: AppState, mut stop: watch::Receiver<bool>, grace: Duration) {
    let hooks = state.webhooks.clone();
    let slots = Arc::new(Semaphore::new(hooks.config.concurrency.max(1)));
    // The lease tokens of claims not done yet, each with the deliveries its slots hold but
    // have not sent: what a shutdown gives back or releases.
    let tokens: Arc<Mutex<HashMap<String, HashSet<i64>>>> = Arc::default();
    let idle = hooks.poll_interval();
    let depth = lease_ahead_depth(&hooks.config);
    // Ends by itself once the last send holding a sender has finished.
    let (completions, queued) = mpsc::unbounded_channel();
    // Fired after a recorded batch that ended a lease without handing it on: its endpoint
    // has room again. With more sends allowed than the endpoints' caps add up to, a claim can
    // come back empty while permits are free; it then waits for this, not only for new events
    // or the poll.
    let freed = Arc::new(tokio::sync::Notify::new());
    tokio::spawn(complete_batches(
        state.clone(),
        queued,
        freed.clone(),
        stop.clone(),
    ));
    while !*stop.borrow() {
        let free = slots.available_permits();
        if free == 0 {
            tokio::select! {
                _ = slots.acquire() => {}
                _ = stop.changed() => {}
            }
            continue;
        }
        let token = uuid::Uuid::new_v4().simple().to_string();
        let now = state.clock.now();
        let lease = hooks.lease();
        let lease_until = Timestamp(now.0 + millis(lease));
        let limit = u32::try_from(free.min(64)).unwrap_or(64);
        let started = Instant::now();
        let claimed = state
            .store
            .claim_ahead(now, lease_until, &token, limit, depth)
            .await;
        // Claims are serialised per endpoint (and, on SQLite, with every other write): their
        // latency is what a worker waits before it can send anything (`GET /metrics`).
        metrics::histogram!("webhook_claim_seconds").record(started.elapsed().as_secs_f64());
        let claimed = match claimed {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, "claiming webhook deliveries failed; will retry");
                tokio::time::sleep(idle * 20).await;
                continue;
            }
        };
        if claimed.is_empty() {
            tokio::select! {
                () = tokio::time::sleep(idle) => {}
                () = hooks.relayed.notified() => {}
                () = freed.notified() => {}
                _ = stop.changed() => {}
            }
            continue;
        }
        let ids = claimed.iter().map(|c| c.delivery_id).collect();
        lock(&tokens).insert(token.clone(), ids);
        let held = by_slot(claimed);
        let batch = Arc::new(BatchLease {
            token,
            left: std::sync::atomic::AtomicUsize::new(held.len()),
            tokens: tokens.clone(),
        });
        for held in held {
            let permit = slots
                .clone()
                .acquire_owned()
                .await
                .expect("the semaphore is never closed");
            let (state, batch, completions) = (state.clone(), batch.clone(), completions.clone());
            let stop = stop.clone();
            tokio::spawn(async move {
                let held = held.into_iter().map(|c| (c, started + lease)).collect();
                let slot = Slot {
                    state: &state,
                    batch: &batch,
                    completions: &completions,
                    stop: &stop,
                    ahead: depth > 1,
                };
                slot.run(held).await;
                batch.done();
                drop(permit);
            });
        }
    }
    let all = u32::try_from(hooks.config.concurrency.max(1)).unwrap_or(u32::MAX);
    if tokio::time::timeout(grace, slots.acquire_many(all))
        .await
        .is_err()
    {
        let left: Vec<(String, HashSet<i64>)> = lock(&tokens)
            .iter()
            .map(|(t, held)| (t.clone(), held.clone()))
            .collect();
        for (token, held) in left {
            // What slots held ahead and never sent goes back as it was, its attempt not
            // counted; then what is still leased (sends cut off by the grace) lapses now.
            let ids: Vec<i64> = held.into_iter().collect();
            give_back(&state, &token, &ids).await;
            match state
                .store
                .release_deliveries(&token, state.clock.now())
                .await
            {
                Ok(n) => tracing::info!(released = n, "released unfinished webhook deliveries"),
                Err(e) => tracing::warn!(error = %e, "releasing webhook leases failed"),
            }
        }
    }
}

/// How many deliveries a slot leases ahead: two where the lease outlasts three sends that
/// time out (the one in flight, the one held behind it, and a margin for its record), so a
/// delivery held ahead is never sent on a lease about to lapse; otherwise one.
fn lease_ahead_depth(config: &crate::config::WebhooksConfig) -> u32 {
    if config.lease_secs.saturating_mul(1000) >= config.timeout_ms.saturating_mul(3) {
        2
    } else {
        1
    }
}

/// A claim's deliveries by slot, in the claim's order (oldest due first): those of one slot
/// of an endpoint together, a delivery without a slot alone.
fn by_slot(claimed: Vec<ClaimedDelivery>) -> Vec<Vec<ClaimedDelivery>> {
    let mut slots: Vec<Vec<ClaimedDelivery>> = Vec::new();
    let mut at: HashMap<(i64, i64), usize> = HashMap::new();
    for c in claimed {
        match c.slot.and_then(|s| at.get(&(c.endpoint_id, s)).copied()) {
            Some(i) => slots[i].push(c),
            None => {
                if let Some(s) = c.slot {
                    at.insert((c.endpoint_id, s), slots.len());
                }
                slots.push(vec![c]);
            }
        }
    }
    slots
}

/// The lease token of one claim, forgotten once all its slots (and the deliveries handed on
/// to them) are done.
struct BatchLease {
    token: String,
    left: std::sync::atomic::AtomicUsize,
    tokens: Arc<Mutex<HashMap<String, HashSet<i64>>>>,
}

impl BatchLease {
    fn done(&self) {
        if self.left.fetch_sub(1, std::sync::atomic::Ordering::AcqRel) == 1 {
            lock(&self.tokens).remove(&self.token);
        }
    }

    /// Whether a slot of this claim holds `id` unsent (`true`) or has sent or given it back.
    fn holds(&self, id: i64, unsent: bool) {
        if let Some(held) = lock(&self.tokens).get_mut(&self.token) {
            if unsent {
                held.insert(id);
            } else {
                held.remove(&id);
            }
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

/// Whether an attempt's lease was still held when it was recorded, and the delivery its
/// completion handed the lease on to, if any, with when that lease lapses.
type Recorded = (bool, Option<(ClaimedDelivery, Instant)>);

/// A finished attempt waiting to be recorded, when its lease lapses (this process's clock:
/// past it the delivery is sent again, so recording is worth trying until then), and who
/// waits for the answer.
type Done = (
    Completion,
    Instant,
    oneshot::Sender<bursar_storage::Result<Recorded>>,
);

/// At most this many attempts are recorded in one transaction.
const COMPLETION_BATCH: usize = 64;

/// Records finished attempts in batches: whatever finished while the previous batch was being
/// committed goes in the next one, one transaction for all (`complete_and_hand_on`), so the
/// database does one commit per batch instead of one per delivery. A lone attempt goes at once.
/// Until `stop`, a held success may hand its lease on to its endpoint's next due delivery,
/// which its sender then sends without waiting for a claim.
/// If a batch fails for another reason than a busy database, each attempt is recorded on its
/// own, so one bad completion cannot hold back the others. An attempt the database still does
/// not take after the quick retries is handed to [`record_until`], off this loop.
async fn complete_batches(
    state: AppState,
    mut queued: mpsc::UnboundedReceiver<Done>,
    freed: Arc<tokio::sync::Notify>,
    stop: watch::Receiver<bool>,
) {
    let lease = state.webhooks.lease();
    let mut batch = Vec::with_capacity(COMPLETION_BATCH);
    while queued.recv_many(&mut batch, COMPLETION_BATCH).await > 0 {
        metrics::histogram!("webhook_record_batch_size")
            .record(u32::try_from(batch.len()).unwrap_or(u32::MAX));
        let (cs, waiting): (Vec<Completion>, Vec<_>) = batch
            .drain(..)
            .map(|(c, lapses, reply)| (c, (lapses, reply)))
            .unzip();
        // Before any try, so the process's idea of a handed-on lease ends no later than the
        // database's.
        let asked = Instant::now();
        let result = retrying(|| {
            let now = state.clock.now();
            let hand_on_until = (!*stop.borrow()).then(|| Timestamp(now.0 + millis(lease)));
            state
                .store
                .complete_and_hand_on(cs.clone(), now, hand_on_until)
        })
        .await;
        // Whether an endpoint may have room it did not have before the batch. Each lease
        // handed on ends one and starts one, so a batch that handed every lease on freed no
        // room, and a claim now (most of a backlog's claims, measured) would come back empty.
        let mut room = true;
        match result {
            Ok(held) => {
                // How often a send followed another without a claim (`GET /metrics`).
                let handed = held.iter().filter(|(_, next)| next.is_some()).count();
                metrics::counter!("webhook_handed_on_total").increment(handed as u64);
                room = handed < held.len();
                for ((_, reply), (held, next)) in waiting.into_iter().zip(held) {
                    let done = (held, next.map(|n| (n, asked + lease)));
                    if let Err(Ok((_, Some((next, _))))) = reply.send(Ok(done)) {
                        // Its sender is gone (only at shutdown): the lease lapses and the
                        // delivery is claimed again.
                        tracing::warn!(
                            delivery_id = next.delivery_id,
                            "a delivery handed on had no sender; it is sent once its lease lapses"
                        );
                    }
                }
            }
            Err(StorageError::Unavailable(_)) => {
                for (c, (lapses, reply)) in cs.into_iter().zip(waiting) {
                    let state = state.clone();
                    tokio::spawn(async move {
                        let _ =
                            reply.send(record_until(&state, c, lapses).await.map(|h| (h, None)));
                    });
                }
            }
            Err(_) => {
                for (c, (lapses, reply)) in cs.into_iter().zip(waiting) {
                    let _ = reply.send(record_one(&state, c, lapses).await.map(|h| (h, None)));
                }
            }
        }
        if room {
            freed.notify_one();
        }
    }
}

/// Records one attempt: the quick retries, then [`record_until`] if the database is still
/// unavailable.
async fn record_one(
    state: &AppState,
    c: Completion,
    lapses: Instant,
) -> bursar_storage::Result<bool> {
    match retrying(|| state.store.complete_delivery(c.clone(), state.clock.now())).await {
        Err(StorageError::Unavailable(_)) => record_until(state, c, lapses).await,
        recorded => recorded,
    }
}

/// Runs `call` again while the database is briefly busy (SQLite's lock, a saturated pool), up
/// to 6 more times with doubling waits from 50 ms. Completions are fenced by their lease token,
/// so trying one again is safe.
async fn retrying<T, F, Fut>(mut call: F) -> bursar_storage::Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bursar_storage::Result<T>>,
{
    let mut wait = Duration::from_millis(50);
    let mut result = call().await;
    for _ in 0..6 {
        if !matches!(result, Err(StorageError::Unavailable(_))) {
            break;
        }
        tokio::time::sleep(wait).await;
        wait *= 2;
        result = call().await;
    }
    result
}

/// One slot of an endpoint: sends the deliveries it holds one after the other, never two at
/// once, so the endpoint's cap (which counts slots) bounds the requests in flight to it.
struct Slot<'a> {
    state: &'a AppState,
    batch: &'a BatchLease,
    completions: &'a mpsc::UnboundedSender<Done>,
    stop: &'a watch::Receiver<bool>,
    /// Whether the slot may send a delivery it holds while an earlier one's attempt is still
    /// being recorded (`EventLogStore::claim_ahead`).
    ahead: bool,
}

/// An attempt queued for its record.
struct Pending {
    answer: oneshot::Receiver<bursar_storage::Result<Recorded>>,
    queued: Instant,
    delivery_id: i64,
    attempt: i64,
}

impl Slot<'_> {
    /// Sends what the slot holds, and what completions hand on to it, until it holds nothing,
    /// the worker stops, a held delivery's lease could lapse during its send, or a send
    /// fails. After a success it sends its next held delivery at once, while the success is
    /// recorded. After a failure it waits for every record and sends nothing more: the
    /// failure may have opened the circuit or, a 410, disabled the endpoint, and the next
    /// claim decides by the endpoint's health whether and when to send again. What it held
    /// and did not send is given back once every record is in (cancelled if the endpoint
    /// answered 410).
    async fn run(&self, mut held: std::collections::VecDeque<(ClaimedDelivery, Instant)>) {
        let timeout = Duration::from_millis(self.state.webhooks.config.timeout_ms);
        let mut pending: std::collections::VecDeque<Pending> = std::collections::VecDeque::new();
        loop {
            let sendable = held.front().is_some_and(|(_, lapses)| {
                !*self.stop.borrow() && may_send(self.ahead, Instant::now(), timeout, *lapses)
            });
            if sendable && let Some((c, lapses)) = held.pop_front() {
                self.batch.holds(c.delivery_id, false);
                let (done, succeeded) = attempt(self.state, &c, &self.batch.token).await;
                pending.push_back(self.queue(done, lapses, &c));
                if succeeded {
                    continue;
                }
                while let Some(p) = pending.pop_front() {
                    self.take(&mut held, p).await;
                }
                break;
            } else if let Some(p) = pending.pop_front() {
                self.take(&mut held, p).await;
            } else {
                break;
            }
        }
        let ids: Vec<i64> = held.iter().map(|(c, _)| c.delivery_id).collect();
        if give_back(self.state, &self.batch.token, &ids).await {
            ids.iter().for_each(|id| self.batch.holds(*id, false));
        }
    }

    /// Waits for a queued record and holds what its completion handed on.
    async fn take(
        &self,
        held: &mut std::collections::VecDeque<(ClaimedDelivery, Instant)>,
        pending: Pending,
    ) {
        if let Some((next, lapses)) = self.recorded(pending).await {
            self.batch.holds(next.delivery_id, true);
            held.push_back((next, lapses));
        }
    }

    /// Hands a finished attempt to the completion task (or, once that has ended, records it
    /// here); the answer comes through the returned receiver.
    fn queue(&self, done: Completion, lapses: Instant, c: &ClaimedDelivery) -> Pending {
        // A database that is briefly busy must not strand a sent delivery until its lease
        // lapses — that would send it a second time — hence the retries in
        // `complete_batches`, and then `record_until` for an outage that outlasts them.
        let (reply, answer) = oneshot::channel();
        if let Err(mpsc::error::SendError((done, lapses, reply))) =
            self.completions.send((done, lapses, reply))
        {
            let state = self.state.clone();
            tokio::spawn(async move {
                let _ = reply.send(record_one(&state, done, lapses).await.map(|h| (h, None)));
            });
        }
        Pending {
            answer,
            queued: Instant::now(),
            delivery_id: c.delivery_id,
            attempt: c.attempt_no,
        }
    }

    /// Waits for a queued attempt's record; returns the delivery its completion handed the
    /// lease on to, with when that lease lapses.
    async fn recorded(&self, pending: Pending) -> Option<(ClaimedDelivery, Instant)> {
        let Pending {
            answer,
            queued,
            delivery_id,
            attempt,
        } = pending;
        let result = answer.await.unwrap_or_else(|_| {
            Err(StorageError::Unavailable(
                "the completion task ended".into(),
            ))
        });
        // How long a sent delivery waits for its record (and for the delivery handed on to
        // it): with the send, one turn of a slot that holds nothing ahead (`GET /metrics`).
        metrics::histogram!("webhook_record_wait_seconds").record(queued.elapsed());
        match result {
            Ok((true, next)) => return next,
            Ok((false, _)) => tracing::warn!(
                delivery_id,
                attempt,
                "webhook lease lost before the attempt was recorded"
            ),
            Err(e) => tracing::warn!(
                delivery_id,
                error = %e,
                "recording a webhook attempt failed; the lease will lapse and it is sent again"
            ),
        }
        None
    }
}

/// Gives back deliveries leased under `token` and never sent (`EventLogStore::return_unsent`);
/// whether that was done. Nothing to give back is done at once. On failure their leases
/// lapse instead, and they are sent when a claim takes them again.
async fn give_back(state: &AppState, token: &str, ids: &[i64]) -> bool {
    if ids.is_empty() {
        return true;
    }
    match state
        .store
        .return_unsent(token, ids, state.clock.now())
        .await
    {
        Ok(_) => true,
        Err(e) => {
            tracing::warn!(
                error = %e,
                "giving back unsent webhook deliveries failed; their leases lapse"
            );
            false
        }
    }
}

/// Whether a slot may send a delivery it holds, leased until `lapses`. A slot that leases
/// ahead holds a delivery while others are sent and recorded, which can take long (a send
/// that times out, a record kept trying through a database outage), so it sends one only
/// while the lease outlasts a send: past it, another worker may have taken the delivery over.
/// Without leasing ahead, a delivery is sent as soon as it is claimed or handed on, on a lease
/// just taken.
fn may_send(ahead: bool, now: Instant, timeout: Duration, lapses: Instant) -> bool {
    !ahead || now + timeout < lapses
}

/// Sends one claimed delivery; returns its completion and whether it succeeded.
async fn attempt(state: &AppState, c: &ClaimedDelivery, token: &str) -> (Completion, bool) {
    let started = Instant::now();
    let at = state.clock.now();
    let sent = match signed_request(state, c, at) {
        Ok(headers) => send(state, c, headers).await,
        Err(kind) => Sent {
            status: None,
            error_kind: Some(kind),
            retry_after: None,
            snippet: None,
        },
    };
    let outcome = outcome(state, c, &sent);
    let attempt = Attempt {
        id: 0,
        delivery_id: c.delivery_id,
        attempt_no: c.attempt_no,
        status_code: sent.status.map(|s| i64::from(s.as_u16())),
        duration_ms: millis(started.elapsed()),
        error_kind: sent.error_kind.map(str::to_owned),
        response_snippet: sent.snippet,
        created_at: at,
    };
    let done = Completion {
        delivery_id: c.delivery_id,
        lease_token: token.to_owned(),
        attempt,
        outcome,
        policy: state.webhooks.config.health_policy(),
    };
    (done, outcome == Outcome::Succeeded)
}

/// Keeps recording an attempt the database would not take, waiting longer each time (up to
/// 5 s), for as long as the delivery's lease lasts: a database restart or a long lock must
/// not make the worker send a delivered event again. Past the lease the delivery is due
/// again anyway, and a late record would be fenced.
async fn record_until(
    state: &AppState,
    done: Completion,
    lapses: Instant,
) -> bursar_storage::Result<bool> {
    let mut wait = Duration::from_millis(250);
    loop {
        if Instant::now() + wait >= lapses {
            return Err(StorageError::Unavailable(
                "the database did not take the attempt while the lease lasted".into(),
            ));
        }
        tokio::time::sleep(wait).await;
        match state
            .store
            .complete_delivery(done.clone(), state.clock.now())
            .await
        {
            Err(StorageError::Unavailable(_)) => wait = (wait * 2).min(Duration::from_secs(5)),
            recorded => return recorded,
        }
    }
}

/// The delivery's headers, signed now; `Err(kind)` when it cannot be sent at all.
fn signed_request(
    state: &AppState,
    c: &ClaimedDelivery,
    at: Timestamp,
) -> Result<HeaderMap, &'static str> {
    let hooks = &state.webhooks;
    let open = |sealed: &str| {
        let clear = hooks.secrets.open(sealed).ok()?;
        WebhookSecret::parse(&clear).ok()
    };
    let Some(current) = open(&c.secret_enc) else {
        tracing::error!(
            endpoint_id = c.endpoint_id,
            "a webhook secret could not be opened; is webhooks.encryption_key the one it was sealed with?"
        );
        return Err("secret");
    };
    let previous = c
        .previous_secret_enc
        .as_deref()
        .filter(|_| c.previous_secret_expires_at.is_some_and(|t| t > at))
        .and_then(open);
    let body = c.body.as_bytes();
    let ts = at.0.div_euclid(1000);
    let mut keys = vec![&current];
    keys.extend(previous.as_ref());
    let mut h = HeaderMap::new();
    let mut put = |name: &'static str, value: String| {
        if let Ok(v) = HeaderValue::from_str(&value) {
            h.insert(name, v);
        }
    };
    put("content-type", "application/json".into());
    put(webhook::HEADER_ID, c.event_id.clone());
    put(webhook::HEADER_TIMESTAMP, ts.to_string());
    put(
        webhook::HEADER_SIGNATURE,
        webhook::signature_header(&keys, &c.event_id, ts, body),
    );
    put(
        webhook::HEADER_HEX_SIGNATURE,
        webhook::sign_hex(current.as_str(), body),
    );
    if let Some(prev) = &previous {
        put(
            webhook::HEADER_HEX_SIGNATURE_PREVIOUS,
            webhook::sign_hex(prev.as_str(), body),
        );
    }
    put(
        "x-bursar-delivery-id",
        format!("dlv_{}_{}", c.delivery_id, c.attempt_no),
    );
    put("x-request-id", c.request_id.clone());
    if c.trace_id.len() == 32 {
        let span: u64 = rand::rng().random();
        put("traceparent", format!("00-{}-{span:016x}-01", c.trace_id));
    }
    Ok(h)
}

async fn send(state: &AppState, c: &ClaimedDelivery, headers: HeaderMap) -> Sent {
    let hooks = &state.webhooks;
    let failed = |kind| Sent {
        status: None,
        error_kind: Some(kind),
        retry_after: None,
        snippet: None,
    };
    let Ok(url) = reqwest::Url::parse(&c.url) else {
        return failed("connect");
    };
    // IP literals never reach the guarded resolver: check them here, at every send.
    if let Err(p) = ssrf::check_url(&hooks.policy, &url) {
        return failed(if p.kind() == "blocked_ip" {
            "blocked_ip"
        } else {
            "connect"
        });
    }
    let req = hooks.client.post(url).headers(headers).body(c.body.clone());
    let mut resp = match req.send().await {
        Ok(r) => r,
        Err(e) => return failed(error_kind(&e)),
    };
    let status = resp.status();
    let retry_after = resp
        .headers()
        .get(RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| parse_retry_after(v, state.clock.now()));
    let mut snippet = Vec::new();
    let mut kind = None;
    loop {
        match resp.chunk().await {
            Ok(Some(chunk)) => {
                let room = SNIPPET_BYTES - snippet.len();
                snippet.extend_from_slice(&chunk[..chunk.len().min(room)]);
                if snippet.len() >= SNIPPET_BYTES {
                    break;
                }
            }
            Ok(None) => break,
            Err(e) => {
                if e.is_timeout() {
                    kind = Some("timeout");
                }
                break;
            }
        }
    }
    Sent {
        status: Some(status),
        error_kind: kind.or((!status.is_success()).then_some("http_status")),
        retry_after,
        snippet: Some(String::from_utf8_lossy(&snippet).into_owned()),
    }
}

/// The spec's error kinds for a request that got no answer. reqwest does not type TLS
/// failures, so they are recognised by their description (untested: no TLS receiver here).
fn error_kind(e: &reqwest::Error) -> &'static str {
    if ssrf::is_blocked(e) {
        "blocked_ip"
    } else if e.is_timeout() {
        "timeout"
    } else if is_tls(e) {
        "tls"
    } else {
        "connect"
    }
}

/// Whether a rustls error is anywhere in the chain, so a URL that merely contains "tls" is
/// not mistaken for a handshake failure. An `io::Error` wrapping another error reports that
/// error's *source* as its own, so the wrapped error itself is followed explicitly.
fn is_tls(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut next = Some(e);
    while let Some(err) = next {
        if err.is::<rustls::Error>() {
            return true;
        }
        next = match err
            .downcast_ref::<std::io::Error>()
            .and_then(|io| io.get_ref())
        {
            Some(wrapped) => Some(wrapped as &(dyn std::error::Error + 'static)),
            None => err.source(),
        };
    }
    false
}

/// `Retry-After` as delay-seconds or an HTTP date; garbage is ignored.
fn parse_retry_after(v: &str, now: Timestamp) -> Option<Duration> {
    if let Ok(secs) = v.trim().parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let at = chrono::DateTime::parse_from_rfc2822(v.trim()).ok()?;
    let ms = at.timestamp_millis() - now.0;
    Some(Duration::from_millis(u64::try_from(ms).unwrap_or(0)))
}

/// What this attempt means for the delivery: the answer handling of spec §2.2.
fn outcome(state: &AppState, c: &ClaimedDelivery, sent: &Sent) -> Outcome {
    match sent.status {
        Some(s) if s.is_success() && sent.error_kind.is_none() => return Outcome::Succeeded,
        Some(StatusCode::GONE) => return Outcome::Gone,
        _ => {}
    }
    let cfg = &state.webhooks.config;
    let Some(base) = usize::try_from(c.attempt_no - 1)
        .ok()
        .and_then(|i| cfg.schedule_secs.get(i))
    else {
        return Outcome::Exhausted;
    };
    let jitter: u64 = rand::rng().random_range(800..=1200);
    let mut delay = Duration::from_millis(base.saturating_mul(jitter));
    let overloaded = sent.error_kind == Some("timeout")
        || matches!(
            sent.status,
            Some(
                StatusCode::TOO_MANY_REQUESTS
                    | StatusCode::BAD_GATEWAY
                    | StatusCode::GATEWAY_TIMEOUT
            )
        );
    if overloaded {
        delay = delay.max(Duration::from_secs(cfg.overload_floor_secs));
    }
    if let Some(after) = sent.retry_after {
        delay = delay.max(after.min(RETRY_AFTER_CAP));
    }
    Outcome::Retry(Timestamp(state.clock.now().0 + millis(delay)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_delivery_held_ahead_is_sent_only_while_its_lease_outlasts_a_send() {
        let now = Instant::now();
        let timeout = Duration::from_secs(15);
        assert!(may_send(true, now, timeout, now + Duration::from_secs(16)));
        assert!(!may_send(true, now, timeout, now + Duration::from_secs(15)));
        // A record that failed long after the claim leaves nothing pending, and the lease
        // held ahead may already have lapsed: it is not sent.
        assert!(!may_send(true, now + Duration::from_secs(89), timeout, now));
        assert!(may_send(false, now, timeout, now));
    }

    #[test]
    fn retry_after_takes_seconds_or_a_date_and_ignores_garbage() {
        let now = Timestamp(1_700_000_000_000);
        assert_eq!(
            parse_retry_after("120", now),
            Some(Duration::from_secs(120))
        );
        assert_eq!(
            parse_retry_after("Tue, 14 Nov 2023 22:15:20 GMT", now),
            Some(Duration::from_secs(120))
        );
        assert_eq!(parse_retry_after("soon", now), None);
    }
}
