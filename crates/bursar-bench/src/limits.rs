//! The `limits` scenario (issue 6): the per-request overhead of Bursar's rate limiter, as the
//! ratio of GET throughput with limits to GET throughput without them, in the same run.
//!
//! Three `bursar serve` processes run side by side on one store, each with an account of its own
//! (the store is shared so that all three read the same database the same way):
//!
//! 1. `nolimits`: Bursar's defaults, whose `default` plan has no key or account limit (the
//!    baseline of both ratios);
//! 2. `local`: the `default` plan with key and account limits so high that nothing is ever
//!    refused, decided in-process (sharded GCRA);
//! 3. `redis`: the same plan, decided by Bursar's GCRA script in Redis (`--redis-url`), under a
//!    key prefix new in every run, failing closed: a request the script did not decide is a 503,
//!    so every success was decided by the script in Redis (fail-open would quietly answer from
//!    the in-process fallback and measure the wrong thing).
//!
//! Each target first gets [`ORDERS`] orders (not measured), then every round runs one
//! closed-loop GET phase per target in turn (nolimits, local, redis, then the next round), so
//! drift over the run touches all three alike; the rounds are pooled per target. Any non-2xx is
//! an error: a 429 would mean the limits were not high enough, a bug in the scenario.

use std::hash::{BuildHasher, RandomState};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use reqwest::Client;

use crate::bursar::{self, Flags, Server};
use crate::load::{self, Keys, Op, Sample, Target};
use crate::{Args, finish, ms};

/// Orders created per target before measuring: enough that the GETs spread over many real rows
/// (as an API client's reads do), few enough to create in a second or two.
const ORDERS: usize = 300;

/// Requests per window of both policies of the limited targets. The window is 1 s, so at most a
/// million requests a second per key and per account: far beyond what one machine serves, so
/// no request is ever refused while every request still runs the whole check.
const HIGH_LIMIT: u32 = 1_000_000;

/// One `bursar serve` of the scenario.
struct Setup {
    /// Target name, as it appears in the report.
    name: &'static str,
    /// Account created for it (the admin CLI creates it; names must differ per server).
    account: &'static str,
    /// What decides its limits, for the report.
    limiter: &'static str,
    /// Extra TOML for its config file.
    config: String,
    /// Whether its answers carry `RateLimit-Policy` (checked before measuring).
    limited: bool,
}

/// The three setups, in the order each round visits them.
fn setups(redis_url: &str, redis_prefix: &str) -> Result<[Setup; 3]> {
    let plan = format!(
        "[plans.default]\nkey_limit = {HIGH_LIMIT}\nkey_window_secs = 1\n\
         account_limit = {HIGH_LIMIT}\naccount_window_secs = 1\n"
    );
    // JSON strings are valid TOML basic strings.
    let (url, prefix) = (
        serde_json::to_string(redis_url)?,
        serde_json::to_string(redis_prefix)?,
    );
    let redis = format!(
        "{plan}[limits]\nredis_url = {url}\nredis_key_prefix = {prefix}\nfail_mode = \"closed\"\n"
    );
    Ok([
        Setup {
            name: "nolimits",
            account: "nolimits",
            limiter: "none (defaults)",
            config: String::new(),
            limited: false,
        },
        Setup {
            name: "local",
            account: "local",
            limiter: "in-process GCRA",
            config: plan,
            limited: true,
        },
        Setup {
            name: "redis",
            account: "redis",
            limiter: "Redis GCRA script",
            config: redis,
            limited: true,
        },
    ])
}

/// A key prefix no earlier run used, so no bucket carries over between runs (each key also
/// expires by itself within a second of its last request).
fn redis_prefix() -> String {
    // `RandomState` is randomly seeded by std, which saves a dependency.
    let random = RandomState::new().hash_one(1u8);
    format!("bench-{random:016x}")
}

/// Pooled measurements of one target, and its rate in each round (to judge the noise).
struct Measured {
    setup: Setup,
    sample: Sample,
    per_round: Vec<u64>,
}

/// Runs the scenario and prints its report; the exit status is non-zero if a request failed.
pub async fn run(args: &Args) -> Result<ExitCode> {
    let bin = args.bursar_bin.as_deref().context("no --bursar-bin")?;
    let client = Client::builder().http1_only().no_proxy();
    let client = client.timeout(Duration::from_secs(10)).build()?;
    let (scratch, flags) = bursar::store(args.backend, args.database_url.as_deref()).await?;
    let prefix = redis_prefix();
    let results = async {
        let setups = setups(&args.redis_url, &prefix)?;
        let mut servers = Vec::new();
        let started = start_all(bin, &flags, &client, setups, &mut servers).await;
        let results = match started {
            Ok(targets) => measure(args, targets).await,
            Err(e) => Err(e),
        };
        let mut killed = Ok(());
        for server in servers {
            killed = killed.and(server.kill().await);
        }
        finish(results, killed)
    };
    let results = results.await;
    let mut results = finish(results, scratch.remove().await)?;
    Ok(report(args, &prefix, &mut results))
}

/// Starts one server per setup, one after the other (each waits for `/readyz`, so the store's
/// migrations never run twice at once), pushing each into `servers` as soon as it runs so the
/// caller stops it whatever happens next. Each target then gets its orders, and one GET shows
/// that its limiter is the one configured.
async fn start_all(
    bin: &std::path::Path,
    flags: &Flags,
    client: &Client,
    setups: [Setup; 3],
    servers: &mut Vec<Server>,
) -> Result<Vec<(Setup, Arc<Target>, Vec<String>)>> {
    let mut targets = Vec::new();
    for setup in setups {
        eprintln!("starting {}: {}", setup.name, setup.limiter);
        let accounts = [(setup.name, setup.account)];
        let started = bursar::start(bin, flags, client, &setup.config, &accounts).await;
        let (server, mut ts) =
            started.with_context(|| format!("starting {}{}", setup.name, hint(&setup)))?;
        servers.push(server);
        let target = Arc::new(ts.pop().context("bursar::start returned no target")?);
        let created = load::create_orders(&target, ORDERS, 8).await?;
        ensure!(
            created.errors == 0 && created.ids.len() == ORDERS,
            "{}: {} of {ORDERS} orders created, {} failed",
            setup.name,
            created.ids.len(),
            created.errors
        );
        probe(&setup, &target, &created.ids[0]).await?;
        targets.push((setup, target, created.ids));
    }
    Ok(targets)
}

/// What to check when a target fails: the `redis` one fails closed, so an unreachable Redis
/// makes every request (the setup's too) a 503.
fn hint(setup: &Setup) -> &'static str {
    if setup.name == "redis" {
        " (it fails closed: is Redis answering at --redis-url?)"
    } else {
        ""
    }
}

/// One GET before measuring: a 2xx, with `RateLimit-Policy` naming both high limits on a
/// limited target and none on the other. Without it a typo in the config (or a Bursar that
/// ignores it) would measure no limiter at all and still report a fine ratio.
async fn probe(setup: &Setup, target: &Target, id: &str) -> Result<()> {
    let url = target.api(&format!("/orders/{id}"));
    let resp = target.authed(target.client().get(url)).send().await?;
    let status = resp.status();
    let policy = resp
        .headers()
        .get("ratelimit-policy")
        .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned());
    let body = resp.text().await.unwrap_or_default();
    if !status.is_success() {
        bail!("{}: probe GET: {status}{}: {body}", setup.name, hint(setup));
    }
    let wanted = [
        format!("\"key\";q={HIGH_LIMIT};w=1"),
        format!("\"account\";q={HIGH_LIMIT};w=1"),
    ];
    let ok = match (&policy, setup.limited) {
        (None, false) => true,
        (Some(p), true) => wanted.iter().all(|w| p.contains(w.as_str())),
        _ => false,
    };
    ensure!(
        ok,
        "{}: RateLimit-Policy is {policy:?}, expected {}",
        setup.name,
        if setup.limited {
            wanted.join(", ")
        } else {
            "none".to_owned()
        }
    );
    Ok(())
}

/// Runs the rounds: in each, one GET phase per target in setup order; pools per target.
async fn measure(
    args: &Args,
    targets: Vec<(Setup, Arc<Target>, Vec<String>)>,
) -> Result<Vec<Measured>> {
    let settings = load::Settings {
        concurrency: args.concurrency,
        warmup: Duration::from_secs(args.warmup_secs),
        duration: Duration::from_secs(args.duration_secs),
    };
    let mut results: Vec<Measured> = Vec::new();
    let mut runs = Vec::new();
    for (setup, target, ids) in targets {
        runs.push((target, ids));
        results.push(Measured {
            setup,
            sample: Sample::default(),
            per_round: Vec::new(),
        });
    }
    for round in 1..=args.rounds {
        for ((target, ids), m) in runs.iter().zip(&mut results) {
            eprintln!("round {round}/{}: {} get", args.rounds, target.name);
            let phase = load::run_phase(target, Op::Get, Keys::None, ids.clone(), settings).await?;
            m.per_round.push(phase.rate());
            m.sample.absorb(phase);
        }
    }
    Ok(results)
}

/// The ratio of two rates, and whether it meets `target`.
fn ratio(with: &Sample, without: &Sample, target: f64) -> String {
    // Rates are requests per second, far below 2^52: exact as f64.
    let r = with.rate() as f64 / without.rate().max(1) as f64;
    let verdict = if r >= target { "met" } else { "missed" };
    format!("{r:.2} (target >= {target:.1}: {verdict})")
}

/// Prints the markdown table and the two ratios; the exit status is non-zero if any request
/// failed. A missed target is reported, not failed: the scenario measures, CI smoke-tests it.
fn report(args: &Args, prefix: &str, results: &mut [Measured]) -> ExitCode {
    let backend = format!("{:?}", args.backend).to_lowercase();
    let (c, d, r, w) = (
        args.concurrency,
        args.duration_secs,
        args.rounds,
        args.warmup_secs,
    );
    println!(
        "backend: {backend}  scenario: limits  concurrency: {c}  duration: {d}s x {r} rounds  warmup: {w}s"
    );
    println!("| target   | limiter           |  req/s | p50 ms | p99 ms | errors |");
    println!("|----------|-------------------|-------:|-------:|-------:|-------:|");
    let mut errors = 0;
    for m in results.iter_mut() {
        let s = &mut m.sample;
        let (p50, p99) = (ms(s.percentile_us(50)), ms(s.percentile_us(99)));
        let (name, limiter, rate, e) = (m.setup.name, m.setup.limiter, s.rate(), s.errors);
        println!("| {name:<8} | {limiter:<17} | {rate:>6} | {p50:>6} | {p99:>6} | {e:>6} |");
        errors += e;
    }
    let rounds: Vec<String> = results
        .iter()
        .map(|m| {
            let rates: Vec<String> = m.per_round.iter().map(u64::to_string).collect();
            format!("{} {}", m.setup.name, rates.join(" / "))
        })
        .collect();
    println!("req/s per round: {}", rounds.join("   "));
    if let [base, local, redis] = &*results {
        let l = ratio(&local.sample, &base.sample, 0.9);
        let r = ratio(&redis.sample, &base.sample, 0.7);
        println!("ratio local/nolimits: {l}   ratio redis/nolimits: {r}   (GET req/s)");
    }
    // Not the Redis URL: it may hold a password.
    println!(
        "limits: key and account {HIGH_LIMIT}/s on the default plan; Redis keys under {prefix}:"
    );
    if errors > 0 {
        eprintln!("{errors} requests failed");
        return ExitCode::FAILURE;
    }
    ExitCode::SUCCESS
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The limits go where Bursar reads them, and only the `redis` target talks to Redis.
    #[test]
    fn setups_configure_the_limiters() {
        let [none, local, redis] = setups("redis://127.0.0.1:6379", "bench-1").unwrap();
        assert!(none.config.is_empty() && !none.limited);
        assert!(local.limited && redis.limited);
        assert!(!local.config.contains("redis"));
        assert!(redis.config.starts_with(&local.config));
        assert!(
            redis
                .config
                .contains("redis_url = \"redis://127.0.0.1:6379\"")
        );
        assert!(redis.config.contains("redis_key_prefix = \"bench-1\""));
        assert!(redis.config.contains("fail_mode = \"closed\""));
        let names: Vec<_> = [&none, &local, &redis].map(|s| s.account).into();
        assert_eq!(names, ["nolimits", "local", "redis"]);
    }

    #[test]
    fn prefixes_differ_and_keep_the_hash_tag() {
        let (a, b) = (redis_prefix(), redis_prefix());
        assert_ne!(a, b);
        assert!(!a.contains(['{', '}']));
    }
}
