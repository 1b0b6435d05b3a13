//! The `live` scenario (issue 5): many concurrent SSE subscribers on one `bursar serve`.
//!
//! Opens `--subscribers` streams (`GET /api/events/stream`, from the live head) on one
//! account, then creates `--events` orders at `--event-rate` per second, and waits until every
//! subscriber has received every event. It reports the server's resident memory (VmRSS from
//! `/proc`) with no subscriber (the baseline, same run), with all of them connected and idle,
//! and after the fan-out; the memory per subscriber; and how long the fan-out took. A
//! subscriber that misses an event fails the run: the stream resumes from the log, so a loss
//! is a bug, not a measurement.

use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use reqwest::Client;
use tokio::task::JoinSet;

use crate::Args;
use crate::bursar;
use crate::load::{self, Target};

/// Streams opened at once while connecting.
const CONNECT_AT_ONCE: usize = 200;

/// What each subscriber saw.
struct Subscribers {
    connected: AtomicUsize,
    /// Events received, per subscriber.
    events: Vec<AtomicU64>,
    /// Subscribers whose stream ended or failed before the end.
    failed: AtomicUsize,
}

pub async fn run(args: &Args) -> Result<ExitCode> {
    let bin = args.bursar_bin.as_deref().context("no --bursar-bin")?;
    let (scratch, flags) = bursar::store(args.backend, args.database_url.as_deref()).await?;
    // One connection per stream; the pool must not make requests wait for each other.
    let client = Client::builder()
        .http1_only()
        .no_proxy()
        .pool_max_idle_per_host(0)
        .build()?;
    let (server, targets) =
        bursar::start(bin, &flags, &client, "", &[("bursar", "bench-live")]).await?;
    let pid = server.pid().context("the server's pid")?;
    let target = Arc::new(targets.into_iter().next().context("one target")?);
    let result = measure(args, &target, pid).await;
    server.kill().await?;
    // The store goes with the run (on PostgreSQL a database of its own, left behind before).
    let removed = scratch.remove().await;
    let report = result?;
    removed?;
    println!("{report}");
    Ok(if report.complete() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

struct Report {
    subscribers: usize,
    events: usize,
    rss_baseline_kib: u64,
    rss_idle_kib: u64,
    rss_after_kib: u64,
    delivered: u64,
    fan_out: Duration,
    failed: usize,
}

impl Report {
    fn complete(&self) -> bool {
        self.failed == 0 && self.delivered == (self.subscribers * self.events) as u64
    }
}

impl std::fmt::Display for Report {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mib = |kib: u64| kib as f64 / 1024.0;
        let per = (self.rss_idle_kib.saturating_sub(self.rss_baseline_kib)) as f64
            / self.subscribers.max(1) as f64;
        writeln!(f, "SSE subscribers: {}", self.subscribers)?;
        writeln!(
            f,
            "server RSS: {:.1} MiB without subscribers (baseline), {:.1} MiB with all connected and idle ({:.2}x), {:.1} MiB after the fan-out ({:.2}x)",
            mib(self.rss_baseline_kib),
            mib(self.rss_idle_kib),
            self.rss_idle_kib as f64 / self.rss_baseline_kib.max(1) as f64,
            mib(self.rss_after_kib),
            self.rss_after_kib as f64 / self.rss_baseline_kib.max(1) as f64,
        )?;
        writeln!(f, "memory per idle subscriber: {per:.1} KiB")?;
        let frames = self.delivered as f64 / self.fan_out.as_secs_f64().max(1e-9);
        writeln!(
            f,
            "fan-out: {} events to every subscriber, {} of {} frames delivered in {:.2} s ({frames:.0} frames/s)",
            self.events,
            self.delivered,
            self.subscribers * self.events,
            self.fan_out.as_secs_f64(),
        )?;
        if self.failed > 0 {
            writeln!(f, "FAILED: {} streams ended early", self.failed)?;
        }
        Ok(())
    }
}

async fn measure(args: &Args, target: &Arc<Target>, pid: u32) -> Result<Report> {
    let n = args.subscribers;
    ensure!(
        n > 0 && args.events > 0,
        "--subscribers and --events must be at least 1"
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    let rss_baseline_kib = rss_kib(pid)?;
    let subs = Arc::new(Subscribers {
        connected: AtomicUsize::new(0),
        events: (0..n).map(|_| AtomicU64::new(0)).collect(),
        failed: AtomicUsize::new(0),
    });
    let mut streams = JoinSet::new();
    for i in 0..n {
        streams.spawn(subscribe(target.clone(), subs.clone(), i));
        // Connect in waves so the listener's backlog never overflows.
        if (i + 1) % CONNECT_AT_ONCE == 0 {
            wait(
                &format!("{} streams", i + 1),
                Duration::from_secs(60),
                || subs.connected.load(Ordering::SeqCst) + subs.failed.load(Ordering::SeqCst) > i,
            )
            .await?;
        }
    }
    wait("every stream", Duration::from_secs(60), || {
        subs.connected.load(Ordering::SeqCst) + subs.failed.load(Ordering::SeqCst) >= n
    })
    .await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let rss_idle_kib = rss_kib(pid)?;

    let started = Instant::now();
    let tick = Duration::from_secs_f64(1.0 / f64::from(args.event_rate.max(1)));
    let mut pacer = tokio::time::interval(tick);
    for _ in 0..args.events {
        pacer.tick().await;
        load::create_order(target)
            .await
            .map_err(|e| anyhow::anyhow!("creating an order: {e}"))?;
    }
    let want = args.events as u64;
    let all_there = || subs.events.iter().all(|c| c.load(Ordering::SeqCst) >= want);
    let _ = wait(
        "every event at every subscriber",
        Duration::from_secs(120),
        || all_there() || subs.failed.load(Ordering::SeqCst) > 0,
    )
    .await;
    let fan_out = started.elapsed();
    let rss_after_kib = rss_kib(pid)?;
    streams.abort_all();
    let delivered = subs
        .events
        .iter()
        .map(|c| c.load(Ordering::SeqCst).min(want))
        .sum();
    Ok(Report {
        subscribers: n,
        events: args.events,
        rss_baseline_kib,
        rss_idle_kib,
        rss_after_kib,
        delivered,
        fan_out,
        failed: subs.failed.load(Ordering::SeqCst),
    })
}

/// One subscriber: counts the `id:` lines of its stream until it is aborted.
async fn subscribe(target: Arc<Target>, subs: Arc<Subscribers>, i: usize) {
    let req = target.authed(target.client().get(target.api("/events/stream")));
    let mut resp = match req.send().await {
        Ok(r) if r.status().is_success() => r,
        _ => {
            subs.failed.fetch_add(1, Ordering::SeqCst);
            return;
        }
    };
    subs.connected.fetch_add(1, Ordering::SeqCst);
    // Lines may be split across chunks: keep the unfinished tail.
    let mut tail: Vec<u8> = Vec::new();
    loop {
        match resp.chunk().await {
            Ok(Some(bytes)) => {
                tail.extend_from_slice(&bytes);
                let complete = tail.iter().rposition(|b| *b == b'\n').map_or(0, |p| p + 1);
                let ids = tail[..complete]
                    .split(|b| *b == b'\n')
                    .filter(|line| line.starts_with(b"id:"))
                    .count();
                tail.drain(..complete);
                subs.events[i].fetch_add(ids as u64, Ordering::SeqCst);
            }
            _ => {
                subs.failed.fetch_add(1, Ordering::SeqCst);
                return;
            }
        }
    }
}

async fn wait(what: &str, limit: Duration, mut done: impl FnMut() -> bool) -> Result<()> {
    let start = Instant::now();
    while !done() {
        if start.elapsed() > limit {
            bail!("timed out waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

/// The process's resident set (VmRSS), in KiB.
fn rss_kib(pid: u32) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("reading /proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .context("no VmRSS line")
}
