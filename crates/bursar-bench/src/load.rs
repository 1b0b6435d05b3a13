//! Fixed-concurrency closed-loop load against one target, and the latency statistics.
//!
//! Closed loop (each task waits for its answer before sending the next request) because that is
//! what a pool of API clients does, and it cannot overload the target into measuring its queue.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use axum::body::Bytes;
use reqwest::header::{AUTHORIZATION, CONTENT_TYPE};
use reqwest::{Client, RequestBuilder};
use serde_json::Value;

use crate::costs::{Cost, Meter};

/// How the load generator talks to one server (the baseline or Bursar).
pub struct Target {
    pub name: &'static str,
    client: Client,
    /// `http://127.0.0.1:PORT/…/orders`: creates POST here, gets GET `{orders_url}/{id}`.
    orders_url: String,
    /// `…/payments` beside the orders: payments POST here, captures to `{payments_url}/{id}/capture`.
    payments_url: String,
    /// Full `Authorization` header value, if the target wants one.
    auth: Option<String>,
    /// Body of every create; built once so the client does no per-request work.
    create_body: Bytes,
    /// Its payments never read the order (the ceiling's): a pay phase needs no supply of
    /// pending orders and sends made-up order ids.
    pub any_order: bool,
    /// What its measured windows cost is read here, if anywhere (Bursar's targets).
    pub meter: Option<Arc<Meter>>,
}

impl Target {
    /// The baseline's hello-world route, beside its orders.
    fn hello_url(&self) -> String {
        self.orders_url.replace("/orders", "/hello")
    }

    /// Another route of the same API, beside the orders: `api("/events")`.
    pub fn api(&self, path: &str) -> String {
        self.orders_url.replace("/orders", path)
    }

    /// A URL of the same server outside the API (`/metrics`); Bursar targets only.
    pub fn server(&self, path: &str) -> String {
        self.orders_url.replace("/api/orders", path)
    }

    pub fn client(&self) -> &Client {
        &self.client
    }

    pub fn new(
        name: &'static str,
        client: &Client,
        orders_url: String,
        auth: Option<String>,
        create_body: String,
    ) -> Target {
        let (client, create_body) = (client.clone(), create_body.into());
        let payments_url = orders_url.replace("/orders", "/payments");
        Target {
            name,
            client,
            orders_url,
            payments_url,
            auth,
            create_body,
            any_order: false,
            meter: None,
        }
    }

    /// A JSON POST, under `key` if any.
    fn post(
        &self,
        url: &str,
        body: impl Into<reqwest::Body>,
        key: Option<String>,
    ) -> RequestBuilder {
        let req = self.client.post(url);
        let req = req.header(CONTENT_TYPE, "application/json").body(body);
        match key {
            Some(key) => req.header("idempotency-key", key),
            None => req,
        }
    }

    /// Adds the `Authorization` header, if the target wants one.
    pub fn authed(&self, req: RequestBuilder) -> RequestBuilder {
        match &self.auth {
            Some(auth) => req.header(AUTHORIZATION, auth),
            None => req,
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// POST a new order (optionally under an `Idempotency-Key`, see [`Keys`]).
    Create,
    /// GET an order created earlier.
    Get,
    /// GET the baseline's hello-world route: the floor of any HTTP handler.
    Hello,
    /// Pay a pending order created earlier, capturing the full amount (see [`PayFlow`]).
    Pay(PayFlow),
}

/// How a pay op captures.
#[derive(Clone, Copy, PartialEq, Eq, Debug, clap::ValueEnum)]
pub enum PayFlow {
    /// `POST /api/payments` (capture false), then `POST /api/payments/{id}/capture`: one op,
    /// two requests (and two processor calls); a failure of either fails it.
    TwoStep,
    /// `POST /api/payments` with the default `capture: true`: authorized and captured by one
    /// request and one processor call.
    OneStep,
}

impl Op {
    pub fn name(self) -> &'static str {
        match self {
            Op::Create => "create",
            Op::Get => "get",
            Op::Hello => "hello",
            Op::Pay(_) => "pay",
        }
    }
}

/// `Idempotency-Key` on creates (and on both requests of a payment).
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Keys {
    None,
    /// A new key per request, never used before in this run: every request runs (and stores
    /// its response).
    Fresh,
    /// One key for all requests: after the first, every create is a replay.
    Fixed,
}

/// Measurements of one (target, op); the rounds are pooled into one by `absorb`.
#[derive(Default)]
pub struct Sample {
    /// Latencies of successful requests started inside the measured window, in microseconds.
    latencies_us: Vec<u64>,
    /// Failed requests (non-2xx or transport errors), warm-up included: any failure is a bug.
    pub errors: u64,
    /// Total length of the measured windows.
    measured: Duration,
    /// Ids of the orders created (create phases), for the get or pay phase; after a pay phase,
    /// the ids it was given and did not pay.
    pub ids: Vec<String>,
    /// What the measured windows cost, if the target is metered.
    pub cost: Cost,
}

impl Sample {
    pub fn absorb(&mut self, other: Sample) {
        self.latencies_us.extend(other.latencies_us);
        self.errors += other.errors;
        self.measured += other.measured;
        self.ids.extend(other.ids);
        self.cost.absorb(other.cost);
    }

    /// Successful requests per second over the measured windows.
    pub fn rate(&self) -> u64 {
        let n = self.latencies_us.len() as u64;
        n.saturating_mul(1_000_000) / micros(self.measured).max(1)
    }

    /// Nearest-rank percentile in microseconds (0 without samples); sorts in place.
    pub fn percentile_us(&mut self, pct: usize) -> u64 {
        self.latencies_us.sort_unstable();
        let n = self.latencies_us.len();
        let rank = (pct * n).div_ceil(100).clamp(1, n.max(1));
        self.latencies_us.get(rank - 1).copied().unwrap_or(0)
    }
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

/// The shape of every phase.
#[derive(Clone, Copy)]
pub struct Settings {
    pub concurrency: usize,
    pub warmup: Duration,
    pub duration: Duration,
}

/// What the tasks of one phase share.
struct Phase {
    target: Arc<Target>,
    op: Op,
    keys: Keys,
    /// `Fresh` keys are `{key_prefix}-{task}-{n}`; the prefix is new in every phase, so a key
    /// is never sent twice in a run (a repeat would be a replay).
    key_prefix: String,
    /// Orders to get (task `i` takes `i`, `i + concurrency`, …, round robin) or to pay (each
    /// once, in the order `taken` hands them out).
    ids: Vec<String>,
    /// How many of `ids` pay ops have taken.
    taken: AtomicUsize,
    concurrency: usize,
    warm_end: Instant,
    end: Instant,
}

/// Phases started in this run, for [`Phase::key_prefix`].
static PHASES: AtomicU64 = AtomicU64::new(0);

impl Phase {
    /// The `Idempotency-Key` of the `sent`-th request of task `task`.
    fn key(&self, task: usize, sent: u64) -> Option<String> {
        match self.keys {
            Keys::None => None,
            Keys::Fresh => Some(format!("{}-{task}-{sent}", self.key_prefix)),
            Keys::Fixed => Some("bench-replay".to_owned()),
        }
    }
}

/// Runs `concurrency` tasks back-to-back for warm-up plus duration. Every task stops by itself:
/// no request starts after the window, and each request has the client's timeout.
pub async fn run_phase(
    target: &Arc<Target>,
    op: Op,
    keys: Keys,
    ids: Vec<String>,
    s: Settings,
) -> Result<Sample> {
    ensure!(
        !matches!(op, Op::Get | Op::Pay(_)) || !ids.is_empty() || target.any_order,
        "{}: no orders to {}",
        target.name,
        op.name()
    );
    let (target, concurrency) = (target.clone(), s.concurrency);
    let warm_end = Instant::now() + s.warmup;
    let end = warm_end + s.duration;
    let key_prefix = format!("bench-{}", PHASES.fetch_add(1, Ordering::Relaxed));
    let phase = Arc::new(Phase {
        target,
        op,
        keys,
        key_prefix,
        ids,
        taken: AtomicUsize::new(0),
        concurrency,
        warm_end,
        end,
    });
    let spawn = |i| tokio::spawn(worker(phase.clone(), i));
    let tasks: Vec<_> = (0..concurrency).map(spawn).collect();
    let meter = phase.target.meter.as_deref();
    let first = match meter {
        Some(meter) => {
            tokio::time::sleep_until(warm_end.into()).await;
            Some(meter.read().await)
        }
        None => None,
    };
    let mut sample = Sample::default();
    for task in tasks {
        sample.absorb(task.await.context("load task panicked")?);
    }
    sample.measured = s.duration;
    if let (Some(meter), Some(first)) = (meter, first) {
        // The last requests of the window end a little after it; their cost is counted, and
        // so is their op.
        let ops = sample.latencies_us.len() as u64;
        sample.cost = Cost::window(&first, &meter.read().await, ops);
    }
    if matches!(op, Op::Pay(_)) {
        let taken = phase.taken.load(Ordering::Relaxed).min(phase.ids.len());
        sample.ids = phase.ids[taken..].to_vec();
    }
    Ok(sample)
}

/// One closed-loop client.
async fn worker(p: Arc<Phase>, task: usize) -> Sample {
    let (t, mut s) = (&p.target, Sample::default());
    let (mut next, mut sent) = (task, 0_u64);
    let mut key = || {
        sent += 1;
        p.key(task, sent)
    };
    loop {
        let start = Instant::now();
        if start >= p.end {
            return s;
        }
        let done = match p.op {
            Op::Create => send(t.authed(t.post(&t.orders_url, t.create_body.clone(), key())))
                .await
                .and_then(|body| new_id(&body, None).map(Some)),
            Op::Hello => send(t.authed(t.client.get(t.hello_url())))
                .await
                .map(|_| None),
            Op::Get => {
                let id = &p.ids[next % p.ids.len()];
                next = next.wrapping_add(p.concurrency);
                let req = t.client.get(format!("{}/{id}", t.orders_url));
                send(t.authed(req)).await.map(|_| None)
            }
            Op::Pay(flow) => {
                let taken = p.taken.fetch_add(1, Ordering::Relaxed);
                let made_up = t.any_order.then(|| (taken + 1).to_string());
                let Some(order) = made_up.as_ref().or(p.ids.get(taken)) else {
                    // The supply was sized too small: stop rather than pay an order twice.
                    if taken == p.ids.len() {
                        eprintln!("error: {} pay: all {taken} pending orders paid", t.name);
                    }
                    s.errors += 1;
                    return s;
                };
                pay(t, order, flow, &mut key).await.map(|()| None)
            }
        };
        match done {
            Ok(id) => {
                if start >= p.warm_end {
                    s.latencies_us.push(micros(start.elapsed()));
                }
                s.ids.extend(id);
            }
            Err(msg) => {
                s.errors += 1;
                // A broken target fails every request; a few lines per task say enough.
                if s.errors <= 3 {
                    eprintln!("error: {} {}: {msg}", t.name, p.op.name());
                }
            }
        }
    }
}

/// Pays `order` in full and captures the payment, by `flow`.
async fn pay(
    t: &Target,
    order: &str,
    flow: PayFlow,
    key: &mut impl FnMut() -> Option<String>,
) -> Result<(), String> {
    // Ids go into the body with their JSON type: a number as a number.
    let order_id = order
        .parse::<i64>()
        .map_or_else(|_| Value::from(order), Value::from);
    if flow == PayFlow::OneStep {
        let body = format!(r#"{{"order_id":{order_id},"payment_method":"pm_card_visa"}}"#);
        let resp = send(t.authed(t.post(&t.payments_url, body, key()))).await;
        let paid = resp.and_then(|body| new_id(&body, Some("succeeded")));
        return paid
            .map(drop)
            .map_err(|e| format!("paying order {order}: {e}"));
    }
    let body =
        format!(r#"{{"order_id":{order_id},"payment_method":"pm_card_visa","capture":false}}"#);
    let resp = send(t.authed(t.post(&t.payments_url, body, key()))).await;
    let created = resp.and_then(|body| new_id(&body, Some("requires_capture")));
    let payment = created.map_err(|e| format!("paying order {order}: {e}"))?;
    let url = format!("{}/{payment}/capture", t.payments_url);
    let resp = send(t.authed(t.post(&url, "{}", key()))).await;
    let captured = resp.and_then(|body| new_id(&body, Some("succeeded")));
    captured.map_err(|e| format!("capturing payment {payment} of order {order}: {e}"))?;
    Ok(())
}

/// Creates `n` orders outside any measured window (the supply of a pay phase), `concurrency`
/// at a time; returns a sample with their ids and the failures, and no latencies.
pub async fn create_orders(target: &Arc<Target>, n: usize, concurrency: usize) -> Result<Sample> {
    let started = Arc::new(AtomicUsize::new(0));
    let spawn = |_| {
        let (t, started) = (target.clone(), started.clone());
        tokio::spawn(async move {
            let mut s = Sample::default();
            while started.fetch_add(1, Ordering::Relaxed) < n {
                let req = t.authed(t.post(&t.orders_url, t.create_body.clone(), None));
                match send(req).await.and_then(|body| new_id(&body, None)) {
                    Ok(id) => s.ids.push(id),
                    Err(msg) => {
                        s.errors += 1;
                        if s.errors <= 3 {
                            eprintln!("error: {} create (supply): {msg}", t.name);
                        }
                    }
                }
            }
            s
        })
    };
    let tasks: Vec<_> = (0..concurrency).map(spawn).collect();
    let mut sample = Sample::default();
    for task in tasks {
        sample.absorb(task.await.context("load task panicked")?);
    }
    Ok(sample)
}

/// Creates one order (no key); its id.
pub async fn create_order(t: &Target) -> Result<String, String> {
    let req = t.authed(t.post(&t.orders_url, t.create_body.clone(), None));
    send(req).await.and_then(|body| new_id(&body, None))
}

/// Sends one request and reads the whole body (so the connection is reused); a non-2xx answer
/// is an error.
pub async fn send(req: RequestBuilder) -> Result<Bytes, String> {
    let resp = req.send().await.map_err(|e| format!("transport: {e}"))?;
    let status = resp.status();
    let body = resp.bytes().await.map_err(|e| format!("body: {e}"))?;
    if !status.is_success() {
        return Err(format!("{status}: {}", excerpt(&body)));
    }
    Ok(body)
}

/// The start of a body, for error messages.
fn excerpt(body: &[u8]) -> String {
    String::from_utf8_lossy(&body[..body.len().min(200)]).into_owned()
}

/// The `"id"` of a created resource (a string id goes into a URL as is, a number as its
/// digits), if its `"status"` is `want` (when given).
fn new_id(body: &[u8], want: Option<&str>) -> Result<String, String> {
    let value: Option<Value> = serde_json::from_slice(body).ok();
    let field = |name| value.as_ref().and_then(|v| v.get(name));
    if let Some(want) = want
        && field("status").and_then(Value::as_str) != Some(want)
    {
        return Err(format!("expected status {want:?} in {}", excerpt(body)));
    }
    match field("id") {
        Some(Value::String(id)) => Ok(id.clone()),
        Some(id @ Value::Number(_)) => Ok(id.to_string()),
        _ => Err(format!("no \"id\" in {}", excerpt(body))),
    }
}

/// The `"id"` of a JSON object.
pub fn id_of(body: &[u8]) -> Option<Value> {
    let mut value: Value = serde_json::from_slice(body).ok()?;
    Some(value.get_mut("id")?.take())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_and_ids() {
        let latencies_us = (1..=100).rev().collect();
        let mut s = Sample {
            latencies_us,
            ..Sample::default()
        };
        assert_eq!((s.percentile_us(50), s.percentile_us(99)), (50, 99));
        assert_eq!(Sample::default().percentile_us(50), 0);
        assert_eq!(id_of(br#"{"id":42}"#), Some(serde_json::json!(42)));
        assert_eq!(new_id(br#"{"id":"ord_1"}"#, None).as_deref(), Ok("ord_1"));
        let payment = br#"{"id":7,"status":"requires_capture"}"#;
        assert_eq!(
            new_id(payment, Some("requires_capture")).as_deref(),
            Ok("7")
        );
        assert!(new_id(payment, Some("succeeded")).is_err());
        assert!(new_id(br#"{"status":"succeeded"}"#, Some("succeeded")).is_err());
    }
}
