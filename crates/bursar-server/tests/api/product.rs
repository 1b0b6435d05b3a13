//! The API as a product (issue 6): keys, scopes, expiry, roll and revoke; rate limits with
//! their headers; failed-auth throttling per IP; monthly quotas; usage and the invoice preview;
//! and, through a real Redis, limits and revocations shared by two instances.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bursar_domain::Clock;
use bursar_domain::apikey::ParsedKey;
use bursar_domain::pricing::{Period, Tier, TierMode, UsagePrice, day_of};
use bursar_server::config::{FailMode, PlanConfig};
use bursar_server::state::SystemClock;
use bursar_storage::UsageRow;
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

use crate::harness::{ManualClock, TestApp, metric};

/// One request with `key` from client address `ip` (the test servers trust the loopback
/// proxy, so `X-Forwarded-For` names the client).
async fn call(
    app: &TestApp,
    method: Method,
    path: &str,
    key: Option<&str>,
    ip: &str,
    body: Option<Value>,
) -> reqwest::Response {
    let mut req = app
        .http
        .request(method, format!("{}{path}", app.url))
        .header("x-forwarded-for", ip);
    if let Some(key) = key {
        req = req.bearer_auth(key);
    }
    if let Some(body) = body {
        req = req.json(&body);
    }
    req.send().await.unwrap()
}

/// Another full-access key of account a, issued by the admin path (not through the API, so
/// no request is spent on it).
async fn second_key(app: &TestApp) -> String {
    bursar_server::services::accounts::create_key(
        app.store.as_ref(),
        &SystemClock,
        "a",
        bursar_domain::apikey::KeyMode::Test,
    )
    .await
    .unwrap()
}

/// [`call`], then the answer's status, headers and JSON body.
async fn ask(
    app: &TestApp,
    method: Method,
    path: &str,
    key: Option<&str>,
    ip: &str,
    body: Option<Value>,
) -> (StatusCode, reqwest::header::HeaderMap, Value) {
    json_of(call(app, method, path, key, ip, body).await).await
}

async fn json_of(resp: reqwest::Response) -> (StatusCode, reqwest::header::HeaderMap, Value) {
    let status = resp.status();
    let headers = resp.headers().clone();
    let body = resp.json::<Value>().await.unwrap_or(Value::Null);
    (status, headers, body)
}

fn header<'a>(h: &'a reqwest::header::HeaderMap, name: &str) -> &'a str {
    h.get(name).and_then(|v| v.to_str().ok()).unwrap_or("")
}

const IP: &str = "198.51.100.7";

fn trust_loopback(c: &mut bursar_server::Config) {
    c.limits.trusted_proxies = vec!["127.0.0.0/8".into()];
}

fn plan(key_limit: u32, quota: i64) -> PlanConfig {
    PlanConfig {
        key_limit,
        monthly_quota: quota,
        ..PlanConfig::default()
    }
}

async fn new_key(app: &TestApp, by: &str, body: Value) -> Value {
    let (status, _, v) = ask(app, Method::POST, "/api/keys", Some(by), IP, Some(body)).await;
    assert_eq!(status, 201, "{v}");
    v
}

pub async fn keys_are_scoped_expire_roll_and_revoke(app: &TestApp) {
    // Revoked and expired keys answer 401s below, many of them from one address: room for them
    // in the failed-authentication budget (its own test is below).
    let sibling = app
        .sibling(
            |c| c.limits.auth_failures_limit = 1_000_000,
            Arc::new(SystemClock),
        )
        .await;
    keys_lifecycle(&sibling).await;
    sibling.stop().await;
}

async fn keys_lifecycle(app: &TestApp) {
    let a = app.key_a.as_str();
    // Create: the secret once, well-formed, checksummed; lists and gets never show it.
    let k = new_key(
        app,
        a,
        json!({"name": "reporting", "scopes": ["orders:read"]}),
    )
    .await;
    let secret = k["secret"].as_str().unwrap().to_owned();
    assert!(ParsedKey::parse(&secret).is_ok(), "{secret}");
    assert!(
        secret.starts_with("bsr_test_") && secret.len() == 45,
        "{secret}"
    );
    assert_eq!(k["start"], &secret[..13]);
    assert_eq!(k["last4"], &secret[41..]);
    assert_eq!(k["scopes"], json!(["orders:read"]));
    let id = k["id"].as_i64().unwrap();
    let (_, _, got) = ask(
        app,
        Method::GET,
        &format!("/api/keys/{id}"),
        Some(a),
        IP,
        None,
    )
    .await;
    assert!(got.get("secret").is_none(), "{got}");
    let (_, _, list) = ask(app, Method::GET, "/api/keys?limit=100", Some(a), IP, None).await;
    assert!(!list.to_string().contains(&secret));
    assert!(
        list["data"]
            .as_array()
            .unwrap()
            .iter()
            .any(|k| k["id"] == id)
    );

    // Scopes: reads of orders only; a 403 is not the caller's fault to retry.
    let (s, _, _) = ask(app, Method::GET, "/api/orders", Some(&secret), IP, None).await;
    assert_eq!(s, 200);
    let (s, _, e) = ask(
        app,
        Method::POST,
        "/api/orders",
        Some(&secret),
        IP,
        Some(json!({"customer_id": 1, "amount": "1.00", "currency": "USD"})),
    )
    .await;
    assert_eq!(
        (s.as_u16(), e["error_code"].as_str()),
        (403, Some("insufficient_permissions")),
        "{e}"
    );
    let (s, _, _) = ask(app, Method::GET, "/api/customers", Some(&secret), IP, None).await;
    assert_eq!(s, 403);
    // A restricted key cannot mint a wider one (nor any key: keys:write is not its scope).
    let (s, _, _) = ask(
        app,
        Method::POST,
        "/api/keys",
        Some(&secret),
        IP,
        Some(json!({})),
    )
    .await;
    assert_eq!(s, 403);

    // A key that may manage keys, but nothing else, cannot roll a wider key into its own hands.
    let manager = new_key(app, a, json!({"scopes": ["keys:write"]})).await;
    let manager = manager["secret"].as_str().unwrap().to_owned();
    let (s, _, e) = ask(
        app,
        Method::POST,
        &format!("/api/keys/{id}/roll"),
        Some(&manager),
        IP,
        None,
    )
    .await;
    assert_eq!(
        (s.as_u16(), e["error_code"].as_str()),
        (403, Some("insufficient_permissions")),
        "{e}"
    );
    let (s, _, e) = ask(
        app,
        Method::POST,
        "/api/keys",
        Some(&manager),
        IP,
        Some(json!({})),
    )
    .await;
    assert_eq!(s, 403, "{e}");
    let (s, _, _) = ask(
        app,
        Method::POST,
        "/api/keys",
        Some(&manager),
        IP,
        Some(json!({"scopes": ["keys:read"]})),
    )
    .await;
    assert_eq!(s, 201);

    // Bad input is a 422 naming the field.
    for (body, field) in [
        (json!({"scopes": ["orders:admin"]}), "scopes[0]"),
        (json!({"expires_at": "2001-01-01T00:00:00Z"}), "expires_at"),
        (json!({"mode": "prod"}), "mode"),
        (json!({"scopes": []}), "scopes"),
    ] {
        let (s, _, e) = ask(app, Method::POST, "/api/keys", Some(a), IP, Some(body)).await;
        assert_eq!(s, 422, "{e}");
        assert_eq!(e["details"][0]["field"], field, "{e}");
    }

    // Another tenant sees none of it.
    let b = app.key_b.as_str();
    for (m, path) in [
        (Method::GET, format!("/api/keys/{id}")),
        (Method::POST, format!("/api/keys/{id}/revoke")),
        (Method::POST, format!("/api/keys/{id}/roll")),
    ] {
        let (s, _, e) = ask(app, m, &path, Some(b), IP, None).await;
        assert_eq!(s, 404, "{path}: {e}");
    }

    // Expiry: works until expires_at, then 401 expired_api_key.
    let soon = bursar_domain::Timestamp(SystemClock.now().0 + 1500);
    let short = new_key(app, a, json!({"expires_at": soon.rfc3339()})).await;
    let short = short["secret"].as_str().unwrap().to_owned();
    let (s, _, _) = ask(app, Method::GET, "/api/orders", Some(&short), IP, None).await;
    assert_eq!(s, 200);
    tokio::time::sleep(Duration::from_millis(1700)).await;
    let (s, _, e) = ask(app, Method::GET, "/api/orders", Some(&short), IP, None).await;
    assert_eq!(
        (s.as_u16(), e["error_code"].as_str()),
        (401, Some("expired_api_key")),
        "{e}"
    );

    // Roll with a grace: both keys work, the new one with the same scopes.
    let (s, _, rolled) = ask(
        app,
        Method::POST,
        &format!("/api/keys/{id}/roll"),
        Some(a),
        IP,
        Some(json!({"grace_secs": 3600})),
    )
    .await;
    assert_eq!(s, 201, "{rolled}");
    let new_secret = rolled["secret"].as_str().unwrap().to_owned();
    assert_eq!(rolled["rotated_from"], id);
    assert_eq!(rolled["scopes"], json!(["orders:read"]));
    for key in [&secret, &new_secret] {
        let (s, _, _) = ask(app, Method::GET, "/api/orders", Some(key), IP, None).await;
        assert_eq!(s, 200);
    }
    // Roll with no grace: the old key stops at once, the new one works.
    let new_id = rolled["id"].as_i64().unwrap();
    let (s, _, now_key) = ask(
        app,
        Method::POST,
        &format!("/api/keys/{new_id}/roll"),
        Some(a),
        IP,
        Some(json!({"grace_secs": 0})),
    )
    .await;
    assert_eq!(s, 201);
    let (s, _, _) = ask(app, Method::GET, "/api/orders", Some(&new_secret), IP, None).await;
    assert_eq!(s, 401);
    let newest = now_key["secret"].as_str().unwrap().to_owned();
    let (s, _, _) = ask(app, Method::GET, "/api/orders", Some(&newest), IP, None).await;
    assert_eq!(s, 200);

    // Revoke: refused at once, and the revoke is idempotent.
    let newest_id = now_key["id"].as_i64().unwrap();
    let (s, _, r) = ask(
        app,
        Method::POST,
        &format!("/api/keys/{newest_id}/revoke"),
        Some(a),
        IP,
        None,
    )
    .await;
    assert_eq!(s, 200);
    assert!(r["revoked_at"].is_string());
    let (s, _, e) = ask(app, Method::GET, "/api/orders", Some(&newest), IP, None).await;
    assert_eq!(
        (s.as_u16(), e["error_code"].as_str()),
        (401, Some("invalid_api_key"))
    );
    let (s, _, again) = ask(
        app,
        Method::POST,
        &format!("/api/keys/{newest_id}/revoke"),
        Some(a),
        IP,
        None,
    )
    .await;
    assert_eq!((s.as_u16(), &again["revoked_at"]), (200, &r["revoked_at"]));

    // Revoke while requests are in flight: none started after the revoke answered succeeds
    // (a cache fill racing the revoke cannot bring the key back).
    let racer = new_key(app, a, json!({})).await;
    let racer_secret = racer["secret"].as_str().unwrap().to_owned();
    let racer_id = racer["id"].as_i64().unwrap();
    let revoked_at: Arc<std::sync::Mutex<Option<Instant>>> = Arc::default();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let late_successes = Arc::new(AtomicU64::new(0));
    let hammer: Vec<_> = (0..8)
        .map(|_| {
            let (http, url, key) = (app.http.clone(), app.url.clone(), racer_secret.clone());
            let (revoked_at, stop, late) =
                (revoked_at.clone(), stop.clone(), late_successes.clone());
            tokio::spawn(async move {
                while !stop.load(Ordering::SeqCst) {
                    let started = Instant::now();
                    let resp = http
                        .get(format!("{url}/api/orders?limit=1"))
                        .bearer_auth(&key)
                        .send()
                        .await
                        .unwrap();
                    let after_revoke = revoked_at.lock().unwrap().is_some_and(|r| started > r);
                    if resp.status() == 200 && after_revoke {
                        late.fetch_add(1, Ordering::SeqCst);
                    }
                }
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let (s, _, _) = ask(
        app,
        Method::POST,
        &format!("/api/keys/{racer_id}/revoke"),
        Some(a),
        IP,
        None,
    )
    .await;
    assert_eq!(s, 200);
    *revoked_at.lock().unwrap() = Some(Instant::now());
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, Ordering::SeqCst);
    for h in hammer {
        h.await.unwrap();
    }
    assert_eq!(late_successes.load(Ordering::SeqCst), 0);

    // Without a broadcast (no Redis), another instance drops a revoked key within the key
    // cache lifetime (5 s).
    let other = app.twin(|_| {}).await;
    let lone = new_key(app, a, json!({})).await;
    let lone_secret = lone["secret"].as_str().unwrap().to_owned();
    let (s, _, _) = ask(
        &other,
        Method::GET,
        "/api/orders",
        Some(&lone_secret),
        IP,
        None,
    )
    .await;
    assert_eq!(s, 200);
    let lone_id = lone["id"].as_i64().unwrap();
    let (s, _, _) = ask(
        app,
        Method::POST,
        &format!("/api/keys/{lone_id}/revoke"),
        Some(a),
        IP,
        None,
    )
    .await;
    assert_eq!(s, 200);
    let revoked = Instant::now();
    loop {
        let (s, _, _) = ask(
            &other,
            Method::GET,
            "/api/orders",
            Some(&lone_secret),
            IP,
            None,
        )
        .await;
        if s == 401 {
            break;
        }
        assert!(
            revoked.elapsed() < Duration::from_millis(5500),
            "the other instance kept the key"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    other.stop().await;

    // Storage audit: no secret issued above is stored anywhere.
    let dump = database_dump(app).await;
    for s in [&secret, &new_secret, &newest, &short] {
        assert!(!dump.contains(s.as_str()), "a key secret is stored");
    }
    assert!(!dump.is_empty());
}

/// Every byte the database holds: the SQLite files, or a `pg_dump` of the test's schema.
async fn database_dump(app: &TestApp) -> String {
    let config = &app.state.config;
    if config.database_url.is_empty() {
        let mut all = Vec::new();
        for entry in std::fs::read_dir(&config.data_dir).unwrap() {
            all.extend(std::fs::read(entry.unwrap().path()).unwrap_or_default());
        }
        return String::from_utf8_lossy(&all).into_owned();
    }
    let schema = config.database.schema.clone().unwrap();
    let out = std::process::Command::new("pg_dump")
        .arg("--data-only")
        .arg(format!("--schema={schema}"))
        .arg(&config.database_url)
        .output()
        .expect("pg_dump runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

pub async fn rate_limits_answer_429_with_headers_and_recover(app: &TestApp) {
    let app = app
        .sibling(
            |c| {
                trust_loopback(c);
                // 10 per 10 s: one token a second, so a slow machine cannot refill the burst
                // between two requests of the test.
                let mut p = plan(10, 0);
                p.key_window_secs = 10;
                c.plans.insert("default".into(), p);
            },
            Arc::new(SystemClock),
        )
        .await;
    let key = app.key_a.clone();
    // A customer made with another key of the account (its own bucket).
    let other = second_key(&app).await;
    let customer = bursar_sdk::Client::new(&app.url, &other)
        .create_customer(&Default::default())
        .await
        .unwrap()
        .body
        .id;
    let mut last_r = u64::MAX;
    for _ in 0..10 {
        let (s, h, _) = ask(
            &app,
            Method::GET,
            "/api/orders?limit=1",
            Some(&key),
            IP,
            None,
        )
        .await;
        assert_eq!(s, 200);
        assert_eq!(header(&h, "ratelimit-policy"), "\"key\";q=10;w=10");
        let rl = header(&h, "ratelimit");
        let r: u64 = rl
            .split(";r=")
            .nth(1)
            .unwrap()
            .split(';')
            .next()
            .unwrap()
            .parse()
            .unwrap();
        assert!(r < last_r, "{rl}");
        last_r = r;
    }
    assert_eq!(last_r, 0);
    // The 11th, also as a create with a key: 429, and not stored as the key's answer.
    let body = json!({"customer_id": customer, "amount": "5.00", "currency": "USD"});
    let resp = app
        .http
        .post(format!("{}/api/orders", app.url))
        .bearer_auth(&key)
        .header("x-forwarded-for", IP)
        .header("idempotency-key", "limited-once")
        .header("accept", "application/problem+json")
        .json(&body)
        .send()
        .await
        .unwrap();
    let (s, h, e) = json_of(resp).await;
    assert_eq!(s, 429, "{e}");
    assert_eq!(e["error_code"], "rate_limited");
    assert_eq!(
        e["type"],
        "https://iana.org/assignments/http-problem-types#quota-exceeded"
    );
    assert_eq!(e["violated-policies"], json!(["key"]));
    assert_eq!(header(&h, "bursar-rate-limited-reason"), "key-rate");
    assert!(header(&h, "ratelimit").contains("r=0"), "{h:?}");
    assert_eq!(header(&h, "retry-after"), "1");
    assert!(h.get("set-cookie").is_none() && h.get("cache-control").is_none());
    // A rolled key keeps the bucket: its successor is limited too.
    let (_, _, keys) = ask(
        &app,
        Method::GET,
        "/api/keys?limit=100",
        Some(&other),
        IP,
        None,
    )
    .await;
    let key_id = keys["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k["id"].as_i64().unwrap())
        .min()
        .unwrap();
    let (s, _, rolled) = ask(
        &app,
        Method::POST,
        &format!("/api/keys/{key_id}/roll"),
        Some(&other),
        IP,
        Some(json!({"grace_secs": 3600})),
    )
    .await;
    assert_eq!(s, 201, "{rolled}");
    let successor = rolled["secret"].as_str().unwrap().to_owned();
    let (s, _, _) = ask(&app, Method::GET, "/api/orders", Some(&successor), IP, None).await;
    assert_eq!(s, 429, "the successor started with a fresh burst");
    // Another account is not affected.
    let (s, _, _) = ask(&app, Method::GET, "/api/orders", Some(&app.key_b), IP, None).await;
    assert_eq!(s, 200);
    // After Retry-After the same request runs (it was never stored).
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let resp = app
        .http
        .post(format!("{}/api/orders", app.url))
        .bearer_auth(&key)
        .header("x-forwarded-for", IP)
        .header("idempotency-key", "limited-once")
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 201);
    assert!(resp.headers().get("idempotent-replayed").is_none());
    app.stop().await;
}

pub async fn failed_authentication_is_throttled_per_ip(app: &TestApp) {
    let app = app
        .sibling(
            |c| {
                trust_loopback(c);
                c.limits.auth_failures_limit = 5;
            },
            Arc::new(SystemClock),
        )
        .await;
    let good = app.key_a.clone();
    let mut bad: Vec<char> = good.chars().collect();
    bad[20] = if bad[20] == 'a' { 'b' } else { 'a' };
    let bad: String = bad.into_iter().collect();
    let unknown = bursar_server::services::accounts::new_key(bursar_domain::apikey::KeyMode::Test)
        .reveal()
        .to_owned();
    let guesser = "203.0.113.66";
    for (i, key) in [&bad, &unknown, &bad, &unknown, &bad]
        .into_iter()
        .enumerate()
    {
        let (s, h, e) = ask(&app, Method::GET, "/api/orders", Some(key), guesser, None).await;
        assert_eq!(
            (s.as_u16(), e["error_code"].as_str()),
            (401, Some("invalid_api_key")),
            "attempt {i}"
        );
        assert!(h.get("ratelimit").is_none());
    }
    // The sixth is refused before any lookup, even with a valid key from that address.
    for key in [&bad, &good] {
        let (s, h, e) = ask(&app, Method::GET, "/api/orders", Some(key), guesser, None).await;
        assert_eq!(
            (s.as_u16(), e["error_code"].as_str()),
            (429, Some("rate_limited")),
            "{e}"
        );
        assert_eq!(header(&h, "bursar-rate-limited-reason"), "ip-auth");
        assert_eq!(e["violated-policies"], json!(["ip-auth"]));
    }
    // The same /64 is the same client; another address is not affected.
    for ip in ["2001:db8:7:1::1", "2001:db8:7:1::2"] {
        for _ in 0..3 {
            call(&app, Method::GET, "/api/orders", Some(&bad), ip, None).await;
        }
    }
    let (s, _, _) = ask(
        &app,
        Method::GET,
        "/api/orders",
        Some(&good),
        "2001:db8:7:1::9",
        None,
    )
    .await;
    assert_eq!(s, 429);
    let (s, _, _) = ask(&app, Method::GET, "/api/orders", Some(&good), IP, None).await;
    assert_eq!(s, 200);
    let (s, _, _) = ask(&app, Method::GET, "/api/orders", Some(&bad), IP, None).await;
    assert_eq!(s, 401);
    // A mistyped key is refused before any I/O: with the database gone it is still a 401
    // (a lookup would have been a 503).
    app.store.close().await;
    let (s, _, e) = ask(
        &app,
        Method::GET,
        "/api/orders",
        Some(&bad),
        "192.0.2.1",
        None,
    )
    .await;
    assert_eq!(
        (s.as_u16(), e["error_code"].as_str()),
        (401, Some("invalid_api_key")),
        "{e}"
    );
    let (s, _, _) = ask(
        &app,
        Method::GET,
        "/api/orders",
        Some(&unknown),
        "192.0.2.1",
        None,
    )
    .await;
    assert_eq!(s, 503, "a well-formed unknown key is looked up");
    // The right-most untrusted address is the client: an address the guesser prepends (the
    // proxy appends the real one) does not change who is throttled (a lookup, were the
    // guesser taken for IP, would be a 503 with the database closed).
    let spoofed = format!("{IP}, {guesser}");
    let (s, _, _) = ask(
        &app,
        Method::GET,
        "/api/orders",
        Some(&unknown),
        &spoofed,
        None,
    )
    .await;
    assert_eq!(s, 429);
    app.stop().await;
}

pub async fn monthly_quota_is_exact_free_on_replay_and_resets(app: &TestApp) {
    let clock = ManualClock::new();
    let app = app
        .sibling(
            |c| {
                c.plans.insert("default".into(), plan(0, 1000));
            },
            clock.clone(),
        )
        .await;
    let key = app.key_a.clone();
    // 5,000 requests, 64 at a time, through two instances: exactly 1,000 succeed.
    let twin = app.twin(|_| {}).await;
    let ok = Arc::new(AtomicU64::new(0));
    let refused = Arc::new(AtomicU64::new(0));
    let next = Arc::new(AtomicU64::new(0));
    let tasks: Vec<_> = (0..64)
        .map(|i| {
            let url = if i % 2 == 0 {
                app.url.clone()
            } else {
                twin.url.clone()
            };
            let (http, key) = (app.http.clone(), key.clone());
            let (ok, refused, next) = (ok.clone(), refused.clone(), next.clone());
            tokio::spawn(async move {
                while next.fetch_add(1, Ordering::SeqCst) < 5000 {
                    let resp = http
                        .get(format!("{url}/api/orders?limit=1"))
                        .bearer_auth(&key)
                        .send()
                        .await
                        .unwrap();
                    match resp.status().as_u16() {
                        200 => ok.fetch_add(1, Ordering::SeqCst),
                        429 => refused.fetch_add(1, Ordering::SeqCst),
                        other => panic!("unexpected {other}"),
                    };
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    assert_eq!(ok.load(Ordering::SeqCst), 1000);
    assert_eq!(refused.load(Ordering::SeqCst), 4000);
    twin.stop().await;
    let now = clock.now();
    let period = Period::month_of(now);
    assert_eq!(
        app.store
            .quota_used(app.account_a, period.start)
            .await
            .unwrap(),
        1000
    );
    // The refusal says when the period turns (+ at most 10 %).
    let (s, h, e) = ask(&app, Method::GET, "/api/orders", Some(&key), IP, None).await;
    assert_eq!(
        (s.as_u16(), e["error_code"].as_str()),
        (429, Some("quota_exceeded"))
    );
    assert_eq!(header(&h, "bursar-rate-limited-reason"), "quota-monthly");
    assert_eq!(e["violated-policies"], json!(["monthly"]));
    let retry: i64 = header(&h, "retry-after").parse().unwrap();
    let to_end = (period.end.0 - now.0) / 1000;
    assert!(
        retry >= to_end && retry <= to_end + to_end / 10 + 1,
        "{retry} vs {to_end}"
    );
    // Account b has its own quota.
    let (s, _, _) = ask(&app, Method::GET, "/api/orders", Some(&app.key_b), IP, None).await;
    assert_eq!(s, 200);
    // The last millisecond of the month is still refused; the first of the next is not.
    clock.set(bursar_domain::Timestamp(period.end.0 - 1));
    let (s, _, _) = ask(&app, Method::GET, "/api/orders", Some(&key), IP, None).await;
    assert_eq!(s, 429);
    clock.set(period.end);
    let (s, h, _) = ask(&app, Method::GET, "/api/orders", Some(&key), IP, None).await;
    assert_eq!(s, 200);
    assert!(
        header(&h, "ratelimit").contains("\"monthly\";r=999"),
        "{h:?}"
    );
    assert!(
        header(&h, "ratelimit-policy").contains("\"monthly\";q=1000"),
        "{h:?}"
    );

    // Replays of an idempotent create cost one unit and are metered once.
    let next_period = Period::month_of(clock.now());
    let customer = app.customer(&app.b).await;
    let used = app
        .store
        .quota_used(app.account_b, next_period.start)
        .await
        .unwrap();
    let writes_before = writes(&app).await;
    let body = json!({"customer_id": customer, "amount": "5.00", "currency": "USD"});
    for i in 0..5 {
        let resp = app
            .http
            .post(format!("{}/api/orders", app.url))
            .bearer_auth(&app.key_b)
            .header("idempotency-key", "once-only")
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 201);
        assert_eq!(resp.headers().contains_key("idempotent-replayed"), i > 0);
    }
    // Plus one for the usage read of `writes`.
    assert_eq!(
        app.store
            .quota_used(app.account_b, next_period.start)
            .await
            .unwrap(),
        used + 2
    );
    assert_eq!(writes(&app).await, writes_before + 1);
    app.stop().await;
}

/// Account b's metered writes so far (the usage read itself is metered after it answers).
async fn writes(app: &TestApp) -> i64 {
    let (s, _, usage) = ask(
        app,
        Method::GET,
        "/api/usage?group_by=route_class",
        Some(&app.key_b),
        IP,
        None,
    )
    .await;
    assert_eq!(s, 200, "{usage}");
    usage["data"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|g| g["route_class"] == "write")
        .map(|g| g["requests"].as_i64().unwrap())
        .sum()
}

fn tiers(mode: TierMode) -> UsagePrice {
    let tier = |up_to, amount: &str| Tier {
        up_to,
        unit_amount: amount.parse().unwrap(),
        flat_amount: Default::default(),
    };
    UsagePrice {
        mode,
        tiers: vec![
            tier(Some(1_000), "0.10"),
            tier(Some(10_000), "0.05"),
            tier(None, "0.01"),
        ],
        included_units: 0,
    }
}

pub async fn usage_is_metered_and_priced_on_the_invoice(app: &TestApp) {
    let app = app
        .sibling(
            |c| {
                let mut graduated = plan(0, 0);
                graduated.price = Some(tiers(TierMode::Graduated));
                let mut volume = plan(0, 0);
                volume.price = Some(tiers(TierMode::Volume));
                volume.base_fee = "25.00".parse().unwrap();
                c.plans.insert("graduated".into(), graduated);
                c.plans.insert("volume".into(), volume);
            },
            Arc::new(SystemClock),
        )
        .await;
    let config = app.state.config.clone();
    let store = app.store.as_ref();
    bursar_server::services::accounts::set_plan(store, &config, "a", "graduated")
        .await
        .unwrap();
    bursar_server::services::accounts::set_plan(store, &config, "b", "volume")
        .await
        .unwrap();
    // Real requests are metered per key and class.
    let k2 = new_key(&app, &app.key_a, json!({"name": "second"})).await;
    let k2_secret = k2["secret"].as_str().unwrap().to_owned();
    for key in [&app.key_a, &app.key_a, &k2_secret] {
        let (s, _, _) = ask(&app, Method::GET, "/api/orders", Some(key), IP, None).await;
        assert_eq!(s, 200);
    }
    let (s, _, u) = ask(
        &app,
        Method::GET,
        "/api/usage?group_by=key,route_class",
        Some(&app.key_a),
        IP,
        None,
    )
    .await;
    assert_eq!(s, 200, "{u}");
    let reads_of = |key_id: i64| {
        u["data"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|g| g["key_id"] == key_id && g["route_class"] == "read")
            .map(|g| g["requests"].as_i64().unwrap())
            .sum::<i64>()
    };
    // The usage call itself is metered after its answer; the key create was a write.
    assert_eq!(reads_of(k2["id"].as_i64().unwrap()), 1, "{u}");
    assert!(reads_of(first_key_id(&app).await) >= 2, "{u}");
    let (s, _, e) = ask(
        &app,
        Method::GET,
        "/api/usage?group_by=week",
        Some(&app.key_a),
        IP,
        None,
    )
    .await;
    assert_eq!(
        (s.as_u16(), e["error_code"].as_str()),
        (400, Some("invalid_parameter"))
    );

    // 15,000 units in the period: 600.00 graduated, 150.00 (+ the 25.00 fee) volume.
    let today = day_of(SystemClock.now());
    for (account, key) in [
        (app.account_a, first_key_id(&app).await),
        (app.account_b, 0),
    ] {
        let (_, _, inv) = ask(
            &app,
            Method::GET,
            "/api/invoices/upcoming",
            Some(if account == app.account_a {
                &app.key_a
            } else {
                &app.key_b
            }),
            IP,
            None,
        )
        .await;
        let already = inv["units"].as_i64().unwrap();
        app.store
            .add_usage(&[UsageRow {
                account_id: account,
                key_id: key,
                route_class: "read".into(),
                day: today,
                requests: 15_000 - already - 1,
                last_at: today,
            }])
            .await
            .unwrap();
    }
    // (Each invoice call is itself one metered read, counted after it answers.)
    let (s, _, inv) = ask(
        &app,
        Method::GET,
        "/api/invoices/upcoming",
        Some(&app.key_a),
        IP,
        None,
    )
    .await;
    assert_eq!(s, 200, "{inv}");
    assert_eq!(
        (inv["units"].as_i64(), inv["total"].as_str()),
        (Some(15_000), Some("600.00")),
        "{inv}"
    );
    assert_eq!(inv["plan"], "graduated");
    let amounts: Vec<&str> = inv["lines"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["amount"].as_str().unwrap())
        .collect();
    assert_eq!(amounts, ["0.00", "100.00", "450.00", "50.00"], "{inv}");
    let (_, _, inv) = ask(
        &app,
        Method::GET,
        "/api/invoices/upcoming",
        Some(&app.key_b),
        IP,
        None,
    )
    .await;
    assert_eq!(
        (inv["units"].as_i64(), inv["total"].as_str()),
        (Some(15_000), Some("175.00")),
        "{inv}"
    );
    assert_eq!(inv["pricing"], "volume");
    app.stop().await;
}

async fn first_key_id(app: &TestApp) -> i64 {
    let (_, _, list) = ask(
        app,
        Method::GET,
        "/api/keys?limit=100",
        Some(&app.key_a),
        IP,
        None,
    )
    .await;
    list["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k["id"].as_i64().unwrap())
        .min()
        .unwrap()
}

/// The Redis of the test suites, or `None` (skipped, and said) when not configured.
fn redis_url() -> Option<String> {
    let url = std::env::var("BURSAR_TEST_REDIS_URL").ok();
    if url.is_none() {
        assert!(
            std::env::var_os("BURSAR_TEST_REQUIRE_POSTGRES").is_none(),
            "CI sets BURSAR_TEST_REDIS_URL"
        );
        eprintln!("skipped: BURSAR_TEST_REDIS_URL is not set");
    }
    url
}

fn shared_limits(url: &str, prefix: &str) -> impl Fn(&mut bursar_server::Config) {
    let (url, prefix) = (url.to_owned(), prefix.to_owned());
    move |c| {
        trust_loopback(c);
        c.limits.redis_url = Some(url.clone());
        c.limits.redis_key_prefix = prefix.clone();
        c.limits.instances = 2;
        c.plans.insert(
            "default".into(),
            PlanConfig {
                key_limit: 50,
                key_window_secs: 1,
                ..PlanConfig::default()
            },
        );
    }
}

pub async fn two_instances_share_limits_and_revocations_through_redis(app: &TestApp) {
    let Some(url) = redis_url() else { return };
    let prefix = format!("t{}", uuid::Uuid::new_v4().simple());
    let a = app
        .sibling(shared_limits(&url, &prefix), Arc::new(SystemClock))
        .await;
    let b = a.twin(|_| {}).await;
    // Hammer one key through both instances: never above the GCRA maximum, at least 99 % of it.
    let key = a.key_a.clone();
    let started = Instant::now();
    let ok = Arc::new(std::sync::Mutex::new(Vec::<Duration>::new()));
    let tasks: Vec<_> = (0..16)
        .map(|i| {
            let url = if i % 2 == 0 {
                a.url.clone()
            } else {
                b.url.clone()
            };
            let (http, key, ok) = (a.http.clone(), key.clone(), ok.clone());
            tokio::spawn(async move {
                while started.elapsed() < Duration::from_secs(3) {
                    let resp = http
                        .get(format!("{url}/api/orders?limit=1"))
                        .bearer_auth(&key)
                        .send()
                        .await
                        .unwrap();
                    match resp.status().as_u16() {
                        200 => ok.lock().unwrap().push(started.elapsed()),
                        429 => {}
                        other => panic!("unexpected {other}"),
                    }
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    let elapsed = started.elapsed().as_secs_f64();
    let times = ok.lock().unwrap().clone();
    let allowed = times.len() as f64;
    let max = 50.0 + (50.0 * elapsed).floor();
    let (first, last) = (times.iter().min().unwrap(), times.iter().max().unwrap());
    let expected = 50.0 + 50.0 * (*last - *first).as_secs_f64();
    assert!(allowed <= max, "{allowed} allowed, at most {max}");
    assert!(
        allowed >= 0.99 * expected.floor(),
        "{allowed} allowed, expected about {expected}"
    );

    // Revocation on A reaches B (which has the key cached) within a second.
    let victim = new_key(&a, &a.key_b, json!({})).await;
    let secret = victim["secret"].as_str().unwrap().to_owned();
    let (s, _, _) = ask(&b, Method::GET, "/api/orders", Some(&secret), IP, None).await;
    assert_eq!(s, 200);
    let id = victim["id"].as_i64().unwrap();
    let (s, _, _) = ask(
        &a,
        Method::POST,
        &format!("/api/keys/{id}/revoke"),
        Some(&a.key_b),
        IP,
        None,
    )
    .await;
    assert_eq!(s, 200);
    let revoked_at = Instant::now();
    loop {
        let (s, _, _) = ask(&b, Method::GET, "/api/orders", Some(&secret), IP, None).await;
        if s == 401 {
            break;
        }
        assert!(
            revoked_at.elapsed() < Duration::from_secs(1),
            "B still accepts the key"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(revoked_at.elapsed() < Duration::from_secs(1));
    b.stop().await;
    a.stop().await;
}

/// A private `redis-server` on a free port, to stop and start (the shared one stays up).
struct OwnRedis {
    port: u16,
    child: Option<std::process::Child>,
}

impl OwnRedis {
    fn start(port: u16) -> Option<OwnRedis> {
        let child = std::process::Command::new("redis-server")
            .args([
                "--port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .stdout(std::process::Stdio::null())
            .spawn()
            .ok()?;
        for _ in 0..100 {
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                return Some(OwnRedis {
                    port,
                    child: Some(child),
                });
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for OwnRedis {
    fn drop(&mut self) {
        self.stop();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Counts 200s and the other statuses of `n` quick requests.
async fn burst(app: &TestApp, n: usize) -> (usize, Vec<u16>) {
    let mut ok = 0;
    let mut other = Vec::new();
    for _ in 0..n {
        let (s, _, _) = ask(
            app,
            Method::GET,
            "/api/orders?limit=1",
            Some(&app.key_a),
            IP,
            None,
        )
        .await;
        if s == 200 {
            ok += 1;
        } else {
            other.push(s.as_u16());
        }
    }
    (ok, other)
}

pub async fn a_redis_outage_follows_the_fail_mode(app: &TestApp) {
    if redis_url().is_none() {
        return;
    }
    let port = free_port();
    let Some(mut redis) = OwnRedis::start(port) else {
        eprintln!("skipped: redis-server is not on PATH");
        return;
    };
    let url = format!("redis://127.0.0.1:{}", redis.port);
    let prefix = format!("t{}", uuid::Uuid::new_v4().simple());
    let open = app
        .sibling(
            |c| {
                shared_limits(&url, &prefix)(c);
                let default = c.plans.get_mut("default").unwrap();
                // 10 per minute: nothing refills while the test counts.
                default.key_limit = 10;
                default.key_window_secs = 60;
            },
            Arc::new(SystemClock),
        )
        .await;
    let closed = open.twin(|c| c.limits.fail_mode = FailMode::Closed).await;
    // Shared: 10 between both instances.
    let (a, _) = burst(&open, 6).await;
    let (b, _) = burst(&closed, 6).await;
    assert_eq!(a + b, 10);
    redis.stop();
    tokio::time::sleep(Duration::from_millis(1100)).await;
    // Open: served by the local limiter at 10 / 2 instances.
    let (ok, other) = burst(&open, 8).await;
    assert_eq!(
        (ok, other.iter().all(|s| *s == 429)),
        (5, true),
        "{other:?}"
    );
    // The fallback is counted where an operator alerts on it.
    let metrics = open.metrics().await;
    let fallbacks = metric(&metrics, "ratelimit_fallback_total");
    assert!(fallbacks.is_some_and(|n| n >= 3.0), "{metrics}");
    // Closed: 503 with Retry-After, never a 429 or a 500.
    let resp = call(
        &closed,
        Method::GET,
        "/api/orders",
        Some(&closed.key_a),
        IP,
        None,
    )
    .await;
    let (s, h, e) = json_of(resp).await;
    assert_eq!(
        (s.as_u16(), e["error_code"].as_str()),
        (503, Some("service_unavailable")),
        "{e}"
    );
    assert_eq!(header(&h, "retry-after"), "1");
    // Redis back: both instances return to it (the shared policy shows the whole limit, not
    // the per-instance share), and shared limiting resumes on a fresh Redis.
    let mut redis = OwnRedis::start(port).expect("redis-server restarts");
    for instance in [&open, &closed] {
        let mut back = false;
        for _ in 0..50 {
            tokio::time::sleep(Duration::from_millis(300)).await;
            let resp = call(
                instance,
                Method::GET,
                "/api/orders?limit=1",
                Some(&instance.key_b),
                IP,
                None,
            )
            .await;
            let (s, h, _) = json_of(resp).await;
            if s == 200 && header(&h, "ratelimit-policy").contains("q=10") {
                back = true;
                break;
            }
        }
        assert!(back, "an instance never used Redis again");
    }
    let (a, _) = burst(&open, 8).await;
    let (b, _) = burst(&closed, 8).await;
    assert_eq!(a + b, 10, "shared again: {a} + {b}");
    redis.stop();
    closed.stop().await;
    open.stop().await;
}

pub async fn usage_counted_in_memory_survives_a_graceful_shutdown(app: &TestApp) {
    // No periodic flush during the test: only the shutdown's.
    let app = app
        .sibling(
            |c| c.metering.flush_interval_ms = 3_600_000,
            Arc::new(SystemClock),
        )
        .await;
    for _ in 0..7 {
        let (s, _, _) = ask(&app, Method::GET, "/api/orders", Some(&app.key_a), IP, None).await;
        assert_eq!(s, 200);
    }
    assert_eq!(app.state.product.meter.pending(), 7);
    let app = app.restart().await;
    let (s, _, u) = ask(&app, Method::GET, "/api/usage", Some(&app.key_a), IP, None).await;
    assert_eq!((s.as_u16(), u["total"].as_i64()), (200, Some(7)), "{u}");
    app.stop().await;
}

pub async fn every_client_address_has_its_own_request_budget(app: &TestApp) {
    let app = app
        .sibling(
            |c| {
                trust_loopback(c);
                c.limits.ip_limit = 3;
                c.limits.ip_window_secs = 60;
            },
            Arc::new(SystemClock),
        )
        .await;
    // Authenticated or not, an address gets 3 requests a minute, before any key is looked up.
    for key in [Some(app.key_a.as_str()), None, Some(app.key_b.as_str())] {
        let (s, _, _) = ask(&app, Method::GET, "/api/orders", key, "203.0.113.10", None).await;
        assert_ne!(s, 429);
    }
    let (s, h, e) = ask(
        &app,
        Method::GET,
        "/api/orders",
        Some(&app.key_a),
        "203.0.113.10",
        None,
    )
    .await;
    assert_eq!(
        (s.as_u16(), e["error_code"].as_str()),
        (429, Some("rate_limited")),
        "{e}"
    );
    assert_eq!(header(&h, "bursar-rate-limited-reason"), "ip-rate");
    assert_eq!(e["violated-policies"], json!(["ip"]));
    // Another address is not affected, and the policy is advertised.
    let (s, h, _) = ask(
        &app,
        Method::GET,
        "/api/orders",
        Some(&app.key_a),
        "203.0.113.11",
        None,
    )
    .await;
    assert_eq!(s, 200);
    assert!(
        header(&h, "ratelimit-policy").contains("\"ip\";q=3;w=60"),
        "{h:?}"
    );
    app.stop().await;
}

pub async fn plan_changes_keep_the_period_usage_and_refusals_cost_nothing(app: &TestApp) {
    let app = app
        .sibling(
            |c| {
                c.plans.insert("default".into(), plan(0, 3));
                c.plans.insert("pro".into(), plan(0, 10));
                c.plans.insert("tiny".into(), plan(0, 2));
            },
            Arc::new(SystemClock),
        )
        .await;
    let period = Period::month_of(SystemClock.now());
    let used = || async {
        app.store
            .quota_used(app.account_a, period.start)
            .await
            .unwrap()
    };
    // A 403 (scope) is not charged.
    let reader = second_key(&app).await;
    let (s, _, k) = ask(
        &app,
        Method::POST,
        "/api/keys",
        Some(&reader),
        IP,
        Some(json!({"scopes": ["orders:read"]})),
    )
    .await;
    assert_eq!(s, 201);
    assert_eq!(used().await, 1);
    let scoped = k["secret"].as_str().unwrap().to_owned();
    let (s, _, _) = ask(
        &app,
        Method::POST,
        "/api/customers",
        Some(&scoped),
        IP,
        Some(json!({})),
    )
    .await;
    assert_eq!(s, 403);
    assert_eq!(used().await, 1);
    // Two more reads use up the quota of 3; the refusal is not charged either.
    for _ in 0..2 {
        let (s, _, _) = ask(&app, Method::GET, "/api/orders", Some(&scoped), IP, None).await;
        assert_eq!(s, 200);
    }
    let (s, _, _) = ask(&app, Method::GET, "/api/orders", Some(&scoped), IP, None).await;
    assert_eq!(s, 429);
    assert_eq!(used().await, 3);
    // An upgrade applies within the key cache lifetime and keeps what was used: r = 10 − 4.
    let config = app.state.config.clone();
    bursar_server::services::accounts::set_plan(app.store.as_ref(), &config, "a", "pro")
        .await
        .unwrap();
    // Polls until a response's `field` contains `want` (the key cache holds the plan ≤ 5 s).
    let until = |field: &'static str, want: &'static str| {
        let app = &app;
        let scoped = scoped.clone();
        async move {
            let deadline = Instant::now() + Duration::from_secs(7);
            loop {
                let (s, h, _) = ask(app, Method::GET, "/api/orders", Some(&scoped), IP, None).await;
                if header(&h, field).contains(want) {
                    return (s, h);
                }
                assert!(Instant::now() < deadline, "never saw {want}: {h:?}");
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        }
    };
    let (s, h) = until("ratelimit-policy", "\"monthly\";q=10").await;
    assert_eq!(s, 200);
    assert!(header(&h, "ratelimit").contains("\"monthly\";r=6"), "{h:?}");
    // A downgrade below what was used leaves nothing, never a negative remainder.
    bursar_server::services::accounts::set_plan(app.store.as_ref(), &config, "a", "tiny")
        .await
        .unwrap();
    let (s, h) = until("ratelimit-policy", "\"monthly\";q=2").await;
    assert_eq!(s, 429);
    assert!(header(&h, "ratelimit").contains("\"monthly\";r=0"), "{h:?}");
    app.stop().await;
}

/// With Redis, a read whose key is far from its limits runs its handler while the rate check is
/// on the wire. The answers are exactly those of checking first: 20 reads pass with `r` going
/// 19 → 0, then 429 `rate_limited` with `Retry-After`, and only the 20 are metered. The reads
/// near the limit (under a tenth of the burst left at the previous check) and the refused ones
/// were checked first.
pub async fn reads_overlap_their_rate_check_and_answer_the_same(app: &TestApp) {
    let Some(url) = redis_url() else { return };
    let prefix = format!("t{}", uuid::Uuid::new_v4().simple());
    let app = app
        .sibling(
            |c| {
                shared_limits(&url, &prefix)(c);
                c.metering.flush_interval_ms = 3_600_000;
                let plan = c.plans.get_mut("default").unwrap();
                (plan.key_limit, plan.key_window_secs) = (20, 600);
            },
            Arc::new(SystemClock),
        )
        .await;
    let mut remaining = Vec::new();
    for i in 0..25 {
        let (s, h, body) = ask(&app, Method::GET, "/api/orders", Some(&app.key_a), IP, None).await;
        let fields = header(&h, "ratelimit");
        if i < 20 {
            assert_eq!(s, 200, "read {i}: {body}");
            let r = fields
                .split(';')
                .find_map(|p| p.strip_prefix("r="))
                .and_then(|r| r.parse::<u64>().ok())
                .unwrap_or_else(|| panic!("read {i}: RateLimit {fields:?}"));
            remaining.push(r);
        } else {
            assert_eq!(s, 429, "read {i}: {body}");
            assert_eq!(body["error_code"], "rate_limited", "{body}");
            assert_eq!(header(&h, "bursar-rate-limited-reason"), "key-rate");
            assert!(header(&h, "retry-after").parse::<u64>().unwrap() >= 1);
            assert!(fields.contains("r=0"), "{fields}");
        }
    }
    assert_eq!(remaining, (0..20).rev().collect::<Vec<u64>>());
    // The first read (no history) and those with r < 2 left were checked first: reads 2–19.
    assert_eq!(app.state.product.overlapped_reads(), 18);
    assert_eq!(
        app.state.product.meter.pending(),
        20,
        "429s are not metered"
    );

    // A read that overlaps and is refused: this instance last saw key b far from its limit,
    // a second instance has spent the rest since. The handler ran, the answer is still the 429.
    let twin = app.twin(|_| {}).await;
    let key = app.key_b.clone();
    let read = |on| ask(on, Method::GET, "/api/orders", Some(&key), IP, None);
    for _ in 0..2 {
        assert_eq!(read(&app).await.0, 200);
    }
    for _ in 0..18 {
        assert_eq!(read(&twin).await.0, 200);
    }
    let (overlapped, metered) = (
        app.state.product.overlapped_reads(),
        app.state.product.meter.pending(),
    );
    let (s, h, body) = read(&app).await;
    assert_eq!(s, 429, "{body}");
    assert_eq!(body["error_code"], "rate_limited", "{body}");
    assert!(header(&h, "ratelimit").contains("r=0"), "{h:?}");
    assert_eq!(app.state.product.overlapped_reads(), overlapped + 1);
    assert_eq!(app.state.product.meter.pending(), metered);
    twin.stop().await;
    app.stop().await;
}
