//! The `webhooks` scenario (issue 5): fan-out of `order.created` events to local receivers.
//!
//! The bench runs `--receivers` HTTP receivers of its own (axum on 127.0.0.1, on a runtime of
//! their own, answering 204 at once) and, for each phase that fans out, registers each as a
//! webhook endpoint for every event type on one account, so every order created there is
//! delivered once to each receiver; after the phase it deletes the endpoints again, and with
//! them anything still undelivered, so that no phase inherits a backlog. A receiver notes when each delivery arrived and which order it was about (`data.aggregate_id`);
//! the bench matches deliveries to creates by order id after each phase. Each round:
//!
//! 1. **Fixed rate** (open loop): order creates offered at `--event-rate` per second, one task
//!    per tick, so slow answers do not lower the offered rate. Commit-to-delivery latency of a
//!    receiver-event pair = the delivery's arrival at the receiver − the arrival of the create's
//!    201 at the bench (which Bursar sends after the commit), both on the bench's monotonic
//!    clock. Every event must reach every receiver within `--drain-secs` of the last create, or
//!    the run fails: a lost delivery is a bug. Then the stages of each delivery are read back
//!    from Bursar's own database timestamps (request → sequenced by the relay → sent by the
//!    worker), to say where the time went.
//! 2. **Closed loop**: `--concurrency` clients create orders on an account *without* endpoints
//!    (the baseline, same run), then on the account with them. Ratio = creates/s with the
//!    endpoints ÷ creates/s without; the fan-out throughput is the deliveries (and events
//!    delivered to every receiver) per second that arrived inside the measured window. Closed
//!    loop outruns the deliveries, so the backlog left at the end is given `--drain-secs` to
//!    arrive (its rate is reported, with no creates competing); what is left is not checked.

use std::collections::{BTreeMap, HashMap};
use std::ffi::OsStr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use reqwest::Client;
use serde::Deserialize;
use serde_json::Value;
use sqlx::Connection;
use tokio::task::JoinSet;
use tokio::time::MissedTickBehavior;

use crate::bursar::{self, Flags};
use crate::load::{self, Keys, Op, Sample, Target};
use crate::{Args, finish, ms};

/// Runs the scenario and prints its report; the exit status is non-zero if a request failed,
/// a delivery was malformed, or a fixed-rate event missed a receiver.
pub async fn run(args: &Args) -> Result<ExitCode> {
    let bin = args.bursar_bin.as_deref().context("no --bursar-bin")?;
    let client = Client::builder().http1_only().no_proxy();
    let client = client.timeout(Duration::from_secs(10)).build()?;
    let receivers = Receivers::start(args.receivers).await?;
    let results = with_bursar(args, bin, &client, &receivers).await;
    let inbox = receivers.stop();
    let mut results = results?;
    results.other = std::mem::take(&mut *lock(&inbox.other));
    results.malformed = inbox.malformed.load(Ordering::Relaxed);
    Ok(report(args, &mut results))
}

async fn with_bursar(
    args: &Args,
    bin: &std::path::Path,
    client: &Client,
    receivers: &Receivers,
) -> Result<Results> {
    let (scratch, flags) = bursar::store(args.backend, args.database_url.as_deref()).await?;
    let results = async {
        let db = Db::of(&flags)?;
        let accounts = [("plain", "bench"), ("hooked", "bench-hooks")];
        let config = config(args);
        let (server, targets) = bursar::start(bin, &flags, client, &config, &accounts).await?;
        let [plain, hooked] = <[Target; 2]>::try_from(targets)
            .map_err(|_| anyhow!("bursar::start returned another number of targets"))?;
        let (plain, hooked) = (Arc::new(plain), Arc::new(hooked));
        let results = measure(args, &plain, &hooked, receivers, &db).await;
        finish(results, server.kill().await)
    };
    let results = results.await;
    finish(results, scratch.remove().await)
}

/// Bursar's extra configuration: receivers on loopback are allowed (and so plain `http://`).
fn config(args: &Args) -> String {
    let mut c = String::from("[webhooks]\nallow_cidrs = [\"127.0.0.0/8\"]\n");
    if let Some(ms) = args.webhook_poll_ms {
        c += &format!("poll_interval_ms = {ms}\n");
    }
    if let Some(n) = args.webhook_concurrency {
        c += &format!("concurrency = {n}\n");
    }
    c
}

/// Everything measured, pooled over the rounds.
#[derive(Default)]
struct Results {
    fixed: Fixed,
    /// Closed-loop creates on the account without endpoints, and on the one with them.
    plain: Sample,
    hooked: Sample,
    /// Deliveries, and events delivered to every receiver, that arrived in the closed-loop
    /// measured windows (of `hooked`).
    window_deliveries: u64,
    window_events: u64,
    window: Duration,
    /// One line per round about the closed-loop backlog.
    drains: Vec<String>,
    /// Deliveries of other event types, and malformed ones (see [`Inbox`]).
    other: BTreeMap<String, u64>,
    malformed: u64,
}

/// The fixed-rate phases.
#[derive(Default)]
struct Fixed {
    /// Creates offered (warm-up included), and those of the measured windows.
    offered: u64,
    offered_measured: u64,
    window: Duration,
    /// Create latencies (send → 201) of the measured windows, µs.
    create_us: Vec<u64>,
    errors: u64,
    /// Deliveries that arrived inside the measured windows, whatever event they were of: with
    /// the windows, whether the fan-out kept up with the offered rate (a median alone cannot
    /// tell a backlog that grew from the start from one that a single stall left).
    window_deliveries: u64,
    /// Commit-to-delivery latencies of measured events: each receiver-event pair, and each
    /// event until its last receiver had it, µs; [`LATE`] for those never delivered.
    pair_us: Vec<u64>,
    all_us: Vec<u64>,
    /// Over all fixed-rate events: pairs delivered, expected but not delivered, repeated.
    delivered: u64,
    missing: u64,
    /// Whether deliveries were still arriving when a phase's wait for them ended.
    still_arriving: bool,
    duplicates: u64,
    /// Deliveries that reached the receiver before the 201 reached the bench (counted as 0).
    early: u64,
    /// Per delivery, from Bursar's database (ms): request → sequenced by the relay,
    /// sequenced → attempt started by the worker, the attempt's send.
    relay_ms: Vec<u64>,
    queue_ms: Vec<u64>,
    send_ms: Vec<u64>,
    /// The worker's claim latency as Bursar's `/metrics` summarised it after the phase.
    claims: Option<String>,
    /// PostgreSQL only: checkpoints the server started during the fixed-rate phases (each
    /// begins right after a forced one). A checkpoint's full-page writes slow every
    /// write that follows it, so a window that holds one is not comparable with one that
    /// does not.
    checkpoints: Option<i64>,
}

/// What the phases of a run share.
struct Run<'a> {
    args: &'a Args,
    /// The account without endpoints, and the one that gets them.
    plain: &'a Arc<Target>,
    hooked: &'a Arc<Target>,
    receivers: &'a Receivers,
    db: &'a Db,
    settings: load::Settings,
    /// How long to wait for a phase's deliveries after its last create.
    drain: Duration,
}

async fn measure(
    args: &Args,
    plain: &Arc<Target>,
    hooked: &Arc<Target>,
    receivers: &Receivers,
    db: &Db,
) -> Result<Results> {
    let run = Run {
        args,
        plain,
        hooked,
        receivers,
        db,
        settings: load::Settings {
            concurrency: args.concurrency,
            warmup: Duration::from_secs(args.warmup_secs),
            duration: Duration::from_secs(args.duration_secs),
        },
        drain: Duration::from_secs(args.drain_secs),
    };
    let mut r = Results::default();
    for round in 1..=args.rounds {
        let rounds = args.rounds;
        let rate = args.event_rate;
        eprintln!("round {round}/{rounds}: fixed rate, {rate} creates/s");
        run.fixed_rate(&mut r.fixed).await?;
        eprintln!("round {round}/{rounds}: closed loop, no endpoints");
        run.plain_closed_loop(&mut r.plain).await?;
        let n = args.receivers;
        eprintln!("round {round}/{rounds}: closed loop, {n} endpoints");
        run.closed_loop(round, &mut r).await?;
    }
    Ok(r)
}

impl Run<'_> {
    /// Registers one endpoint per receiver on the hooked account.
    async fn add_endpoints(&self) -> Result<Vec<i64>> {
        let cap = self.args.endpoint_concurrency;
        add_endpoints(self.hooked, &self.receivers.urls, cap).await
    }

    /// Deletes the endpoints, dropping what is left undelivered so that the next phase starts
    /// without a backlog, and waits for the relay to sequence up to order `last`.
    async fn remove_endpoints(&self, endpoints: &[i64], last: i64) -> Result<()> {
        remove_endpoints(self.hooked, endpoints).await?;
        caught_up(self.hooked, last).await;
        Ok(())
    }

    /// The fixed-rate phase: the creates, the wait for every delivery, the stages from the
    /// database.
    async fn fixed_rate(&self, f: &mut Fixed) -> Result<()> {
        let endpoints = self.add_endpoints().await?;
        let before = self.db.checkpoints(true).await;
        let paced = paced_creates(self.hooked, self.args.event_rate, self.settings).await?;
        if let (Some(before), Some(after)) = (before, self.db.checkpoints(false).await) {
            *f.checkpoints.get_or_insert(0) += after - before;
        }
        f.offered += paced.offered;
        f.offered_measured += paced.offered_measured;
        f.window += self.settings.duration;
        f.errors += paced.errors;
        f.create_us.extend(&paced.create_us);
        let mut tally = Tally::new(self.args.receivers, Some(paced.window));
        for c in &paced.created {
            tally.expect(c.order, Some(c.at), c.measured);
        }
        let done_at = Instant::now();
        tally.drain(self.receivers, done_at + self.drain).await;
        f.claims = claim_latency(self.hooked).await;
        let last = tally
            .last_at
            .map_or(0.0, |t| t.saturating_duration_since(done_at).as_secs_f64());
        eprintln!(
            "  {} events; last delivery {last:.1} s after the last create; {} missing",
            paced.created.len(),
            tally.missing()
        );
        f.pair_us.append(&mut tally.pair_us);
        f.all_us.append(&mut tally.all_us);
        // Measured pairs and events not delivered in time rank as later than any delivered.
        let (pairs, events) = tally.undelivered_measured();
        f.pair_us.extend(std::iter::repeat_n(LATE, pairs));
        f.all_us.extend(std::iter::repeat_n(LATE, events));
        f.delivered += tally.delivered;
        f.window_deliveries += tally.window_deliveries;
        f.missing += tally.missing();
        // Deliveries still arriving at the deadline: a backlog rather than a loss.
        let arriving = tally
            .last_at
            .is_some_and(|l| l.elapsed() < Duration::from_secs(1));
        f.still_arriving |= tally.missing() > 0 && arriving;
        f.duplicates += tally.duplicates;
        f.early += tally.early;
        let (lo, hi) = (tally.events.keys().min(), tally.events.keys().max());
        if let (Some(&lo), Some(&hi)) = (lo, hi) {
            match self.db.stages(lo, hi).await {
                Ok(stages) => {
                    for [relay, queue, send] in stages {
                        f.relay_ms.push(relay);
                        f.queue_ms.push(queue);
                        f.send_ms.push(send);
                    }
                }
                Err(e) => eprintln!("  (could not read delivery stages from the database: {e:#})"),
            }
        }
        let last = hi.copied().unwrap_or(0);
        self.remove_endpoints(&endpoints, last).await
    }

    /// Closed-loop creates on the account without endpoints: the baseline.
    async fn plain_closed_loop(&self, plain: &mut Sample) -> Result<()> {
        let s = self.settings;
        let sample = load::run_phase(self.plain, Op::Create, Keys::None, vec![], s).await?;
        let last = last_order(&sample.ids);
        plain.absorb(sample);
        caught_up(self.plain, last).await;
        Ok(())
    }

    /// Closed-loop creates on the hooked account: the creates, the deliveries of the measured
    /// window, and what became of the backlog.
    async fn closed_loop(&self, round: u32, r: &mut Results) -> Result<()> {
        let s = self.settings;
        let endpoints = self.add_endpoints().await?;
        let start = Instant::now();
        let window = (start + s.warmup, start + s.warmup + s.duration);
        let mut sample = load::run_phase(self.hooked, Op::Create, Keys::None, vec![], s).await?;
        let ids = std::mem::take(&mut sample.ids);
        r.hooked.absorb(sample);
        let mut tally = Tally::new(self.args.receivers, Some(window));
        for id in &ids {
            tally.expect(parse_order(id)?, None, false);
        }
        let done_at = Instant::now();
        tally.absorb(self.receivers.take());
        let backlog = tally.missing();
        tally.drain(self.receivers, done_at + self.drain).await;
        r.window_deliveries += tally.window_deliveries;
        r.window_events += tally.window_events;
        r.window += s.duration;
        let line = tally.drain_line(round, done_at, backlog, self.drain);
        r.drains.push(line);
        self.remove_endpoints(&endpoints, last_order(&ids)).await
    }
}

// ---------------------------------------------------------------------------------------------
// Receivers

/// One delivery as a receiver saw it.
struct Arrival {
    receiver: u32,
    order: i64,
    at: Instant,
}

/// What the receivers share.
#[derive(Default)]
struct Inbox {
    arrivals: Mutex<Vec<Arrival>>,
    /// Deliveries of events other than `order.created`, by type.
    other: Mutex<BTreeMap<String, u64>>,
    /// Bodies that are not an event, or whose `webhook-id` header is not the body's `id`.
    malformed: AtomicU64,
}

/// The receivers, on a runtime of their own so that the load generator's tasks do not delay
/// the arrival times they note.
struct Receivers {
    rt: tokio::runtime::Runtime,
    urls: Vec<String>,
    inbox: Arc<Inbox>,
}

impl Receivers {
    async fn start(n: u32) -> Result<Receivers> {
        let rt = tokio::runtime::Runtime::new()?;
        let inbox = Arc::new(Inbox::default());
        let shared = inbox.clone();
        let setup = rt.spawn(async move {
            let mut urls = Vec::new();
            for i in 0..n {
                let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
                let addr = listener.local_addr()?;
                let app = Router::new().route("/hook", post(receive));
                let app = app.with_state((i, shared.clone()));
                tokio::spawn(async move { axum::serve(listener, app).await });
                urls.push(format!("http://{addr}/hook"));
            }
            anyhow::Ok(urls)
        });
        match setup.await.context("receiver setup panicked") {
            Ok(Ok(urls)) => Ok(Receivers { rt, urls, inbox }),
            // A runtime must not be dropped inside another one; shut it down explicitly.
            Ok(Err(e)) | Err(e) => {
                rt.shutdown_background();
                Err(e)
            }
        }
    }

    /// The arrivals since the last call.
    fn take(&self) -> Vec<Arrival> {
        std::mem::take(&mut *lock(&self.inbox.arrivals))
    }

    fn stop(self) -> Arc<Inbox> {
        self.rt.shutdown_background();
        self.inbox
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

#[derive(Deserialize)]
struct Delivered {
    id: String,
    #[serde(rename = "type")]
    event_type: String,
    data: DeliveredData,
}

#[derive(Deserialize)]
struct DeliveredData {
    aggregate_id: i64,
}

/// Notes the arrival (before any parsing) and answers 204.
async fn receive(
    State((receiver, inbox)): State<(u32, Arc<Inbox>)>,
    headers: HeaderMap,
    body: Bytes,
) -> StatusCode {
    let at = Instant::now();
    let event: Option<Delivered> = serde_json::from_slice(&body).ok();
    let id = headers.get("webhook-id").map(|v| v.as_bytes());
    match event {
        Some(e) if id == Some(e.id.as_bytes()) => {
            if e.event_type == "order.created" {
                let order = e.data.aggregate_id;
                lock(&inbox.arrivals).push(Arrival {
                    receiver,
                    order,
                    at,
                });
            } else {
                *lock(&inbox.other).entry(e.event_type).or_default() += 1;
            }
        }
        _ => {
            if inbox.malformed.fetch_add(1, Ordering::Relaxed) < 3 {
                let shown = String::from_utf8_lossy(&body[..body.len().min(200)]).into_owned();
                eprintln!("error: malformed delivery (webhook-id {id:?}): {shown}");
            }
        }
    }
    StatusCode::NO_CONTENT
}

// ---------------------------------------------------------------------------------------------
// Matching deliveries to creates

/// The deliveries of one phase's events.
struct Tally {
    receivers: u32,
    /// Closed loop: the measured window.
    window: Option<(Instant, Instant)>,
    events: HashMap<i64, Event>,
    pair_us: Vec<u64>,
    all_us: Vec<u64>,
    delivered: u64,
    duplicates: u64,
    early: u64,
    /// Deliveries of orders not of this phase (late ones of an earlier phase).
    foreign: u64,
    window_deliveries: u64,
    window_events: u64,
    /// Deliveries after the window, and the last arrival.
    after_window: u64,
    last_at: Option<Instant>,
}

struct Event {
    /// When the create's 201 reached the bench (fixed rate only).
    created: Option<Instant>,
    measured: bool,
    /// Receivers that had it (bit per receiver), and the latest arrival.
    seen: u32,
    latest: Option<Instant>,
}

impl Tally {
    fn new(receivers: u32, window: Option<(Instant, Instant)>) -> Tally {
        Tally {
            receivers,
            window,
            events: HashMap::new(),
            pair_us: Vec::new(),
            all_us: Vec::new(),
            delivered: 0,
            duplicates: 0,
            early: 0,
            foreign: 0,
            window_deliveries: 0,
            window_events: 0,
            after_window: 0,
            last_at: None,
        }
    }

    fn expect(&mut self, order: i64, created: Option<Instant>, measured: bool) {
        let event = Event {
            created,
            measured,
            seen: 0,
            latest: None,
        };
        self.events.insert(order, event);
    }

    fn full(&self) -> u32 {
        u32::MAX >> (32 - self.receivers)
    }

    /// Receiver-event pairs, and events, of the measured ones still undelivered.
    fn undelivered_measured(&self) -> (usize, usize) {
        let measured = self.events.values().filter(|e| e.measured);
        let left = measured.map(|e| self.receivers - e.seen.count_ones());
        left.fold((0, 0), |(pairs, events), n| {
            (pairs + n as usize, events + usize::from(n > 0))
        })
    }

    fn missing(&self) -> u64 {
        self.events.len() as u64 * u64::from(self.receivers) - self.delivered
    }

    fn absorb(&mut self, arrivals: Vec<Arrival>) {
        let full = self.full();
        for a in arrivals {
            let Some(e) = self.events.get_mut(&a.order) else {
                self.foreign += 1;
                continue;
            };
            let bit = 1 << a.receiver;
            if e.seen & bit != 0 {
                self.duplicates += 1;
                continue;
            }
            e.seen |= bit;
            self.delivered += 1;
            let latest = e.latest.map_or(a.at, |l| l.max(a.at));
            e.latest = Some(latest);
            self.last_at = Some(self.last_at.map_or(a.at, |l| l.max(a.at)));
            let since = |t: Instant| micros(latest.saturating_duration_since(t));
            if let Some(created) = e.created {
                if a.at < created {
                    self.early += 1;
                }
                if e.measured {
                    self.pair_us
                        .push(micros(a.at.saturating_duration_since(created)));
                    if e.seen == full {
                        self.all_us.push(since(created));
                    }
                }
            }
            if let Some((from, to)) = self.window {
                let inside = |t: Instant| t >= from && t < to;
                if inside(a.at) {
                    self.window_deliveries += 1;
                } else if a.at >= to {
                    self.after_window += 1;
                }
                if e.seen == full && inside(latest) {
                    self.window_events += 1;
                }
            }
        }
    }

    /// Takes arrivals until every expected delivery is in or `deadline` passes.
    async fn drain(&mut self, receivers: &Receivers, deadline: Instant) {
        loop {
            self.absorb(receivers.take());
            if self.missing() == 0 || Instant::now() >= deadline {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// What became of the closed-loop backlog (`backlog` deliveries when the creates ended).
    fn drain_line(&self, round: u32, done_at: Instant, backlog: u64, bound: Duration) -> String {
        let window_end = self.window.map_or(done_at, |(_, to)| to);
        let rate = match self.last_at.filter(|&l| l > window_end) {
            Some(last) => per_sec(self.after_window, last - window_end),
            None => 0.0,
        };
        let left = self.missing();
        let end = if left == 0 {
            let took = self
                .last_at
                .map_or(0.0, |l| l.saturating_duration_since(done_at).as_secs_f64());
            format!("all delivered {took:.1} s after the last create")
        } else {
            format!(
                "{left} not delivered within {} s (dropped with the endpoints, not checked)",
                bound.as_secs()
            )
        };
        let strays = match self.foreign {
            0 => String::new(),
            n => format!("; {n} late deliveries of earlier phases ignored"),
        };
        format!(
            "round {round}: {} events; {backlog} deliveries outstanding at the last create; \
             after the window {rate:.0} deliveries/s (no creates running); {end}{strays}",
            self.events.len(),
        )
    }
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

fn parse_order(id: &str) -> Result<i64> {
    id.parse()
        .with_context(|| format!("order id {id:?} is not an integer"))
}

/// The highest order id among `ids` (0 if none).
fn last_order(ids: &[String]) -> i64 {
    ids.iter()
        .filter_map(|id| id.parse().ok())
        .max()
        .unwrap_or(0)
}

// ---------------------------------------------------------------------------------------------
// Fixed-rate creates

struct Created {
    order: i64,
    /// When the 201 arrived.
    at: Instant,
    measured: bool,
}

struct Paced {
    created: Vec<Created>,
    /// The measured window (after the warm-up).
    window: (Instant, Instant),
    offered: u64,
    offered_measured: u64,
    create_us: Vec<u64>,
    errors: u64,
}

/// Offers `rate` creates per second for warm-up plus duration: one task per tick of a timer
/// that catches up on missed ticks, so neither slow answers nor a late wake-up lower the
/// offered rate. Returns once every create has been answered.
async fn paced_creates(t: &Arc<Target>, rate: u32, s: load::Settings) -> Result<Paced> {
    let period = Duration::from_nanos((1_000_000_000 / u64::from(rate)).max(1));
    let start = tokio::time::Instant::now();
    let warm_end = start + s.warmup;
    let end = warm_end + s.duration;
    let mut ticks = tokio::time::interval_at(start, period);
    ticks.set_missed_tick_behavior(MissedTickBehavior::Burst);
    let mut tasks = JoinSet::new();
    let mut p = Paced {
        created: Vec::new(),
        window: (warm_end.into_std(), end.into_std()),
        offered: 0,
        offered_measured: 0,
        create_us: Vec::new(),
        errors: 0,
    };
    loop {
        let tick = ticks.tick().await;
        if tick >= end {
            break;
        }
        let measured = tick >= warm_end;
        p.offered += 1;
        p.offered_measured += u64::from(measured);
        let t = t.clone();
        tasks.spawn(async move {
            let sent = Instant::now();
            let done = load::create_order(&t).await;
            (measured, sent, Instant::now(), done)
        });
    }
    while let Some(task) = tasks.join_next().await {
        let (measured, sent, at, done) = task.context("create task panicked")?;
        match done.map_err(|e| anyhow!(e)).and_then(|id| parse_order(&id)) {
            Ok(order) => {
                if measured {
                    p.create_us.push(micros(at - sent));
                }
                p.created.push(Created {
                    order,
                    at,
                    measured,
                });
            }
            Err(e) => {
                p.errors += 1;
                if p.errors <= 3 {
                    eprintln!("error: {} create (fixed rate): {e:#}", t.name);
                }
            }
        }
    }
    Ok(p)
}

/// The worker's claim latency from Bursar's `/metrics` (a summary over its last minute), and
/// how many deliveries completions handed on: `None` if it cannot be read.
async fn claim_latency(t: &Target) -> Option<String> {
    let text = t.client().get(t.server("/metrics")).send().await.ok()?;
    let text = text.text().await.ok()?;
    let value = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.trim().parse::<f64>().ok())
    };
    let q = |q: &str| value(&format!("webhook_claim_seconds{{quantile=\"{q}\"}}"));
    let (p50, p99, max) = (q("0.5")?, q("0.99")?, q("1")?);
    let count = value("webhook_claim_seconds_count")?;
    // Since the server started; absent where the store hands nothing on.
    let handed = value("webhook_handed_on_total").unwrap_or(0.0);
    let wait = |q: &str| value(&format!("webhook_record_wait_seconds{{quantile=\"{q}\"}}"));
    let size = |q: &str| value(&format!("webhook_record_batch_size{{quantile=\"{q}\"}}"));
    let records = match (wait("0.5"), wait("0.99"), size("0.5"), size("0.99")) {
        (Some(w50), Some(w99), Some(s50), Some(s99)) => format!(
            "; a sent delivery waited for its record p50 {:.1} ms, p99 {:.1} ms, in batches of \
             p50 {s50:.0}, p99 {s99:.0}",
            w50 * 1e3,
            w99 * 1e3
        ),
        _ => String::new(),
    };
    Some(format!(
        "claims (Bursar's /metrics, its last minute): {count} claims, p50 {:.1} ms, p99 {:.1} ms, \
         max {:.1} ms; {handed} deliveries handed on by completions (since start){records}",
        p50 * 1e3,
        p99 * 1e3,
        max * 1e3
    ))
}

// ---------------------------------------------------------------------------------------------
// Endpoints and the event log, over the API

/// One endpoint per receiver URL, for every event type, with `max_concurrency` if given.
async fn add_endpoints(t: &Target, urls: &[String], cap: Option<u32>) -> Result<Vec<i64>> {
    let mut ids = Vec::new();
    for (i, url) in urls.iter().enumerate() {
        let mut body = serde_json::json!({
            "url": url,
            "event_types": ["*"],
            "description": format!("bursar-bench receiver {i}"),
        });
        if let Some(cap) = cap {
            body["max_concurrency"] = cap.into();
        }
        let req = t.client().post(t.api("/webhook_endpoints")).json(&body);
        let created = load::send(t.authed(req)).await;
        let created = created.map_err(|e| anyhow!("POST /api/webhook_endpoints: {e}"))?;
        let id = load::id_of(&created).and_then(|id| id.as_i64());
        ids.push(id.context("no integer id in the created webhook endpoint")?);
    }
    Ok(ids)
}

/// Deletes the endpoints, and with them (cascade) their deliveries, sent or not.
async fn remove_endpoints(t: &Target, ids: &[i64]) -> Result<()> {
    for id in ids {
        let url = t.api(&format!("/webhook_endpoints/{id}"));
        // Many undelivered rows make a slow delete.
        let req = t.client().delete(url).timeout(Duration::from_secs(120));
        let deleted = load::send(t.authed(req)).await;
        deleted.map_err(|e| anyhow!("DELETE /api/webhook_endpoints/{id}: {e}"))?;
    }
    Ok(())
}

/// Waits (up to a minute) until the relay has sequenced the event of order `last`, so that the
/// next phase does not share the machine with the backlog of this one.
async fn caught_up(t: &Target, last: i64) {
    let deadline = Instant::now() + Duration::from_secs(60);
    let url = t.api("/events?limit=1&types=order.created");
    let newest = || async {
        let body = load::send(t.authed(t.client().get(&url))).await.ok()?;
        let page: Value = serde_json::from_slice(&body).ok()?;
        page.pointer("/data/0/data/aggregate_id")?.as_i64()
    };
    while newest().await.unwrap_or(0) < last {
        if Instant::now() >= deadline {
            eprintln!("  (the relay had not sequenced order {last} after 60 s; going on)");
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

// ---------------------------------------------------------------------------------------------
// Delivery stages from Bursar's database

/// Bursar's database, read after a phase for the stage timestamps.
enum Db {
    Sqlite(PathBuf),
    Postgres(String),
}

impl Db {
    fn of(flags: &Flags) -> Result<Db> {
        let [flag, value] = flags;
        if flag == OsStr::new("--data-dir") {
            return Ok(Db::Sqlite(PathBuf::from(value).join("bursar.db")));
        }
        let url = value.to_str().context("a database URL that is not UTF-8")?;
        Ok(Db::Postgres(url.to_owned()))
    }

    /// PostgreSQL: the server's count of checkpoints started, after forcing one first if
    /// `force` (so that the window after it starts with none under way). `None` on SQLite, or
    /// when the count cannot be read or the role may not checkpoint (superuser or
    /// `pg_checkpoint`; said on stderr).
    async fn checkpoints(&self, force: bool) -> Option<i64> {
        let Db::Postgres(url) = self else { return None };
        let counted = async {
            let mut conn = sqlx::PgConnection::connect(url).await?;
            if force {
                sqlx::query("CHECKPOINT").execute(&mut conn).await?;
            }
            let n: i64 = sqlx::query_scalar(
                "SELECT checkpoints_timed + checkpoints_req FROM pg_stat_bgwriter",
            )
            .fetch_one(&mut conn)
            .await?;
            conn.close().await?;
            anyhow::Ok(n)
        };
        counted
            .await
            .inspect_err(|e| eprintln!("  (checkpoints not counted: {e:#})"))
            .ok()
    }

    /// For every first attempt of the deliveries of orders `lo..=hi` (ms): request →
    /// sequenced, sequenced → attempt started, the attempt's send. Bursar stores times as
    /// Unix milliseconds of its clock: the request's time (`outbox_events.created_at`), the
    /// relay's (`sequenced_at`) and the worker's at the start of the attempt
    /// (`webhook_attempts.created_at`).
    async fn stages(&self, lo: i64, hi: i64) -> Result<Vec<[u64; 3]>> {
        const SQL: &str = "SELECT e.created_at, e.sequenced_at, a.created_at, a.duration_ms \
            FROM outbox_events e JOIN webhook_deliveries d ON d.event_id = e.event_id \
            JOIN webhook_attempts a ON a.delivery_id = d.id AND a.attempt_no = 1 \
            WHERE e.event_type = 'order.created' AND e.aggregate_id BETWEEN $1 AND $2";
        type Row = (i64, Option<i64>, i64, i64);
        let rows: Vec<Row> = match self {
            Db::Sqlite(path) => {
                let opts = sqlx::sqlite::SqliteConnectOptions::new()
                    .filename(path)
                    .read_only(true);
                let mut conn = sqlx::SqliteConnection::connect_with(&opts).await?;
                let rows = sqlx::query_as(SQL).bind(lo).bind(hi);
                let rows = rows.fetch_all(&mut conn).await?;
                conn.close().await?;
                rows
            }
            Db::Postgres(url) => {
                let mut conn = sqlx::PgConnection::connect(url).await?;
                let rows = sqlx::query_as(SQL).bind(lo).bind(hi);
                let rows = rows.fetch_all(&mut conn).await?;
                conn.close().await?;
                rows
            }
        };
        let span = |from: i64, to: i64| u64::try_from(to - from).unwrap_or(0);
        let mut out = Vec::with_capacity(rows.len());
        for (created, sequenced, started, send) in rows {
            let Some(sequenced) = sequenced else {
                bail!("a delivered event with no sequenced_at");
            };
            out.push([
                span(created, sequenced),
                span(sequenced, started),
                span(0, send),
            ]);
        }
        Ok(out)
    }
}

// ---------------------------------------------------------------------------------------------
// The report

/// The latency of a delivery that did not arrive within `--drain-secs`.
const LATE: u64 = u64::MAX;

/// A latency in ms, or a lower bound for [`LATE`].
fn ms_or_late(us: u64, drain_secs: u64) -> String {
    if us == LATE {
        format!("> {drain_secs} s")
    } else {
        ms(us)
    }
}

/// Nearest-rank percentile (0 without samples); sorts in place.
fn percentile(v: &mut [u64], pct: usize) -> u64 {
    v.sort_unstable();
    let rank = (pct * v.len()).div_ceil(100).clamp(1, v.len().max(1));
    v.get(rank - 1).copied().unwrap_or(0)
}

fn per_sec(n: u64, d: Duration) -> f64 {
    n as f64 / d.as_secs_f64().max(1e-9)
}

fn report(args: &Args, r: &mut Results) -> ExitCode {
    let backend = format!("{:?}", args.backend).to_lowercase();
    let (c, d, n, w) = (
        args.concurrency,
        args.duration_secs,
        args.rounds,
        args.warmup_secs,
    );
    let (rate, recv) = (args.event_rate, args.receivers);
    println!(
        "backend: {backend}  scenario: webhooks  receivers: {recv}  event rate: {rate}/s  \
         concurrency: {c}  duration: {d}s x {n} rounds  warmup: {w}s"
    );

    let f = &mut r.fixed;
    println!();
    println!(
        "fixed rate: order creates offered at {rate}/s (open loop), each delivered to {recv} receivers"
    );
    println!(
        "| creates/s | create p50 ms | deliveries | missing | c2d p50 ms | c2d p99 ms | c2d max ms | all-{recv} p50 ms | all-{recv} p99 ms | errors |"
    );
    println!(
        "|----------:|--------------:|-----------:|--------:|-----------:|-----------:|-----------:|-----------:|-----------:|-------:|"
    );
    let sent = per_sec(f.create_us.len() as u64, f.window);
    let create_p50 = ms(percentile(&mut f.create_us, 50));
    let late = |us| ms_or_late(us, args.drain_secs);
    let (p50, p99, max) = (
        late(percentile(&mut f.pair_us, 50)),
        late(percentile(&mut f.pair_us, 99)),
        late(percentile(&mut f.pair_us, 100)),
    );
    let (all50, all99) = (
        late(percentile(&mut f.all_us, 50)),
        late(percentile(&mut f.all_us, 99)),
    );
    println!(
        "| {sent:>9.0} | {create_p50:>13} | {:>10} | {:>7} | {p50:>10} | {p99:>10} | {max:>10} | {all50:>10} | {all99:>10} | {:>6} |",
        f.delivered, f.missing, f.errors
    );
    println!(
        "c2d: commit-to-delivery, receiver arrival − the create's 201 at the bench, per receiver \
         and event ({} of {} offered creates measured, {} offered with warm-up), a delivery that \
         had not arrived {} s after the last create counted as later than that; all-{recv}: until \
         the last receiver had it",
        f.create_us.len(),
        f.offered_measured,
        f.offered,
        args.drain_secs
    );
    let offered = f64::from(rate) * f64::from(recv);
    println!(
        "arrived during the measured windows: {:.0} deliveries/s of {offered:.0}/s offered \
         ({rate} creates/s × {recv} receivers); fewer means a backlog grew in the window",
        per_sec(f.window_deliveries, f.window)
    );
    if f.duplicates > 0 || f.early > 0 {
        println!(
            "repeated deliveries: {}; delivered before the 201 reached the bench: {}",
            f.duplicates, f.early
        );
    }
    if !f.relay_ms.is_empty() {
        let p = |v: &mut Vec<u64>| {
            let (a, b) = (percentile(v, 50), percentile(v, 99));
            format!("{a} / {b}")
        };
        println!(
            "stages (Bursar's clock, whole ms, p50 / p99, {} first attempts, warm-up included): \
             request → sequenced by the relay {}; sequenced → sent by the worker {}; send {}",
            f.relay_ms.len(),
            p(&mut f.relay_ms),
            p(&mut f.queue_ms),
            p(&mut f.send_ms)
        );
    }

    if let Some(claims) = &f.claims {
        println!("{claims}");
    }
    if let Some(n) = f.checkpoints {
        println!(
            "checkpoints started by PostgreSQL during the fixed-rate phases (warm-up \
             included; each began right after a forced one): {n}"
        );
    }

    println!();
    println!(
        "closed loop: {c} clients creating orders, on an account without endpoints, then on one with {recv}"
    );
    println!("| endpoints | op       |  ops/s | p50 ms | p99 ms | errors |");
    println!("|----------:|----------|-------:|-------:|-------:|-------:|");
    let mut errors = f.errors;
    for (eps, s) in [(0, &mut r.plain), (recv, &mut r.hooked)] {
        let (p50, p99) = (ms(s.percentile_us(50)), ms(s.percentile_us(99)));
        let (rate, e) = (s.rate(), s.errors);
        println!("| {eps:>9} | create   | {rate:>6} | {p50:>6} | {p99:>6} | {e:>6} |");
        errors += e;
    }
    let deliveries = per_sec(r.window_deliveries, r.window);
    println!("| {recv:>9} | delivery | {deliveries:>6.0} |      – |      – |      – |");
    let ratio = r.hooked.rate() as f64 / r.plain.rate().max(1) as f64;
    let events = per_sec(r.window_events, r.window);
    println!(
        "ratio creates/s with {recv} endpoints / without: {ratio:.2}   fan-out in the window: \
         {deliveries:.0} deliveries/s, {events:.0} events/s delivered to all {recv}"
    );
    for line in &r.drains {
        println!("{line}");
    }

    let mut failed = false;
    if errors > 0 {
        eprintln!("{errors} requests failed");
        failed = true;
    }
    if f.missing > 0 {
        let why = if f.still_arriving {
            "deliveries were still arriving then: the fan-out is slower than --event-rate \
             (raise --drain-secs to check them all, or lower the rate)"
        } else {
            "none had arrived for a second or more: lost deliveries are a bug"
        };
        eprintln!(
            "{} fixed-rate deliveries missing {} s after the last create; {why}",
            f.missing, args.drain_secs
        );
        failed = true;
    }
    if r.malformed > 0 {
        eprintln!("{} malformed deliveries", r.malformed);
        failed = true;
    }
    if !r.other.is_empty() {
        eprintln!(
            "note: deliveries of other event types (ignored): {:?}",
            r.other
        );
    }
    if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tally_counts_pairs_duplicates_and_strays() {
        let t0 = Instant::now();
        let at = |ms| t0 + Duration::from_millis(ms);
        let mut t = Tally::new(2, Some((at(0), at(100))));
        t.expect(1, Some(at(0)), true);
        t.expect(2, None, false);
        let arrive = |receiver, order, ms| Arrival {
            receiver,
            order,
            at: at(ms),
        };
        t.absorb(vec![
            arrive(0, 1, 10),
            arrive(1, 1, 30),
            arrive(1, 1, 40),
            arrive(0, 2, 90),
            arrive(0, 3, 50),
        ]);
        assert_eq!((t.delivered, t.duplicates, t.foreign), (3, 1, 1));
        assert_eq!(t.missing(), 1);
        assert_eq!(t.pair_us, vec![10_000, 30_000]);
        assert_eq!(t.all_us, vec![30_000]);
        assert_eq!((t.window_deliveries, t.window_events), (3, 1));
        t.absorb(vec![arrive(1, 2, 120)]);
        assert_eq!((t.missing(), t.after_window, t.window_events), (0, 1, 1));
        assert_eq!(t.undelivered_measured(), (0, 0));
        t.expect(4, Some(at(0)), true);
        t.absorb(vec![arrive(1, 4, 130)]);
        assert_eq!(t.undelivered_measured(), (1, 1));
        assert_eq!(ms_or_late(LATE, 30), "> 30 s");
        assert_eq!(ms_or_late(1_234, 30), "1.23");
        assert_eq!(Tally::new(32, None).full(), u32::MAX);
        assert_eq!(percentile(&mut [3, 1, 2], 50), 2);
        assert_eq!(percentile(&mut [], 99), 0);
    }
}
