//! Fixed-concurrency closed-loop load against one target, and the latency statistics.
//!
//! Closed loop (each task waits for its answer before sending the next request) because that is
//! what a pool of API clients does, and it cannot overload the target into measuring its queue.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use axum::body::Bytes;
use reqwest::Client;
use reqwest::header::{AUTHORIZATION, CONTENT_TYPE};
use serde_json::Value;

/// How the load generator talks to one server (the baseline or Bursar).
pub struct Target {
    pub name: &'static str,
    client: Client,
    /// `http://127.0.0.1:PORT/…/orders`: creates POST here, gets GET `{orders_url}/{id}`.
    orders_url: String,
    /// Full `Authorization` header value, if the target wants one.
    auth: Option<String>,
    /// Body of every create; built once so the client does no per-request work.
    create_body: Bytes,
}

impl Target {
    /// The baseline's hello-world route, beside its orders.
    fn hello_url(&self) -> String {
        self.orders_url.replace("/orders", "/hello")
    }

    pub fn new(
        name: &'static str,
        client: &Client,
        orders_url: String,
        auth: Option<String>,
        create_body: String,
    ) -> Target {
        let (client, create_body) = (client.clone(), create_body.into());
        Target {
            name,
            client,
            orders_url,
            auth,
            create_body,
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
}

impl Op {
    pub fn name(self) -> &'static str {
        match self {
            Op::Create => "create",
            Op::Get => "get",
            Op::Hello => "hello",
        }
    }
}

/// `Idempotency-Key` on creates.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Keys {
    None,
    /// A new key per request: every create runs (and stores its response).
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
    /// Ids of the orders created (create phases only), for the get phase.
    pub ids: Vec<String>,
}

impl Sample {
    pub fn absorb(&mut self, other: Sample) {
        self.latencies_us.extend(other.latencies_us);
        self.errors += other.errors;
        self.measured += other.measured;
        self.ids.extend(other.ids);
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
    /// Orders to get; task `i` takes `i`, `i + concurrency`, … (round robin).
    ids: Vec<String>,
    concurrency: usize,
    warm_end: Instant,
    end: Instant,
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
        op != Op::Get || !ids.is_empty(),
        "{}: nothing to get",
        target.name
    );
    let (target, concurrency) = (target.clone(), s.concurrency);
    let warm_end = Instant::now() + s.warmup;
    let end = warm_end + s.duration;
    let phase = Arc::new(Phase {
        target,
        op,
        keys,
        ids,
        concurrency,
        warm_end,
        end,
    });
    let spawn = |i| tokio::spawn(worker(phase.clone(), i));
    let tasks: Vec<_> = (0..concurrency).map(spawn).collect();
    let mut sample = Sample::default();
    for task in tasks {
        sample.absorb(task.await.context("load task panicked")?);
    }
    sample.measured = s.duration;
    Ok(sample)
}

/// One closed-loop client.
async fn worker(p: Arc<Phase>, mut next: usize) -> Sample {
    let (t, mut s) = (&p.target, Sample::default());
    let mut sent = 0_u64;
    loop {
        let start = Instant::now();
        if start >= p.end {
            return s;
        }
        let req = match p.op {
            Op::Create => {
                let req = t
                    .client
                    .post(&t.orders_url)
                    .header(CONTENT_TYPE, "application/json")
                    .body(t.create_body.clone());
                sent += 1;
                match p.keys {
                    Keys::None => req,
                    Keys::Fresh => req.header("idempotency-key", format!("bench-{next}-{sent}")),
                    Keys::Fixed => req.header("idempotency-key", "bench-replay"),
                }
            }
            Op::Hello => t.client.get(t.hello_url()),
            Op::Get => {
                let id = &p.ids[next % p.ids.len()];
                next = next.wrapping_add(p.concurrency);
                t.client.get(format!("{}/{id}", t.orders_url))
            }
        };
        let req = match &t.auth {
            Some(auth) => req.header(AUTHORIZATION, auth),
            None => req,
        };
        match send(req, p.op).await {
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

/// Sends one request and reads the whole body (so the connection is reused); returns the new
/// order's id for creates.
async fn send(req: reqwest::RequestBuilder, op: Op) -> Result<Option<String>, String> {
    let resp = req.send().await.map_err(|e| format!("transport: {e}"))?;
    let status = resp.status();
    let body = resp.bytes().await.map_err(|e| format!("body: {e}"))?;
    let text = || {
        format!(
            "{status}: {}",
            String::from_utf8_lossy(&body[..body.len().min(200)])
        )
    };
    if !status.is_success() {
        return Err(text());
    } else if op != Op::Create {
        return Ok(None);
    }
    match id_of(&body) {
        // A string id goes into the URL as is, a number as its digits.
        Some(Value::String(id)) => Ok(Some(id)),
        Some(id) => Ok(Some(id.to_string())),
        None => Err(format!("no \"id\" in {}", text())),
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
    }
}
