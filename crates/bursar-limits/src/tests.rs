//! Behaviour tests through the public API (spec checklist items 13–24). The Redis tests read the
//! server URL from `BURSAR_TEST_REDIS_URL` and skip with a note when it is absent; each uses its
//! own random key prefix and deletes only the keys under it.

use std::collections::HashMap;
use std::hash::{BuildHasher, RandomState};
use std::net::{IpAddr, Ipv6Addr, TcpListener};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use metrics::{
    Counter, CounterFn, Gauge, Histogram, Key, KeyName, Metadata, Recorder, SharedString, Unit,
};
use redis::aio::MultiplexedConnection;

use super::*;
use crate::clock::ManualClock;

const SEC: u64 = 1_000_000;
const MS: u64 = 1_000;

fn per_second(name: &str, limit: u32) -> Policy {
    Policy::new(name, limit, Duration::from_secs(1))
}

fn manual_local(max_keys: usize) -> (Limiter, ManualClock) {
    let clock = ManualClock::at(1_000 * SEC);
    let limiter = Limiter::local_with_clock(
        LocalConfig {
            max_keys,
            sweep_every: Duration::from_millis(20),
        },
        clock.clock(),
    );
    (limiter, clock)
}

// ---------------------------------------------------------------------------------------------
// Test 1: pure GCRA through the local limiter with a manual clock (checklist 13, 14, 18, 24).
// ---------------------------------------------------------------------------------------------

/// Checklist 13 + 14: 10/s burst 10 → 10 allowed with strictly decreasing `r`, the 11th denied
/// with retry_after exactly 100 ms, and at +100 ms exactly one more.
#[tokio::test]
async fn gcra_burst_deny_and_one_more_after_one_interval() {
    let (limiter, clock) = manual_local(1_000);
    let policy = per_second("key", 10);
    let check = Check::new("a1").item(&policy, "key:1");
    let mut last = u64::MAX;
    for i in 0..10 {
        let out = limiter.check(&check).await.unwrap();
        assert!(out.allowed, "request {i}");
        assert!(!out.degraded);
        let s = &out.states[0];
        assert!(s.remaining < last, "r strictly decreases within the burst");
        last = s.remaining;
        assert_eq!(s.retry_after, None);
    }
    assert_eq!(last, 0);
    let denied = limiter.check(&check).await.unwrap();
    assert!(!denied.allowed);
    assert_eq!(
        denied.states[0].retry_after,
        Some(Duration::from_millis(100))
    );
    assert_eq!(denied.states[0].remaining, 0);
    assert_eq!(denied.violated_policies(), vec!["key"]);

    clock.advance(100 * MS);
    assert!(limiter.check(&check).await.unwrap().allowed);
    assert!(!limiter.check(&check).await.unwrap().allowed, "exactly one");
}

/// Checklist 18: 1,000 denied attempts while limited do not move the first allowed instant.
#[tokio::test]
async fn denied_attempts_do_not_extend_the_penalty() {
    let policy = per_second("key", 10);
    let check = Check::new("a1").item(&policy, "key:1");
    let mut first_allowed = Vec::new();
    for hammer in [false, true] {
        let (limiter, clock) = manual_local(1_000);
        let start = clock.now_us();
        for _ in 0..10 {
            assert!(limiter.check(&check).await.unwrap().allowed);
        }
        if hammer {
            for i in 0..1_000 {
                clock.set(start + i * 50);
                assert!(!limiter.check(&check).await.unwrap().allowed);
            }
        }
        // Scan forward in 1 ms steps for the first allowed instant.
        let mut at = start;
        loop {
            clock.set(at);
            if limiter.check(&check).await.unwrap().allowed {
                break;
            }
            at += MS;
        }
        first_allowed.push(at - start);
    }
    assert_eq!(first_allowed, vec![100 * MS, 100 * MS]);
}

/// Checklist 24: weighted cost drops `r` by the cost; a cost above the burst is an immediate
/// error, never a wait.
#[tokio::test]
async fn weighted_cost_and_too_costly() {
    let (limiter, _clock) = manual_local(1_000);
    let policy = per_second("key", 10);
    let one = Check::new("a1").item(&policy, "key:1");
    let five = one.clone().with_cost(5);
    assert_eq!(limiter.check(&one).await.unwrap().states[0].remaining, 9);
    assert_eq!(limiter.check(&five).await.unwrap().states[0].remaining, 4);
    let denied = limiter.check(&five).await.unwrap();
    assert!(!denied.allowed);
    assert_eq!(
        denied.states[0].remaining, 4,
        "a weighted deny spends nothing"
    );
    assert_eq!(
        denied.states[0].retry_after,
        Some(Duration::from_millis(100))
    );

    let err = limiter.check(&one.clone().with_cost(11)).await.unwrap_err();
    assert!(
        matches!(err, LimitError::TooCostly { ref policy, cost: 11, burst: 10 } if policy == "key"),
        "{err:?}"
    );
    assert_eq!(
        limiter.check(&one).await.unwrap().states[0].remaining,
        3,
        "the refused request stored nothing"
    );
}

/// Checklist 23: the bucket key has no limit in it, so a limit change keeps the state and the new
/// rate applies at once.
#[tokio::test]
async fn limit_change_keeps_state_and_applies_new_rate() {
    let (limiter, clock) = manual_local(1_000);
    let slow = per_second("key", 10);
    let fast = per_second("key", 100);
    for _ in 0..10 {
        assert!(
            limiter
                .check(&Check::new("a1").item(&slow, "key:1"))
                .await
                .unwrap()
                .allowed
        );
    }
    let fast_check = Check::new("a1").item(&fast, "key:1");
    let out = limiter.check(&fast_check).await.unwrap();
    assert!(!out.allowed, "the spent burst was not reset");
    assert_eq!(out.states[0].retry_after, Some(Duration::from_millis(10)));
    clock.advance(10 * MS);
    assert!(limiter.check(&fast_check).await.unwrap().allowed);
}

#[tokio::test]
async fn invalid_checks_are_errors() {
    let (limiter, _clock) = manual_local(1_000);
    let zero = per_second("key", 0);
    let no_window = Policy::new("key", 1, Duration::ZERO);
    let ok = per_second("key", 1);
    for check in [
        Check::new("a1").item(&zero, "key:1"),
        Check::new("a1").item(&no_window, "key:1"),
        Check::new("").item(&ok, "key:1"),
        Check::new("a{1}").item(&ok, "key:1"),
    ] {
        let err = limiter.check(&check).await.unwrap_err();
        assert!(matches!(err, LimitError::Invalid { .. }), "{err:?}");
    }
    let empty = limiter.check(&Check::new("a1")).await.unwrap();
    assert!(empty.allowed && empty.states.is_empty());
}

#[tokio::test]
async fn key_prefix_cannot_move_the_hash_tag() {
    let err = Limiter::with_redis(
        CLOSED,
        "bursar{x}",
        FailMode::Open,
        1,
        LocalConfig::default(),
        Duration::from_millis(100),
    )
    .await
    .unwrap_err();
    assert!(matches!(err, LimitError::Invalid { .. }), "{err:?}");
    let err = Limiter::with_redis(
        "not a url",
        "bursar",
        FailMode::Open,
        1,
        LocalConfig::default(),
        Duration::from_millis(100),
    )
    .await
    .unwrap_err();
    assert!(matches!(err, LimitError::InvalidUrl(_)), "{err:?}");
}

#[test]
fn check_future_is_send() {
    fn assert_send<T: Send>(_: &T) {}
    let limiter = Limiter::local(LocalConfig::default());
    let policy = per_second("key", 1);
    let check = Check::new("a1").item(&policy, "key:1");
    let future = limiter.check(&check);
    assert_send(&future);
}

// ---------------------------------------------------------------------------------------------
// Test 2: all-or-nothing (shared by the local and Redis tests).
// ---------------------------------------------------------------------------------------------

/// The key policy has room, the account policy does not → denied, and the key's state is
/// unchanged. Returns the subject of the key that must not have been stored.
async fn assert_all_or_nothing(limiter: &Limiter) -> &'static str {
    let key = per_second("key", 10);
    let account = per_second("account", 2);
    let with_key = |subject: &'static str| {
        Check::new("a42")
            .item(&key, subject)
            .item(&account, "account")
    };
    assert!(limiter.check(&with_key("key:1")).await.unwrap().allowed);
    assert!(limiter.check(&with_key("key:1")).await.unwrap().allowed);

    let denied = limiter.check(&with_key("key:2")).await.unwrap();
    assert!(!denied.allowed);
    assert_eq!(denied.violated_policies(), vec!["account"]);
    assert_eq!(denied.states[0].name, "key");
    assert_eq!(denied.states[0].retry_after, None);
    assert_eq!(
        denied.states[0].remaining, 10,
        "key:2 reports its untouched state"
    );
    assert!(denied.states[1].retry_after.is_some());

    // key:2 alone still has its whole burst: the denied check spent nothing on it.
    let peek = Check::new("a42").item(&key, "key:2").with_dry_run(true);
    let out = limiter.check(&peek).await.unwrap();
    assert!(out.allowed);
    assert_eq!(out.states[0].remaining, 9, "as if first request");
    "key:2"
}

#[tokio::test]
async fn local_all_or_nothing() {
    let (limiter, _clock) = manual_local(1_000);
    assert_all_or_nothing(&limiter).await;
    // key:1 and the account are stored; key:2 is not.
    assert_eq!(limiter.tracked_keys(), 2);
}

// ---------------------------------------------------------------------------------------------
// Test 3: local memory bound and sweeping (checklist 22).
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn one_million_ipv6_subjects_stay_under_the_key_cap_and_sweep_to_zero() {
    let (limiter, clock) = manual_local(10_000);
    let policy = Policy::new("ip", 20, Duration::from_secs(60));
    let mut max_seen = 0;
    for i in 0..1_000_000u128 {
        // A distinct /64 per attacker address, and a varying host part.
        let addr = Ipv6Addr::from((0x2001_0db8u128 << 96) | (i << 64) | (i * 7919 + 1));
        let subject = client_subject(IpAddr::V6(addr));
        let scope = format!("ip:{subject}");
        let check = Check::new(scope.clone()).item(&policy, scope);
        assert!(limiter.check(&check).await.unwrap().allowed);
        if i % 10_000 == 0 {
            max_seen = max_seen.max(limiter.tracked_keys());
        }
    }
    max_seen = max_seen.max(limiter.tracked_keys());
    assert!(max_seen <= 10_000, "tracked {max_seen}");
    assert!(
        limiter.tracked_keys() > 5_000,
        "the cap is used, not emptied"
    );

    // Same /64, different host → same subject.
    let a: Ipv6Addr = "2001:db8:0:5::1".parse().unwrap();
    let b: Ipv6Addr = "2001:db8:0:5:dead:beef:0:2".parse().unwrap();
    assert_eq!(client_subject(a.into()), client_subject(b.into()));

    // Past every horizon (T = 3 s), the sweeper task drops everything.
    clock.advance(10 * SEC);
    let sweeper = limiter.spawn_sweeper();
    let deadline = Instant::now() + Duration::from_secs(5);
    while limiter.tracked_keys() > 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(limiter.tracked_keys(), 0);
    assert!(
        limiter.inner.local.capacity() <= 32 * 16,
        "memory given back"
    );
    sweeper.abort();
}

#[tokio::test]
async fn sweeper_ends_when_the_limiter_is_dropped() {
    let (limiter, _clock) = manual_local(100);
    let sweeper = limiter.spawn_sweeper();
    drop(limiter);
    tokio::time::timeout(Duration::from_secs(5), sweeper)
        .await
        .expect("sweeper exits")
        .unwrap();
}

#[tokio::test]
async fn sweep_keeps_live_entries() {
    let (limiter, clock) = manual_local(100);
    let policy = per_second("key", 10);
    limiter
        .check(&Check::new("a1").item(&policy, "key:1"))
        .await
        .unwrap();
    clock.advance(99 * MS);
    assert_eq!(limiter.sweep(), 0);
    assert_eq!(limiter.tracked_keys(), 1);
    clock.advance(MS);
    assert_eq!(limiter.sweep(), 1);
    assert_eq!(limiter.tracked_keys(), 0);
}

// ---------------------------------------------------------------------------------------------
// Redis helpers.
// ---------------------------------------------------------------------------------------------

fn redis_url() -> Option<String> {
    match std::env::var("BURSAR_TEST_REDIS_URL") {
        Ok(url) if !url.is_empty() => Some(url),
        _ => {
            eprintln!("note: BURSAR_TEST_REDIS_URL is not set; skipping this Redis test");
            None
        }
    }
}

/// A key prefix no other test (or run) uses.
fn random_prefix() -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let random = RandomState::new().hash_one((n, Instant::now(), std::process::id()));
    format!("bursar-limits-test-{random:016x}")
}

async fn connect(url: &str) -> MultiplexedConnection {
    redis::Client::open(url)
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap()
}

async fn keys_under(conn: &mut MultiplexedConnection, prefix: &str) -> Vec<String> {
    let mut cursor: u64 = 0;
    let mut keys = Vec::new();
    loop {
        let (next, batch): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(format!("{prefix}:*"))
            .arg("COUNT")
            .arg(1_000)
            .query_async(conn)
            .await
            .unwrap();
        keys.extend(batch);
        if next == 0 {
            return keys;
        }
        cursor = next;
    }
}

/// Deletes the keys under this test's own prefix (and nothing else).
async fn cleanup(url: &str, prefix: &str) {
    let mut conn = connect(url).await;
    let keys = keys_under(&mut conn, prefix).await;
    if !keys.is_empty() {
        let _: () = redis::cmd("DEL")
            .arg(&keys)
            .query_async(&mut conn)
            .await
            .unwrap();
    }
}

async fn shared_limiter(url: &str, prefix: &str) -> Limiter {
    Limiter::with_redis(
        url,
        prefix,
        FailMode::Closed,
        1,
        LocalConfig::default(),
        Duration::from_secs(2),
    )
    .await
    .unwrap()
}

/// A private `redis-server` child on a free port, killed on drop. `None` (with a note) when
/// `redis-server` is not on `PATH`.
struct RedisChild {
    child: Child,
    port: u16,
}

impl RedisChild {
    fn start_on(port: u16) -> Option<RedisChild> {
        let spawned = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no", "--daemonize", "no"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn();
        match spawned {
            Ok(child) => Some(RedisChild { child, port }),
            Err(err) => {
                eprintln!("note: cannot start redis-server ({err}); skipping this part");
                None
            }
        }
    }

    fn start() -> Option<RedisChild> {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .ok()?;
        RedisChild::start_on(port)
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    async fn ready(&self) -> bool {
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(client) = redis::Client::open(self.url())
                && let Ok(mut conn) = client.get_multiplexed_async_connection().await
                && redis::cmd("PING")
                    .query_async::<String>(&mut conn)
                    .await
                    .is_ok()
            {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        false
    }

    fn stop(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for RedisChild {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

// ---------------------------------------------------------------------------------------------
// Test 4: Redis (checklist 13, 14, 16, 18, 19, 20, 24).
// ---------------------------------------------------------------------------------------------

/// The same sequence as the local GCRA test gives the same decisions in Redis: 10 allowed with
/// the same strictly decreasing `r`, the 11th denied with 0 < retry_after ≤ 100 ms, allowed again
/// once retry_after has passed; weighted cost and TooCostly behave the same.
#[tokio::test]
async fn redis_burst_matches_local() {
    let Some(url) = redis_url() else { return };
    let prefix = random_prefix();
    let redis = shared_limiter(&url, &prefix).await;
    let (local, _clock) = manual_local(1_000);
    let policy = per_second("key", 10);
    let check = Check::new("a1").item(&policy, "key:1");
    for i in 0..11 {
        let r = redis.check(&check).await.unwrap();
        let l = local.check(&check).await.unwrap();
        assert!(!r.degraded);
        assert_eq!(r.allowed, l.allowed, "request {i}");
        assert_eq!(r.states[0].remaining, l.states[0].remaining, "request {i}");
        assert_eq!(r.states[0].limit, 10);
        assert_eq!(
            ratelimit_header(&r.states),
            ratelimit_header(&l.states),
            "request {i}"
        );
    }
    let denied = redis.check(&check).await.unwrap();
    assert!(!denied.allowed);
    let retry = denied.states[0].retry_after.unwrap();
    assert!(
        retry > Duration::ZERO && retry <= Duration::from_millis(100),
        "{retry:?}"
    );
    assert_eq!(retry_after_secs(&denied), 1);

    tokio::time::sleep(retry + Duration::from_millis(5)).await;
    assert!(redis.check(&check).await.unwrap().allowed);

    // Weighted cost on a fresh key, and TooCostly before any I/O.
    let one = Check::new("a1").item(&policy, "key:w");
    assert_eq!(redis.check(&one).await.unwrap().states[0].remaining, 9);
    let five = one.clone().with_cost(5);
    assert_eq!(redis.check(&five).await.unwrap().states[0].remaining, 4);
    assert!(matches!(
        redis.check(&one.clone().with_cost(11)).await,
        Err(LimitError::TooCostly { .. })
    ));
    cleanup(&url, &prefix).await;
}

#[tokio::test]
async fn redis_all_or_nothing_and_dry_run_store_nothing() {
    let Some(url) = redis_url() else { return };
    let prefix = random_prefix();
    let limiter = shared_limiter(&url, &prefix).await;
    let untouched = assert_all_or_nothing(&limiter).await;
    let mut conn = connect(&url).await;
    let exists: u32 = redis::cmd("EXISTS")
        .arg(format!("{prefix}:rl:{{a42}}:{untouched}"))
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(exists, 0, "the denied check stored nothing for {untouched}");
    let mut keys = keys_under(&mut conn, &prefix).await;
    keys.sort();
    assert_eq!(
        keys,
        vec![
            format!("{prefix}:rl:{{a42}}:account"),
            format!("{prefix}:rl:{{a42}}:key:1"),
        ]
    );

    // Dry runs decide the same way but never write.
    let policy = per_second("ip-auth", 3);
    let peek = Check::new("ip:203.0.113.7")
        .item(&policy, "ip-auth")
        .with_dry_run(true);
    for _ in 0..5 {
        let out = limiter.check(&peek).await.unwrap();
        assert!(out.allowed);
        assert_eq!(out.states[0].remaining, 2);
    }
    assert_eq!(keys_under(&mut conn, &prefix).await.len(), 2);
    cleanup(&url, &prefix).await;
}

/// Checklist 19: every key written has a TTL, and idle keys disappear after time-to-full.
#[tokio::test]
async fn redis_every_key_has_a_ttl_and_idle_keys_expire() {
    let Some(url) = redis_url() else { return };
    let prefix = random_prefix();
    let limiter = shared_limiter(&url, &prefix).await;
    let slow = Policy::new("account", 5, Duration::from_secs(10));
    let fast = Policy::new("key", 5, Duration::from_millis(200));
    for i in 0..20 {
        let check = Check::new(format!("a{}", i % 4))
            .item(&fast, format!("key:{i}"))
            .item(&slow, "account")
            .with_cost(1 + i % 3)
            .with_dry_run(i % 5 == 0);
        limiter.check(&check).await.unwrap();
    }
    let mut conn = connect(&url).await;
    let keys = keys_under(&mut conn, &prefix).await;
    assert!(keys.len() > 4, "{keys:?}");
    for key in &keys {
        let pttl: i64 = redis::cmd("PTTL")
            .arg(key)
            .query_async(&mut conn)
            .await
            .unwrap();
        assert!(pttl > 0, "{key} has PTTL {pttl}");
    }

    // Only fast-policy keys: after their time-to-full (≤ 200 ms) nothing is left.
    let prefix2 = random_prefix();
    let limiter2 = shared_limiter(&url, &prefix2).await;
    for i in 0..10 {
        let check = Check::new("a1").item(&fast, format!("key:{i}"));
        limiter2.check(&check).await.unwrap();
    }
    assert_eq!(keys_under(&mut conn, &prefix2).await.len(), 10);
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(
        keys_under(&mut conn, &prefix2).await.len(),
        0,
        "back to baseline"
    );
    cleanup(&url, &prefix).await;
}

/// Checklist 17: in Redis mode the instances' own clocks never enter a decision (the script uses
/// the server's `TIME`), so two instances skewed by ±30 s, or jumping an hour, share one burst.
#[tokio::test]
async fn redis_decisions_ignore_instance_clocks() {
    let Some(url) = redis_url() else { return };
    let prefix = random_prefix();
    let ahead = ManualClock::at(1_000 * SEC + 30 * SEC);
    let behind = ManualClock::at(1_000 * SEC - 30 * SEC);
    let mut limiters = Vec::new();
    for clock in [&ahead, &behind] {
        limiters.push(
            Limiter::with_redis_and_clock(
                &url,
                &prefix,
                FailMode::Closed,
                2,
                LocalConfig::default(),
                Duration::from_secs(2),
                clock.clock(),
            )
            .await
            .unwrap(),
        );
    }
    let policy = per_second("key", 10);
    let check = Check::new("a9").item(&policy, "key:9");
    for i in 0..10u64 {
        let out = limiters[usize::try_from(i % 2).unwrap()]
            .check(&check)
            .await
            .unwrap();
        assert!(out.allowed, "request {i}");
        assert_eq!(out.states[0].remaining, 9 - i);
    }
    ahead.advance(3_600 * SEC);
    for limiter in &limiters {
        assert!(!limiter.check(&check).await.unwrap().allowed);
    }
    cleanup(&url, &prefix).await;
}

/// Checklist 20: a script error (here `WRONGTYPE` on a key someone filled with a list) is counted
/// in `ratelimit_store_errors_total` and follows the fail mode, never a silent allow; it does not
/// take other keys off Redis.
#[test]
fn script_error_is_counted_and_follows_the_fail_mode() {
    let Some(url) = redis_url() else { return };
    let recorder = CountingRecorder::default();
    let prefix = random_prefix();
    with_recorder(&recorder, async {
        let mut conn = connect(&url).await;
        let poisoned = format!("{prefix}:rl:{{a1}}:key:1");
        let _: () = redis::cmd("RPUSH")
            .arg(&poisoned)
            .arg("x")
            .query_async(&mut conn)
            .await
            .unwrap();
        let _: () = redis::cmd("PEXPIRE")
            .arg(&poisoned)
            .arg(60_000)
            .query_async(&mut conn)
            .await
            .unwrap();
        let policy = per_second("key", 10);
        let bad = Check::new("a1").item(&policy, "key:1");
        let good = Check::new("a1").item(&policy, "key:2");
        for fail in [FailMode::Open, FailMode::Closed] {
            let limiter = Limiter::with_redis(
                &url,
                &prefix,
                fail,
                2,
                LocalConfig::default(),
                Duration::from_secs(2),
            )
            .await
            .unwrap();
            match (fail, limiter.check(&bad).await) {
                (FailMode::Open, Ok(out)) => {
                    assert!(out.degraded);
                    assert_eq!(out.states[0].limit, 5);
                }
                (FailMode::Closed, Err(LimitError::Unavailable)) => {}
                (fail, other) => panic!("{fail:?}: {other:?}"),
            }
            let out = limiter.check(&good).await.unwrap();
            assert!(out.allowed && !out.degraded, "other keys still use Redis");
        }
        cleanup(&url, &prefix).await;
    });
    assert_eq!(recorder.get("ratelimit_store_errors_total"), 2);
    assert_eq!(recorder.get("ratelimit_fallback_total"), 1);
}

/// The script is re-sent after `SCRIPT FLUSH` (EVALSHA → NOSCRIPT → load → EVALSHA). Runs against
/// a private server when `redis-server` is available, so the flush does not touch anyone else's
/// scripts; otherwise against the test server.
#[tokio::test]
async fn redis_recovers_from_noscript() {
    let Some(shared_url) = redis_url() else {
        return;
    };
    let child = RedisChild::start();
    let url = match &child {
        Some(child) if child.ready().await => child.url(),
        _ => shared_url,
    };
    let prefix = random_prefix();
    let limiter = shared_limiter(&url, &prefix).await;
    let policy = per_second("key", 10);
    let check = Check::new("a1").item(&policy, "key:1");
    let sha = redis::Script::new(redis_store::GCRA_LUA)
        .get_hash()
        .to_owned();
    let mut conn = connect(&url).await;
    for round in 0..3u64 {
        let _: () = redis::cmd("SCRIPT")
            .arg("FLUSH")
            .query_async(&mut conn)
            .await
            .unwrap();
        let exists: Vec<bool> = redis::cmd("SCRIPT")
            .arg("EXISTS")
            .arg(&sha)
            .query_async(&mut conn)
            .await
            .unwrap();
        assert_eq!(exists, vec![false]);
        let out = limiter.check(&check).await.unwrap();
        assert!(out.allowed && !out.degraded);
        assert_eq!(out.states[0].remaining, 9 - round);
        let exists: Vec<bool> = redis::cmd("SCRIPT")
            .arg("EXISTS")
            .arg(&sha)
            .query_async(&mut conn)
            .await
            .unwrap();
        assert_eq!(exists, vec![true], "reloaded on NOSCRIPT");
    }
    cleanup(&url, &prefix).await;
}

/// Checklist 16 (scaled down): two limiters with their own connections share one policy of 100
/// per second (burst 100), hammered by 16 tasks for ~3 s.
///
/// Bounds. GCRA admits at most `burst + ⌊D/T⌋` in any span D of server time. Every script run
/// happens between `start` (taken before the first call) and `end` (after the last reply), so
/// with `D_max = end − start` the strict upper bound is `100 + ⌊100·D_max⌋`. Under saturation it
/// admits exactly `burst + ⌊D/T⌋` between the first and last admitted request, so with
/// `D_obs` = time between the first and last allowed reply the lower bound is
/// `99 % × (100 + 100·D_obs)`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_two_limiters_share_one_budget() {
    let Some(url) = redis_url() else { return };
    let prefix = random_prefix();
    let a = shared_limiter(&url, &prefix).await;
    let b = shared_limiter(&url, &prefix).await;
    let policy = Arc::new(per_second("key", 100));
    let run_for = Duration::from_secs(3);
    let start = Instant::now();
    let mut tasks = Vec::new();
    for i in 0..16 {
        let limiter = if i % 2 == 0 { a.clone() } else { b.clone() };
        let policy = Arc::clone(&policy);
        tasks.push(tokio::spawn(async move {
            let check = Check::new("a7").item(&policy, "key:7");
            let mut allowed = Vec::new();
            let mut calls = 0u128;
            while start.elapsed() < run_for {
                let out = limiter.check(&check).await.unwrap();
                assert!(!out.degraded, "the store must answer every call");
                calls += 1;
                if out.allowed {
                    allowed.push(Instant::now());
                }
            }
            (allowed, calls)
        }));
    }
    let mut allowed = Vec::new();
    let mut calls = 0;
    for task in tasks {
        let (mut times, n) = task.await.unwrap();
        allowed.append(&mut times);
        calls += n;
    }
    let end = Instant::now();
    allowed.sort();
    let total = u128::try_from(allowed.len()).unwrap();
    let max_span_us = (end - start).as_micros();
    let upper = 100 + 100 * max_span_us / 1_000_000;
    let observed_us = (allowed[allowed.len() - 1] - allowed[0]).as_micros();
    let expected = 100 + 100 * observed_us / 1_000_000;
    eprintln!(
        "{calls} calls, {total} allowed; upper {upper}, expected {expected} over {observed_us} µs"
    );
    assert!(calls > total * 5, "the policy was saturated");
    assert!(total <= upper, "{total} allowed > theoretical max {upper}");
    assert!(
        total * 100 >= expected * 99,
        "{total} allowed < 99 % of {expected}"
    );
    cleanup(&url, &prefix).await;
}

/// One script call deciding several checks in order decides exactly what the in-process GCRA
/// decides for the same checks one after another at one instant: each check sees what the
/// earlier ones stored; denials, dry runs and cost 0 store nothing; a key named twice in a check
/// sees its own pending TAT. Every field of every decision is compared.
#[tokio::test]
async fn redis_batch_decides_like_sequential_checks() {
    let Some(url) = redis_url() else { return };
    let prefix = random_prefix();
    let limiter = shared_limiter(&url, &prefix).await;
    let shared = &limiter.inner.shared.as_ref().unwrap().store;
    let spec = |subject: &str, t_us: u64, burst: u32| gcra::Spec {
        key: format!("rl:{{b1}}:{subject}"),
        t_us,
        burst,
    };
    let (a, b, c) = (
        spec("a", 100 * MS, 10),
        spec("b", SEC, 3),
        spec("c", 10 * MS, 5),
    );
    let checks: Vec<(Vec<gcra::Spec>, u32, bool)> = vec![
        (vec![a.clone(), b.clone()], 1, false), // allowed: a 9 left, b 2 left
        (vec![a.clone()], 3, false),            // allowed: a 6 left
        (vec![a.clone()], 1, true),             // dry run: allowed, nothing stored
        (vec![b.clone()], 3, false),            // denied: b has 2
        (vec![a.clone(), b.clone()], 2, false), // allowed: a 4, b 0
        (vec![a.clone(), b.clone()], 1, false), // denied by b; a reported unchanged
        (vec![a.clone(), a.clone()], 2, false), // a twice: 4 → 2 → 0
        (vec![a.clone()], 1, false),            // denied
        (vec![c.clone(), b.clone()], 0, false), // cost 0: a look, nothing stored
        (vec![c.clone()], 5, false),            // a new key mid-batch: allowed, 0 left
    ];
    let batched = shared.decide_batch(checks.clone()).await.unwrap();

    let mut stored: HashMap<String, u64> = HashMap::new();
    let now = 1_000 * SEC;
    for (i, ((specs, cost, dry_run), (allowed, decisions))) in
        checks.iter().zip(&batched).enumerate()
    {
        let expected = gcra::evaluate(specs, |k| stored.get(k).copied(), now, *cost);
        assert_eq!(*allowed, expected.allowed, "check {i}");
        for (got, want) in decisions.iter().zip(&expected.decisions) {
            assert_eq!(got.allowed, want.allowed, "check {i}");
            assert_eq!(got.remaining, want.remaining, "check {i}");
            assert_eq!(got.retry_after_us, want.retry_after_us, "check {i}");
            assert_eq!(got.reset_after_us, want.reset_after_us, "check {i}");
        }
        if expected.allowed && !dry_run {
            for &(index, tat) in &expected.writes {
                stored.insert(specs[index].key.clone(), tat);
            }
        }
    }
    let allowed: Vec<bool> = batched.iter().map(|(a, _)| *a).collect();
    assert_eq!(
        allowed,
        [
            true, true, true, false, true, false, true, false, true, true
        ]
    );
    assert_eq!(batched[6].1[1].remaining, 0);

    // What the batch stored is what the sequence stored: the next check sees a and b spent.
    let after = limiter
        .check(&Check::new("b1").item(&per_second("a", 10), "a"))
        .await
        .unwrap();
    assert!(!after.allowed, "a's burst was spent by the batch");
    let mut conn = connect(&url).await;
    for key in keys_under(&mut conn, &prefix).await {
        let ttl: i64 = redis::cmd("PTTL")
            .arg(&key)
            .query_async(&mut conn)
            .await
            .unwrap();
        assert!(ttl > 0, "{key} has PTTL {ttl}");
    }
    cleanup(&url, &prefix).await;
}

/// Many concurrent checks on one scope through one limiter: exactly the burst is allowed, each
/// allowed check reports a different `remaining` (they were decided one after another, never two
/// against the same state), and they shared script calls. A second scope at the same time keeps
/// its own budget.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_concurrent_checks_share_calls_and_stay_exact() {
    let Some(url) = redis_url() else { return };
    let prefix = random_prefix();
    let limiter = shared_limiter(&url, &prefix).await;
    let policy = Arc::new(Policy::new("key", 100, Duration::from_secs(3_600)));
    let before = limiter.shared_store_calls();
    let mut tasks = Vec::new();
    for i in 0..400 {
        let limiter = limiter.clone();
        let policy = Arc::clone(&policy);
        tasks.push(tokio::spawn(async move {
            let scope = if i % 4 == 3 { "c2" } else { "c1" };
            let check = Check::new(scope).item(&policy, "key:1");
            let out = limiter.check(&check).await.unwrap();
            assert!(!out.degraded);
            (scope, out.allowed.then_some(out.states[0].remaining))
        }));
    }
    let mut remaining: HashMap<&str, Vec<u64>> = HashMap::new();
    for task in tasks {
        let (scope, left) = task.await.unwrap();
        if let Some(left) = left {
            remaining.entry(scope).or_default().push(left);
        }
    }
    let calls = limiter.shared_store_calls() - before;
    // c1 gets 300 checks and c2 100, each against a burst of 100 with no refill to speak of.
    for scope in ["c1", "c2"] {
        let mut left = remaining.remove(scope).unwrap_or_default();
        left.sort_unstable();
        assert_eq!(left, (0..100).collect::<Vec<u64>>(), "{scope}");
    }
    eprintln!("400 checks in {calls} script calls");
    assert!(
        calls < 400,
        "{calls} calls for 400 concurrent checks: no batching"
    );
    cleanup(&url, &prefix).await;
}

/// A caller that gives up (its request was cancelled) while its check is queued does not strand
/// the scope: the queue is drained by its own task and later checks are answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_cancelled_checks_do_not_block_their_scope() {
    let Some(url) = redis_url() else { return };
    let prefix = random_prefix();
    let limiter = shared_limiter(&url, &prefix).await;
    let policy = Arc::new(per_second("key", 1_000));
    let tasks: Vec<_> = (0..50)
        .map(|_| {
            let limiter = limiter.clone();
            let policy = Arc::clone(&policy);
            tokio::spawn(async move {
                limiter
                    .check(&Check::new("c3").item(&policy, "key:1"))
                    .await
            })
        })
        .collect();
    for task in &tasks {
        task.abort();
    }
    let check = Check::new("c3").item(&policy, "key:1");
    let out = tokio::time::timeout(Duration::from_secs(2), limiter.check(&check))
        .await
        .expect("the scope is not stranded")
        .unwrap();
    assert!(out.allowed);
    cleanup(&url, &prefix).await;
}

// ---------------------------------------------------------------------------------------------
// Test 5: fail modes (checklist 20, 21).
// ---------------------------------------------------------------------------------------------

/// Counts the metrics this crate emits, for one thread (`metrics::with_local_recorder`).
#[derive(Default)]
struct CountingRecorder {
    counters: Mutex<HashMap<String, Arc<Count>>>,
}

#[derive(Default)]
struct Count(AtomicU64);

impl CounterFn for Count {
    fn increment(&self, value: u64) {
        self.0.fetch_add(value, Ordering::SeqCst);
    }
    fn absolute(&self, value: u64) {
        self.0.fetch_max(value, Ordering::SeqCst);
    }
}

impl CountingRecorder {
    fn get(&self, name: &str) -> u64 {
        self.counters
            .lock()
            .unwrap()
            .get(name)
            .map_or(0, |c| c.0.load(Ordering::SeqCst))
    }
}

impl Recorder for CountingRecorder {
    fn describe_counter(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_gauge(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_histogram(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn register_counter(&self, key: &Key, _: &Metadata<'_>) -> Counter {
        let count = Arc::clone(
            self.counters
                .lock()
                .unwrap()
                .entry(key.name().to_owned())
                .or_default(),
        );
        Counter::from_arc(count)
    }
    fn register_gauge(&self, _: &Key, _: &Metadata<'_>) -> Gauge {
        Gauge::noop()
    }
    fn register_histogram(&self, _: &Key, _: &Metadata<'_>) -> Histogram {
        Histogram::noop()
    }
}

/// Runs `f` on a current-thread runtime with `recorder` installed for this thread, so the counts
/// are this test's alone even while other tests run in parallel.
fn with_recorder<T>(recorder: &CountingRecorder, f: impl std::future::Future<Output = T>) -> T {
    metrics::with_local_recorder(recorder, || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(f)
    })
}

/// A port where nothing listens.
const CLOSED: &str = "redis://127.0.0.1:1";

/// Checklist 21 (fail open): the store is down from the start; the limiter still builds, serves
/// from the local fallback at limit / instances (10/s over 2 instances → 5), marks the outcome
/// degraded, and counts both metrics. Nothing waits longer than the timeout.
#[test]
fn fail_open_serves_local_share_and_counts() {
    let recorder = CountingRecorder::default();
    let timeout = Duration::from_millis(300);
    with_recorder(&recorder, async {
        let clock = ManualClock::at(1_000 * SEC);
        let started = Instant::now();
        let limiter = Limiter::with_redis_and_clock(
            CLOSED,
            "t",
            FailMode::Open,
            2,
            LocalConfig::default(),
            timeout,
            clock.clock(),
        )
        .await
        .expect("builds while the store is down");
        assert!(started.elapsed() < timeout + Duration::from_secs(1));
        let policy = per_second("key", 10);
        let check = Check::new("a1").item(&policy, "key:1");
        let mut decisions = Vec::new();
        for _ in 0..6 {
            let called = Instant::now();
            let out = limiter.check(&check).await.unwrap();
            assert!(called.elapsed() < timeout + Duration::from_millis(500));
            assert!(out.degraded);
            assert_eq!(out.states[0].limit, 5);
            decisions.push(out.allowed);
        }
        assert_eq!(decisions, [true, true, true, true, true, false]);
        assert_eq!(limiter.tracked_keys(), 1);
    });
    assert!(recorder.get("ratelimit_store_errors_total") >= 1);
    assert_eq!(recorder.get("ratelimit_fallback_total"), 6);
}

/// Checklist 21 (fail closed): Unavailable, quickly, and counted.
#[test]
fn fail_closed_is_unavailable() {
    let recorder = CountingRecorder::default();
    let timeout = Duration::from_millis(300);
    with_recorder(&recorder, async {
        let limiter = Limiter::with_redis(
            CLOSED,
            "t",
            FailMode::Closed,
            2,
            LocalConfig::default(),
            timeout,
        )
        .await
        .unwrap();
        let policy = per_second("key", 10);
        let check = Check::new("a1").item(&policy, "key:1");
        for _ in 0..3 {
            let called = Instant::now();
            let err = limiter.check(&check).await.unwrap_err();
            assert!(matches!(err, LimitError::Unavailable), "{err:?}");
            assert!(called.elapsed() < timeout + Duration::from_millis(500));
        }
        assert_eq!(
            limiter.tracked_keys(),
            0,
            "fail closed keeps no local state"
        );
    });
    assert!(recorder.get("ratelimit_store_errors_total") >= 1);
    assert_eq!(recorder.get("ratelimit_fallback_total"), 0);
}

/// A store that accepts connections but never answers: every check still returns within the
/// timeout (fail closed → Unavailable; fail open → degraded).
#[tokio::test]
async fn silent_store_times_out_instead_of_hanging() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("redis://{}", listener.local_addr().unwrap());
    let timeout = Duration::from_millis(200);
    let policy = per_second("key", 10);
    let check = Check::new("a1").item(&policy, "key:1");
    for fail in [FailMode::Closed, FailMode::Open] {
        let limiter = Limiter::with_redis(&url, "t", fail, 1, LocalConfig::default(), timeout)
            .await
            .unwrap();
        let called = Instant::now();
        let result = limiter.check(&check).await;
        assert!(called.elapsed() < timeout + Duration::from_millis(500));
        match fail {
            FailMode::Closed => assert!(matches!(result, Err(LimitError::Unavailable))),
            FailMode::Open => assert!(result.unwrap().degraded),
        }
    }
    drop(listener);
}

/// Checklist 21: a store that goes away and comes back is used again without any reset.
#[tokio::test]
async fn restarted_store_is_used_again() {
    let Some(_) = redis_url() else { return };
    let Some(child) = RedisChild::start() else {
        return;
    };
    assert!(child.ready().await, "private redis-server did not start");
    let port = child.port;
    let url = child.url();
    let limiter = Limiter::with_redis(
        &url,
        "t",
        FailMode::Open,
        2,
        LocalConfig::default(),
        Duration::from_millis(300),
    )
    .await
    .unwrap();
    let policy = per_second("key", 1_000);
    let check = Check::new("a1").item(&policy, "key:1");
    let out = limiter.check(&check).await.unwrap();
    assert!(out.allowed && !out.degraded);

    child.stop();
    let out = limiter.check(&check).await.unwrap();
    assert!(out.allowed && out.degraded, "served by the fallback");
    assert_eq!(out.states[0].limit, 500);

    let Some(child) = RedisChild::start_on(port) else {
        return;
    };
    assert!(child.ready().await, "private redis-server did not restart");
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut recovered = false;
    while Instant::now() < deadline {
        if !limiter.check(&check).await.unwrap().degraded {
            recovered = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(recovered, "the limiter went back to the store by itself");
    drop(child);
}
