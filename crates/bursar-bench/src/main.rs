//! `bursar-bench`: measures Bursar against a bare axum + sqlx baseline in the same run and
//! prints the ratio. Absolute numbers depend on the machine; the ratio is what compares across
//! machines and commits, and interleaving the targets (A B A B) keeps drift from favouring one.
//! Both sides of the `payments` scenario's ratio are Bursar (payments against its own order
//! creates, phase after phase in each round); its baseline is the *ceiling*, the same pay ops
//! against a bare handler that makes Bursar's processor call and stores nothing (see
//! `baseline.rs`), reported against Bursar's creates too. `webhooks` needs no baseline
//! (`webhooks.rs`): its baseline is Bursar's order creates on an account without endpoints.
//! Nor does `limits` (`limits.rs`): its baseline is Bursar's GETs on a server without limits.

mod baseline;
mod bursar;
mod costs;
mod limits;
mod live;
mod load;
mod webhooks;

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, ensure};
use clap::{Parser, ValueEnum};
use reqwest::Client;
use sqlx::{AssertSqlSafe, Connection};

use load::{Keys, Op, PayFlow, Sample, Target};

#[derive(Clone, Copy, PartialEq, Eq, Debug, ValueEnum)]
pub enum Backend {
    Sqlite,
    Postgres,
}

#[derive(Parser)]
#[command(about = "Load-test Bursar against a bare axum + sqlx baseline")]
struct Args {
    /// The `bursar` binary to measure.
    #[arg(long, required_unless_present = "baseline_only")]
    bursar_bin: Option<PathBuf>,
    #[arg(long, value_enum)]
    backend: Backend,
    /// PostgreSQL server (for `--backend postgres`); the bench creates and drops its own
    /// schema and database there.
    #[arg(long, required_if_eq("backend", "postgres"))]
    database_url: Option<String>,
    /// Concurrent closed-loop clients.
    #[arg(long, default_value_t = 32)]
    concurrency: usize,
    /// Measured seconds per phase and round.
    #[arg(long, default_value_t = 10)]
    duration_secs: u64,
    /// Unrecorded seconds before each measured phase.
    #[arg(long, default_value_t = 2)]
    warmup_secs: u64,
    /// Rounds of baseline-then-Bursar; the samples of all rounds are pooled.
    #[arg(long, default_value_t = 2)]
    rounds: u32,
    /// Measure only the baseline (no `bursar` binary needed).
    #[arg(long)]
    baseline_only: bool,
    /// `crud`: create then get, against the bare insert and select. `idempotency`: Bursar
    /// creates with a fresh Idempotency-Key each against the bare insert, then Bursar replays
    /// of one completed key against a hello-world handler. `payments`: order creates, then
    /// pays orders created earlier (`--pay-flow`) through the sandbox processor running inside
    /// `bursar serve`; beside it the ceiling, a bare handler that makes the same processor
    /// call and stores nothing (its creates are the bare insert).
    /// `webhooks`: Bursar only, webhook fan-out of `order.created` to local receivers: order
    /// creates at a fixed rate (commit-to-delivery latency, every delivery checked, and the
    /// deliveries that arrived inside the measured window against those offered), then
    /// closed-loop creates on an account without endpoints and on one with them (creates/s
    /// ratio, deliveries/s).
    /// `live`: Bursar only, `--subscribers` SSE streams on one instance, then `--events`
    /// order creates at `--event-rate`: server memory (VmRSS) without subscribers (the
    /// baseline), with them idle and after the fan-out, and every event at every subscriber.
    /// `limits`: Bursar only, GETs of orders on three servers side by side on one store: no
    /// limits (the baseline), key and account limits too high to refuse anything decided
    /// in-process, and the same decided in Redis (`--redis-url`); GET req/s ratios.
    #[arg(long, value_enum, default_value_t = Scenario::Crud)]
    scenario: Scenario,
    /// `live` only: concurrent SSE subscribers.
    #[arg(long, default_value_t = 5000)]
    subscribers: usize,
    /// `live` only: events produced (order creates) once every subscriber is connected.
    #[arg(long, default_value_t = 100)]
    events: usize,
    /// `payments` only: how a pay op captures. `two-step`: create with capture false, then
    /// capture (two requests, two processor calls). `one-step`: create with the default
    /// capture true (one request, one processor call).
    #[arg(long, value_enum, default_value_t = PayFlow::TwoStep)]
    pay_flow: PayFlow,
    /// `webhooks` only: order creates per second offered (open loop) in the fixed-rate phase.
    #[arg(long, default_value_t = 500)]
    event_rate: u32,
    /// `webhooks` only: local receivers, each registered as an endpoint for every event.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u32).range(1..=32))]
    receivers: u32,
    /// `webhooks` only: how long, after a phase's last create, to wait for its deliveries. A
    /// fixed-rate event not delivered to every receiver by then fails the run; after a
    /// closed-loop phase the backlog left is reported and dropped.
    #[arg(long, default_value_t = 30)]
    drain_secs: u64,
    /// `webhooks` only, for experiments: Bursar's `webhooks.poll_interval_ms` (default: Bursar's).
    #[arg(long)]
    webhook_poll_ms: Option<u64>,
    /// `webhooks` only, for experiments: Bursar's `webhooks.concurrency` (default: Bursar's).
    #[arg(long)]
    webhook_concurrency: Option<usize>,
    /// `webhooks` only, for experiments: each endpoint's `max_concurrency` (default: Bursar's).
    #[arg(long)]
    endpoint_concurrency: Option<u32>,
    /// `limits` only: the Redis that the `redis` target's limiter uses (keys under a prefix new
    /// in every run, each expiring within a second of its last use).
    #[arg(long, default_value = "redis://127.0.0.1:6379")]
    redis_url: String,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug, ValueEnum)]
enum Scenario {
    Crud,
    Idempotency,
    Payments,
    Webhooks,
    Live,
    Limits,
}

impl Scenario {
    /// The two phases of a round for `target`: (op, keys) for the first and the second.
    fn phases(self, target: &str, flow: PayFlow) -> [(Op, Keys); 2] {
        let bursar = target == "bursar";
        match self {
            Scenario::Crud => [(Op::Create, Keys::None), (Op::Get, Keys::None)],
            Scenario::Idempotency if bursar => {
                [(Op::Create, Keys::Fresh), (Op::Create, Keys::Fixed)]
            }
            Scenario::Idempotency => [(Op::Create, Keys::None), (Op::Hello, Keys::None)],
            // A real client sends a key of its own with every payment request.
            Scenario::Payments => [(Op::Create, Keys::None), (Op::Pay(flow), Keys::Fresh)],
            Scenario::Webhooks | Scenario::Live | Scenario::Limits => {
                unreachable!("the webhooks, live and limits scenarios have their own drivers")
            }
        }
    }

    /// Column labels of the two phases.
    fn labels(self) -> [&'static str; 2] {
        match self {
            Scenario::Crud => ["create", "get"],
            Scenario::Idempotency => ["create", "replay"],
            Scenario::Payments => ["create", "pay"],
            Scenario::Webhooks | Scenario::Live | Scenario::Limits => {
                unreachable!("the webhooks, live and limits scenarios have their own drivers")
            }
        }
    }
}

/// Per target: name, pooled sample of the first phase, pooled sample of the second.
type Results = Vec<(&'static str, Sample, Sample)>;

fn main() -> Result<ExitCode> {
    // reqwest is built without a default rustls provider and panics if none is installed.
    let provider = rustls::crypto::ring::default_provider();
    provider
        .install_default()
        .map_err(|_| anyhow!("rustls provider already installed"))?;
    let args = Args::parse();
    let positive = args.concurrency > 0 && args.duration_secs > 0 && args.rounds > 0;
    ensure!(
        positive,
        "--concurrency, --duration-secs and --rounds must be at least 1"
    );
    let bursar_only = matches!(
        args.scenario,
        Scenario::Payments | Scenario::Webhooks | Scenario::Live | Scenario::Limits
    );
    ensure!(
        !(bursar_only && args.baseline_only),
        "--scenario {:?} measures Bursar only; drop --baseline-only",
        args.scenario
    );
    ensure!(args.event_rate > 0, "--event-rate must be at least 1");
    // The load generator's runtime; the baseline server gets a runtime of its own.
    let rt = tokio::runtime::Runtime::new().context("building the tokio runtime")?;
    if args.scenario == Scenario::Live {
        return rt.block_on(live::run(&args));
    }
    if args.scenario == Scenario::Webhooks {
        return rt.block_on(webhooks::run(&args));
    }
    if args.scenario == Scenario::Limits {
        return rt.block_on(limits::run(&args));
    }
    let results = rt.block_on(run(&args))?;
    Ok(report(&args, results))
}

/// Starts the targets, measures, and tears everything down again on every path.
async fn run(args: &Args) -> Result<Results> {
    // One client for everything: HTTP/1.1 with keep-alive, as a typical API client uses.
    let client = Client::builder().http1_only().no_proxy();
    let client = client.timeout(Duration::from_secs(10)).build()?;
    let url = args.database_url.as_deref();
    let baseline = baseline::Baseline::start(args.backend, url).await?;
    let name = match args.scenario {
        Scenario::Payments => "ceiling",
        _ => "baseline",
    };
    let mut base = baseline.target(name, &client);
    // The ceiling's payments store nothing and read no order.
    base.any_order = args.scenario == Scenario::Payments;
    let base = Arc::new(base);
    let results = match args.bursar_bin.as_deref() {
        Some(bin) if !args.baseline_only => with_bursar(args, bin, &client, Some(base)).await,
        _ => measure(args, &[base]).await,
    };
    finish(results, baseline.stop().await)
}

/// Adds Bursar beside the baseline (if any); its process and store go away on every path.
async fn with_bursar(
    args: &Args,
    bin: &Path,
    client: &Client,
    base: Option<Arc<Target>>,
) -> Result<Results> {
    let (scratch, flags) = bursar::store(args.backend, args.database_url.as_deref()).await?;
    let results = async {
        let accounts = [("bursar", "bench")];
        let (server, mut bursar) = bursar::start(bin, &flags, client, "", &accounts).await?;
        let pid = server.pid().context("bursar's pid")?;
        let server_url = args.database_url.as_deref();
        let wal = server_url.filter(|_| args.backend == Backend::Postgres);
        let meter = Arc::new(costs::Meter::new(pid, wal).await?);
        for t in &mut bursar {
            t.meter = Some(meter.clone());
        }
        let bursar = bursar.into_iter().map(Arc::new);
        let targets: Vec<_> = base.into_iter().chain(bursar).collect();
        let results = measure(args, &targets).await;
        if args.scenario == Scenario::Payments
            && let Some(t) = targets.last()
        {
            for writer in ["steps", "claims", "records", "captures", "creates"] {
                if let Some(line) = group_commit(t, writer).await {
                    eprintln!("{line}");
                }
            }
        }
        finish(results, server.kill().await)
    };
    let results = results.await;
    finish(results, scratch.remove().await)
}

/// One group-commit writer's batches as Bursar's `/metrics` summarised them (its last minute,
/// so after a pay phase mostly that phase): `None` if they cannot be read or the writer wrote
/// nothing (PostgreSQL has no `steps` writer, SQLite no `claims` or `records` writer).
async fn group_commit(t: &Target, writer: &str) -> Option<String> {
    let text = t.client().get(t.server("/metrics")).send().await.ok()?;
    let text = text.text().await.ok()?;
    let value = |name: &str, q: &str| {
        let key = format!("{name}{{writer=\"{writer}\",quantile=\"{q}\"}}");
        text.lines()
            .find_map(|l| l.strip_prefix(key.as_str())?.trim().parse::<f64>().ok())
    };
    let pair = |name: &str| Some((value(name, "0.5")?, value(name, "0.99")?));
    let (size50, size99) = pair("group_commit_batch_size")?;
    let (wait50, wait99) = pair("group_commit_wait_seconds")?;
    let (write50, write99) = pair("group_commit_write_seconds")?;
    Some(format!(
        "group commit, writer {writer} (Bursar's /metrics, its last minute): batches of p50 \
         {size50:.0}, p99 {size99:.0}; a write waited for its batch p50 {:.2} ms, p99 {:.2} ms; \
         a batch took p50 {:.2} ms, p99 {:.2} ms",
        wait50 * 1e3,
        wait99 * 1e3,
        write50 * 1e3,
        write99 * 1e3
    ))
}

/// The work's error wins; a cleanup error fails an otherwise good run.
fn finish<T>(work: Result<T>, cleanup: Result<()>) -> Result<T> {
    if let (Err(_), Err(e)) = (&work, &cleanup) {
        eprintln!("cleanup failed too: {e:#}");
    }
    let value = work?;
    cleanup.map(|()| value)
}

/// Runs the rounds, each target's two phases in turn, and pools the samples per target.
async fn measure(args: &Args, targets: &[Arc<Target>]) -> Result<Results> {
    let settings = load::Settings {
        concurrency: args.concurrency,
        warmup: Duration::from_secs(args.warmup_secs),
        duration: Duration::from_secs(args.duration_secs),
    };
    let empty = |t: &Arc<Target>| (t.name, Sample::default(), Sample::default());
    let mut results: Results = targets.iter().map(empty).collect();
    // Each target pays its own orders.
    let mut unpaid: Vec<Unpaid> = targets.iter().map(|_| Unpaid::default()).collect();
    for round in 1..=args.rounds {
        let each = targets.iter().zip(&mut results).zip(&mut unpaid);
        for ((t, (_, firsts, seconds)), unpaid) in each {
            let [(op1, keys1), (op2, keys2)] = args.scenario.phases(t.name, args.pay_flow);
            eprintln!(
                "round {round}/{}: {} {:?}",
                args.rounds, t.name, args.scenario
            );
            let mut first = load::run_phase(t, op1, keys1, vec![], settings).await?;
            let mut ids = std::mem::take(&mut first.ids);
            firsts.absorb(first);
            let supplied = matches!(op2, Op::Pay(_)) && !t.any_order;
            if supplied {
                ids = unpaid.supply(t, ids, args.concurrency, firsts).await?;
            }
            let given = ids.len();
            let mut second = load::run_phase(t, op2, keys2, ids, settings).await?;
            if supplied {
                unpaid.put_back(given, std::mem::take(&mut second.ids));
            }
            seconds.absorb(second);
        }
    }
    Ok(results)
}

/// Pending orders for pay phases: an order is paid at most once, and the ones a phase leaves
/// unpaid stay for the next round.
#[derive(Default)]
struct Unpaid {
    ids: Vec<String>,
    /// The most orders one pay phase has used so far.
    most_used: Option<usize>,
}

impl Unpaid {
    /// The orders for the next pay phase: the unpaid ones plus `created`, topped up (by creates
    /// outside any measured window) to half again the expected use plus one per client. The
    /// expected use is the most a pay phase has used so far or, before the first, as many as
    /// `created` (a payment does more than an order create). Failed top-up creates count as
    /// errors of `creates`.
    async fn supply(
        &mut self,
        t: &Arc<Target>,
        mut created: Vec<String>,
        concurrency: usize,
        creates: &mut Sample,
    ) -> Result<Vec<String>> {
        let expected = self.most_used.unwrap_or(created.len());
        self.ids.append(&mut created);
        let wanted = expected + expected / 2 + concurrency;
        if let Some(n) = wanted.checked_sub(self.ids.len()).filter(|&n| n > 0) {
            eprintln!("  creating {n} more orders to pay (not measured)");
            let mut more = load::create_orders(t, n, concurrency).await?;
            self.ids.append(&mut more.ids);
            creates.absorb(more);
        }
        Ok(std::mem::take(&mut self.ids))
    }

    /// Takes back what a pay phase given `given` orders left unpaid.
    fn put_back(&mut self, given: usize, unpaid: Vec<String>) {
        let used = given - unpaid.len();
        self.most_used = Some(self.most_used.unwrap_or(0).max(used));
        self.ids = unpaid;
    }
}

/// Prints the markdown table; the exit status is non-zero if any request failed.
fn report(args: &Args, mut results: Results) -> ExitCode {
    let backend = format!("{:?}", args.backend).to_lowercase();
    let (c, d, r, w) = (
        args.concurrency,
        args.duration_secs,
        args.rounds,
        args.warmup_secs,
    );
    let scenario = format!("{:?}", args.scenario).to_lowercase();
    println!(
        "backend: {backend}  scenario: {scenario}  concurrency: {c}  duration: {d}s x {r} rounds  warmup: {w}s"
    );
    // A two-step pay op is two requests (create and capture); every other op is one.
    let unit = if args.scenario == Scenario::Payments {
        "ops/s"
    } else {
        "req/s"
    };
    println!("| target   | op     |  {unit} | p50 ms | p99 ms | errors |");
    println!("|----------|--------|-------:|-------:|-------:|-------:|");
    let mut errors = 0;
    let labels = args.scenario.labels();
    for (phase, label) in labels.iter().enumerate() {
        for (name, creates, gets) in &mut results {
            let s = if phase == 0 { creates } else { gets };
            let (p50, p99) = (ms(s.percentile_us(50)), ms(s.percentile_us(99)));
            let (op, rate, e) = (*label, s.rate(), s.errors);
            println!("| {name:<8} | {op:<6} | {rate:>6} | {p50:>6} | {p99:>6} | {e:>6} |");
            errors += e;
        }
    }
    print_costs(args, &results);
    let ratio = |a: &Sample, b: &Sample| a.rate() as f64 / b.rate().max(1) as f64;
    match &results[..] {
        [(_, _, ceiling), (_, creates, pays)] if args.scenario == Scenario::Payments => {
            let (r, top) = (ratio(pays, creates), ratio(ceiling, creates));
            let flow = format!("{:?}", args.pay_flow).to_lowercase();
            println!("ratio payment(create+capture, {flow})/order create: {r:.2}   (ops/s)");
            println!("ceiling: storage-free pay ops/Bursar order create: {top:.2}   (ops/s)");
        }
        [(_, base_c, base_g), (_, bursar_c, bursar_g)] => {
            let (c, g) = (ratio(bursar_c, base_c), ratio(bursar_g, base_g));
            let [l1, l2] = labels;
            println!("ratio bursar/baseline: {l1} {c:.2}  {l2} {g:.2}   (req/s)");
        }
        _ => {}
    }
    if errors > 0 {
        eprintln!("{errors} requests failed");
        return ExitCode::FAILURE;
    }
    ExitCode::SUCCESS
}

/// What each metered (target, op) cost per op and, for payments, a pay op against a create in
/// each resource: the ratio cannot pass 0.5× while a pay op costs more than twice a create in
/// a resource that is saturated.
fn print_costs(args: &Args, results: &Results) {
    let metered = results
        .iter()
        .filter(|(_, a, b)| !(a.cost.is_empty() && b.cost.is_empty()));
    let metered: Vec<_> = metered.collect();
    if metered.is_empty() {
        return;
    }
    println!(
        "cost per op, measured windows only (CPU from /proc; written: PostgreSQL's WAL, or on SQLite Bursar's disk writes):"
    );
    println!("{}", costs::HEADER);
    let [l1, l2] = args.scenario.labels();
    for (name, first, second) in &metered {
        println!("{}", first.cost.row(name, l1));
        println!("{}", second.cost.row(name, l2));
    }
    if args.scenario != Scenario::Payments {
        return;
    }
    for (_, creates, pays) in metered {
        let (c, p) = (&creates.cost, &pays.cost);
        let times = |a: Option<u64>, b: Option<u64>| match (a, b) {
            (Some(a), Some(b)) if a > 0 => format!("{:.1}x", b as f64 / a as f64),
            _ => "-".to_owned(),
        };
        println!(
            "a pay op against a create: Bursar CPU {}, database CPU {}, written {}",
            times(c.bursar_us(), p.bursar_us()),
            times(c.database_us(), p.database_us()),
            times(c.written_per_op(), p.written_per_op()),
        );
    }
}

/// Microseconds as milliseconds with two decimals, in integer math.
fn ms(us: u64) -> String {
    format!("{}.{:02}", us / 1000, us % 1000 / 10)
}

/// Scratch storage made for one run and removed at its end.
pub enum Scratch {
    Dir(tempfile::TempDir),
    /// A PostgreSQL schema or database: the server URL and the statement that drops it.
    Postgres(String, String),
}

impl Scratch {
    /// Creates a `SCHEMA` or `DATABASE` with a random name on `url`; returns it and its name.
    async fn postgres(url: &str, kind: &str) -> Result<(Scratch, String)> {
        use std::hash::{BuildHasher, RandomState};
        // `RandomState` is randomly seeded by std, which saves a dependency.
        let random = RandomState::new().hash_one(0u8);
        let (prefix, how) = match kind {
            "SCHEMA" => ("bench", "CASCADE"),
            _ => ("bursar_bench", "WITH (FORCE)"),
        };
        let name = format!("{prefix}_{random:016x}");
        pg_admin(url, format!("CREATE {kind} {name}")).await?;
        let drop = format!("DROP {kind} {name} {how}");
        Ok((Scratch::Postgres(url.to_owned(), drop), name))
    }

    async fn remove(self) -> Result<()> {
        match self {
            Scratch::Dir(dir) => dir.close().context("removing a temp dir"),
            Scratch::Postgres(url, drop) => pg_admin(&url, drop).await,
        }
    }
}

/// Runs one statement on a fresh connection. Only for DDL on names made by
/// [`Scratch::postgres`], hence safe to splice.
async fn pg_admin(url: &str, sql: String) -> Result<()> {
    let mut conn = sqlx::PgConnection::connect(url)
        .await
        .context("connecting to PostgreSQL")?;
    let done = sqlx::raw_sql(AssertSqlSafe(sql.clone()))
        .execute(&mut conn)
        .await;
    done.with_context(|| format!("running {sql}"))?;
    Ok(conn.close().await?)
}
