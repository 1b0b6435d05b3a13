//! Events and webhooks end to end (issue 5): a real receiver over HTTP, Bursar's relay and
//! worker inside the test server, and the SDK's verifier on every delivery.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicI64, AtomicU16, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::http::{HeaderMap, StatusCode};
use bursar_sdk::Client;
use bursar_sdk::webhooks::Verifier;
use bursar_server::{Config, SystemClock};
use bursar_storage::PageRequest;
use serde_json::{Value, json};

use crate::harness::{TestApp, error_body};

/// One request as the receiver got it.
#[derive(Clone)]
pub struct Received {
    pub headers: HeaderMap,
    pub body: Bytes,
    pub answered: u16,
}

/// A webhook receiver: records every request and answers with the current status, after
/// `delay_ms`; it measures how many requests it is serving at once.
pub struct Receiver {
    pub url: String,
    pub status: Arc<AtomicU16>,
    pub got: Arc<Mutex<Vec<Received>>>,
    pub delay_ms: Arc<AtomicU64>,
    /// The most requests served at once (reset by storing 0).
    pub peak: Arc<AtomicI64>,
}

impl Receiver {
    pub async fn start(status: u16) -> Receiver {
        Receiver::start_at(SocketAddr::from(([127, 0, 0, 1], 0)), status).await
    }

    /// A receiver on a given address (a port that refused connections until now).
    pub async fn start_at(addr: SocketAddr, status: u16) -> Receiver {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .unwrap_or_else(|e| panic!("binding the receiver to {addr}: {e}"));
        let url = format!("http://{}/hooks", listener.local_addr().unwrap());
        let status = Arc::new(AtomicU16::new(status));
        let got: Arc<Mutex<Vec<Received>>> = Arc::default();
        let delay_ms = Arc::new(AtomicU64::new(0));
        let (peak, serving) = (Arc::new(AtomicI64::new(0)), Arc::new(AtomicI64::new(0)));
        let (s, g, d, p) = (status.clone(), got.clone(), delay_ms.clone(), peak.clone());
        let app = axum::Router::new().route(
            "/hooks",
            axum::routing::post(move |headers: HeaderMap, body: Bytes| {
                let (s, g, d, p, n) = (s.clone(), g.clone(), d.clone(), p.clone(), serving.clone());
                async move {
                    p.fetch_max(n.fetch_add(1, Ordering::SeqCst) + 1, Ordering::SeqCst);
                    let delay = d.load(Ordering::SeqCst);
                    if delay > 0 {
                        tokio::time::sleep(Duration::from_millis(delay)).await;
                    }
                    let answered = s.load(Ordering::SeqCst);
                    g.lock().unwrap().push(Received {
                        headers,
                        body,
                        answered,
                    });
                    n.fetch_sub(1, Ordering::SeqCst);
                    StatusCode::from_u16(answered).unwrap()
                }
            }),
        );
        tokio::spawn(async move { axum::serve(listener, app).await });
        Receiver {
            url,
            status,
            got,
            delay_ms,
            peak,
        }
    }

    pub fn received(&self) -> Vec<Received> {
        self.got.lock().unwrap().clone()
    }
}

/// A server of the same backend whose worker may reach 127.0.0.1 over plain HTTP, retries
/// after about a second, and probes an open circuit after a second.
async fn webhook_app(app: &TestApp) -> TestApp {
    webhook_app_with(app, |_| {}).await
}

/// [`webhook_app`] with a further change to its configuration.
async fn webhook_app_with(app: &TestApp, change: impl FnOnce(&mut Config)) -> TestApp {
    app.sibling(
        |c| {
            c.webhooks.allow_cidrs = vec!["127.0.0.0/8".into()];
            c.webhooks.schedule_secs = vec![1; 9];
            c.webhooks.timeout_ms = 5_000;
            c.webhooks.circuit_cooldown_secs = 1;
            change(c);
        },
        Arc::new(SystemClock),
    )
    .await
}

async fn create_endpoint(client: &Client, body: Value) -> reqwest::Response {
    client
        .request(reqwest::Method::POST, "/api/webhook_endpoints")
        .json(&body)
        .send()
        .await
        .unwrap()
}

/// Every event id of the account, through the events API (all pages); `types` as the API's
/// filter (comma-separated), or empty for every type.
async fn all_event_ids(client: &Client, types: &str) -> Vec<String> {
    let mut ids = Vec::new();
    let mut after: Option<i64> = None;
    loop {
        let mut path = format!("/api/events?limit=100&types={types}");
        if let Some(seq) = after {
            path.push_str(&format!("&starting_after={seq}"));
        }
        let page: Value = call_json(client, reqwest::Method::GET, &path).await;
        for e in page["data"].as_array().unwrap() {
            ids.push(e["id"].as_str().unwrap().to_owned());
            after = e["seq"].as_i64();
        }
        if page["has_more"] != json!(true) {
            return ids;
        }
    }
}

/// The `n` event ids of `types` the account produced, once the relay has sequenced them all
/// (it does within a poll interval).
async fn produced_events(client: &Client, types: &str, n: usize) -> BTreeSet<String> {
    let mut produced = BTreeSet::new();
    for _ in 0..100 {
        produced = all_event_ids(client, types).await.into_iter().collect();
        if produced.len() >= n {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(produced.len(), n, "events listed: {produced:?}");
    produced
}

/// A request without a body, answered with JSON.
async fn call_json(client: &Client, method: reqwest::Method, path: &str) -> Value {
    let resp = client.request(method, path).send().await.unwrap();
    resp.json().await.unwrap()
}

async fn wait_for(what: &str, mut done: impl FnMut() -> bool) {
    for _ in 0..600 {
        if done() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("timed out waiting for {what}");
}

fn now_secs() -> i64 {
    #[allow(clippy::disallowed_methods)]
    let now = std::time::SystemTime::now();
    now.duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64
}

/// Creates an endpoint for every `types` pattern at the receiver: its JSON (secret in full).
async fn endpoint_at(app: &TestApp, receiver: &Receiver, types: Value) -> Value {
    let resp = create_endpoint(&app.a, json!({"url": receiver.url, "event_types": types})).await;
    assert_eq!(resp.status(), 201);
    let endpoint: Value = resp.json().await.unwrap();
    assert!(
        endpoint["secret"].as_str().unwrap().starts_with("whsec_"),
        "{endpoint}"
    );
    endpoint
}

/// The deliveries of an endpoint through the API (newest first, the first 100).
async fn deliveries(app: &TestApp, endpoint: &Value) -> Vec<Value> {
    let id = endpoint["id"].as_i64().unwrap();
    let path = format!("/api/webhook_endpoints/{id}/deliveries?limit=100");
    let page: Value = call_json(&app.a, reqwest::Method::GET, &path).await;
    page["data"].as_array().unwrap().clone()
}

/// The end of an outage (checklist B10), once the receiver answers 200 again: every produced
/// event arrives, exactly once with a 200; every request carries the event's id, verifies in
/// both schemes and has the A3 headers; a retry repeats the body byte for byte; every delivery
/// ends `succeeded`; and each delivery's attempts log is `1..=n` with one success, the last,
/// after failures recorded as `failure` (error kind and status: `("http_status", Some(503))`,
/// `("connect", None)`).
async fn assert_recovered(
    app: &TestApp,
    receiver: &Receiver,
    endpoint: &Value,
    produced: &BTreeSet<String>,
    failure: (&str, Option<i64>),
) {
    wait_for("every event delivered", || {
        let ok: BTreeSet<String> = receiver
            .received()
            .iter()
            .filter(|r| r.answered == 200)
            .map(|r| r.headers["webhook-id"].to_str().unwrap().to_owned())
            .collect();
        ok == *produced
    })
    .await;
    let secret = endpoint["secret"].as_str().unwrap();
    let verifier = Verifier::new([secret]).unwrap();
    let mut bodies: BTreeMap<String, Bytes> = BTreeMap::new();
    let mut successes: BTreeMap<String, usize> = BTreeMap::new();
    for r in receiver.received() {
        let id = r.headers["webhook-id"].to_str().unwrap().to_owned();
        assert!(produced.contains(&id), "an event nobody produced: {id}");
        assert!(!id.contains('.'));
        verifier.verify(&r.headers, &r.body, now_secs()).unwrap();
        verifier.verify_hex(&r.headers, &r.body).unwrap();
        assert_eq!(r.headers["content-type"], "application/json");
        let agent = r.headers["user-agent"].to_str().unwrap();
        assert!(agent.starts_with("Bursar-Webhooks/"), "{agent}");
        assert!(r.headers.contains_key("x-request-id"));
        assert!(r.headers.contains_key("traceparent"));
        let ts: i64 = r.headers["webhook-timestamp"]
            .to_str()
            .unwrap()
            .parse()
            .unwrap();
        assert!((now_secs() - ts).abs() < 120);
        let payload: Value = serde_json::from_slice(&r.body).unwrap();
        assert_eq!(payload["id"], id.as_str());
        // Retries carry the same bytes.
        if let Some(first) = bodies.insert(id.clone(), r.body.clone()) {
            assert_eq!(first, r.body, "a retry of {id} changed its body");
        }
        if r.answered == 200 {
            *successes.entry(id).or_default() += 1;
        }
    }
    let twice: Vec<_> = successes.iter().filter(|(_, n)| **n != 1).collect();
    assert!(twice.is_empty(), "delivered more than once: {twice:?}");

    // The delivery log agrees: every delivery succeeded, after failed attempts. The last
    // completion may land a moment after the receiver answered.
    let mut data = Vec::new();
    for _ in 0..100 {
        data = deliveries(app, endpoint).await;
        if data.len() == produced.len() && data.iter().all(|d| d["state"] == "succeeded") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(data.len(), produced.len());
    assert!(data.iter().all(|d| d["state"] == "succeeded"), "{data:#?}");
    assert!(
        data.iter().any(|d| d["attempt_count"].as_i64() >= Some(2)),
        "{data:#?}"
    );
    let logged: BTreeSet<String> = data
        .iter()
        .map(|d| d["event_id"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(&logged, produced);
    // The whole attempts log, from the store: the API pages it by an id it does not show.
    let all = PageRequest {
        limit: 100_000,
        starting_after: None,
    };
    let endpoint_id = endpoint["id"].as_i64().unwrap();
    let attempts = app
        .store
        .list_attempts(app.account_a, endpoint_id, all)
        .await
        .unwrap();
    let mut by_delivery: BTreeMap<i64, Vec<_>> = BTreeMap::new();
    for a in &attempts {
        by_delivery.entry(a.delivery_id).or_default().push(a);
    }
    assert_eq!(by_delivery.len(), produced.len());
    for d in &data {
        let id = d["id"].as_i64().unwrap();
        let mut tries = by_delivery.remove(&id).unwrap_or_default();
        tries.sort_by_key(|a| a.attempt_no);
        let numbers: Vec<i64> = tries.iter().map(|a| a.attempt_no).collect();
        let count = d["attempt_count"].as_i64().unwrap();
        assert_eq!(numbers, (1..=count).collect::<Vec<_>>(), "delivery {id}");
        let (last, failed) = tries.split_last().unwrap();
        assert_eq!(
            (last.status_code, last.error_kind.as_deref()),
            (Some(200), None)
        );
        for a in failed {
            assert_eq!(
                (a.error_kind.as_deref(), a.status_code),
                (Some(failure.0), failure.1),
                "{a:?}"
            );
        }
    }
}

/// Spec checklist B10 (503 variant) with A1–A4 and A7 on every delivery: a receiver that
/// fails while 100 events are produced gets all of them once it recovers, every request
/// verifies in both schemes, and duplicates are identical retries.
pub async fn a_receiver_outage_loses_no_event(app: &TestApp) {
    let app = webhook_app(app).await;
    let receiver = Receiver::start(503).await;
    let endpoint = endpoint_at(&app, &receiver, json!(["*"])).await;
    // 100 events: 10 customers with 9 orders each.
    for _ in 0..10 {
        let customer = app.customer(&app.a).await;
        for i in 0..9 {
            let body = json!({"customer_id": customer, "amount": format!("{}.10", i + 1), "currency": "EUR"});
            let resp = app.post_order_raw(&app.a, body.to_string()).await;
            assert_eq!(resp.status(), 201);
        }
    }
    // Failing deliveries are retried while the receiver is down.
    wait_for("failed attempts", || {
        receiver
            .received()
            .iter()
            .filter(|r| r.answered == 503)
            .count()
            >= 10
    })
    .await;
    receiver.status.store(200, Ordering::SeqCst);
    let produced = produced_events(&app.a, "customer.created,order.created", 100).await;
    assert_recovered(
        &app,
        &receiver,
        &endpoint,
        &produced,
        ("http_status", Some(503)),
    )
    .await;
    app.stop().await;
}

/// Spec checklist B10, refused-connection variant: nothing listens on the endpoint's port
/// while 100 events of 10 orders (each created, then updated nine times) are produced, so
/// every attempt fails with `connect`; then a receiver starts on that port and gets every
/// event exactly once (each order's versions 1–10, each once).
/// Durability under a database outage: the attempt of a delivery the receiver already got
/// cannot be recorded for longer than the worker's quick retries (SQLite's write lock is
/// held for 6 s while the busy timeout is 50 ms), and it is recorded once the database takes
/// writes again, long before the lease lapses: the receiver gets the event once, and the
/// delivery ends `succeeded` after one attempt. SQLite only: holding the write lock makes
/// this server's database refuse writes without touching anyone else's (on PostgreSQL the
/// same would mean cutting connections to the server every test shares).
pub async fn an_attempt_is_recorded_after_a_database_outage(app: &TestApp) {
    if !matches!(app.backend, crate::harness::Backend::Sqlite) {
        return;
    }
    let app = webhook_app_with(app, |c| {
        c.database.busy_timeout_ms = 50;
        c.webhooks.lease_secs = 120;
    })
    .await;
    let receiver = Receiver::start(200).await;
    // Long enough to take the lock while the request is being answered.
    receiver.delay_ms.store(1_000, Ordering::SeqCst);
    let endpoint = endpoint_at(&app, &receiver, json!(["customer.created"])).await;
    app.customer(&app.a).await;
    wait_for("the request to reach the receiver", || {
        receiver.peak.load(Ordering::SeqCst) > 0
    })
    .await;
    let options = app
        .database_url()
        .parse::<sqlx::sqlite::SqliteConnectOptions>()
        .unwrap()
        .busy_timeout(Duration::from_secs(10));
    let mut lock = sqlx::ConnectOptions::connect(&options).await.unwrap();
    sqlx::raw_sql("BEGIN IMMEDIATE")
        .execute(&mut lock)
        .await
        .unwrap();
    let locked = std::time::Instant::now();
    // Longer than the worker's quick retries (about 3.5 s with this busy timeout).
    tokio::time::sleep(Duration::from_secs(6)).await;
    assert_eq!(receiver.received().len(), 1, "answered while locked");
    // Readers still see the database: nothing could be recorded while the lock was held.
    let data = deliveries(&app, &endpoint).await;
    assert_eq!(data.len(), 1);
    assert_eq!(data[0]["state"], "in_flight", "{}", data[0]);
    sqlx::raw_sql("ROLLBACK").execute(&mut lock).await.unwrap();
    let mut delivery = data[0].clone();
    for _ in 0..200 {
        if delivery["state"] == "succeeded" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        delivery = deliveries(&app, &endpoint).await[0].clone();
    }
    assert_eq!(delivery["state"], "succeeded", "{delivery}");
    assert_eq!(delivery["attempt_count"], 1, "{delivery}");
    assert!(
        locked.elapsed() < Duration::from_secs(60),
        "recorded within the lease"
    );
    // And it is not sent again.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(receiver.received().len(), 1);
    app.stop().await;
}

pub async fn a_refusing_receiver_loses_no_event(app: &TestApp) {
    // Enough attempts that none runs out during the outage.
    let app = webhook_app_with(app, |c| c.webhooks.schedule_secs = vec![1; 30]).await;
    // A port nobody listens on: connections are refused until the receiver binds it.
    let addr = {
        let reserved = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        reserved.local_addr().unwrap()
    };
    let url = format!("http://{addr}/hooks");
    let resp = create_endpoint(&app.a, json!({"url": url, "event_types": ["order.*"]})).await;
    assert_eq!(resp.status(), 201);
    let endpoint: Value = resp.json().await.unwrap();
    let customer = app.customer(&app.a).await;
    let mut orders: Vec<(i64, i64)> = Vec::new();
    for round in 0..10 {
        if round == 0 {
            for i in 0..10 {
                let body = json!({"customer_id": customer, "amount": format!("{}.00", i + 1), "currency": "EUR"});
                let resp = app.post_order_raw(&app.a, body.to_string()).await;
                assert_eq!(resp.status(), 201);
                let order: Value = resp.json().await.unwrap();
                orders.push((
                    order["id"].as_i64().unwrap(),
                    order["version"].as_i64().unwrap(),
                ));
            }
            continue;
        }
        for (id, version) in &mut orders {
            let resp = app
                .a
                .request(reqwest::Method::PATCH, &format!("/api/orders/{id}"))
                .json(&json!({"description": format!("revision {round}"), "version": *version}))
                .send()
                .await
                .unwrap();
            assert_eq!(resp.status(), 200);
            let order: Value = resp.json().await.unwrap();
            *version = order["version"].as_i64().unwrap();
        }
    }
    let produced = produced_events(&app.a, "order.created,order.updated", 100).await;
    // Deliveries fail with `connect` and are retried; after 5 failures in a row the
    // endpoint's circuit opens, so the rest wait (unattempted) for its probes.
    let attempted = |d: &Value| d["attempt_count"].as_i64() > Some(0);
    let mut data = Vec::new();
    for _ in 0..300 {
        data = deliveries(&app, &endpoint).await;
        if data.len() == 100
            && data
                .iter()
                .filter(|d| attempted(d))
                .all(|d| d["last_error"] == "connect")
            && data.iter().any(|d| d["attempt_count"].as_i64() >= Some(2))
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(data.len(), 100);
    for d in &data {
        if attempted(d) {
            assert_eq!(d["last_error"], "connect", "{d}");
        }
        assert!(d["last_status"].is_null(), "{d}");
        assert_ne!(d["state"], "succeeded", "{d}");
        assert_ne!(
            d["state"], "failed",
            "ran out of attempts during the outage: {d}"
        );
    }
    assert!(
        data.iter().any(|d| d["attempt_count"].as_i64() >= Some(2)),
        "retried: {data:#?}"
    );
    let id = endpoint["id"].as_i64().unwrap();
    let shown: Value = call_json(
        &app.a,
        reqwest::Method::GET,
        &format!("/api/webhook_endpoints/{id}"),
    )
    .await;
    // Open, or half-open once its open period has passed and a probe is due: the
    // breaker holds deliveries back either way.
    assert!(
        shown["circuit_state"] == "open" || shown["circuit_state"] == "half_open",
        "{shown}"
    );
    let path = format!("/api/webhook_endpoints/{id}/attempts?limit=100");
    let page: Value = call_json(&app.a, reqwest::Method::GET, &path).await;
    let attempts = page["data"].as_array().unwrap();
    assert!(attempts.len() >= 6, "5 failures, then probes: {page}");
    for a in attempts {
        assert_eq!(a["error_kind"], "connect", "{a}");
        assert!(a["status_code"].is_null(), "{a}");
    }
    // The receiver comes up on the refused port and answers 200.
    let receiver = Receiver::start_at(addr, 200).await;
    assert_recovered(&app, &receiver, &endpoint, &produced, ("connect", None)).await;
    // Nothing failed at the receiver, so nothing was sent twice.
    assert_eq!(receiver.received().len(), 100);
    // Ordering metadata (checklist 26): each order's ten versions arrived, each once.
    let mut versions: BTreeMap<i64, BTreeSet<i64>> = BTreeMap::new();
    for r in receiver.received() {
        let payload: Value = serde_json::from_slice(&r.body).unwrap();
        let data = &payload["data"];
        assert_eq!(data["aggregate_type"], "order", "{payload}");
        let fresh = versions
            .entry(data["aggregate_id"].as_i64().unwrap())
            .or_default()
            .insert(data["aggregate_version"].as_i64().unwrap());
        assert!(fresh, "one version twice: {payload}");
    }
    assert_eq!(versions.len(), 10);
    for (order, seen) in &versions {
        assert_eq!(*seen, (1..=10).collect(), "order {order}");
    }
    app.stop().await;
}

/// Checklist 26, FIFO mode: with `fifo_per_aggregate`, the receiver never has two requests for
/// one order in flight, and each order's versions arrive in order even when version 2 needs
/// three retries (answered 500 three times; the other orders' deliveries keep the endpoint's
/// circuit closed).
pub async fn fifo_endpoints_receive_each_order_in_version_order(app: &TestApp) {
    let app = webhook_app(app).await;
    // (order, version, status) in arrival order; requests in flight per order, and the most.
    type Log = Arc<Mutex<Vec<(i64, i64, u16)>>>;
    let log: Log = Arc::default();
    let busy: Arc<Mutex<BTreeMap<i64, i64>>> = Arc::default();
    let overlap = Arc::new(AtomicI64::new(0));
    let refusals: Arc<Mutex<BTreeMap<i64, u32>>> = Arc::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/hooks", listener.local_addr().unwrap());
    let (l, b, o, r) = (log.clone(), busy.clone(), overlap.clone(), refusals.clone());
    let receiver = axum::Router::new().route(
        "/hooks",
        axum::routing::post(move |body: Bytes| {
            let (l, b, o, r) = (l.clone(), b.clone(), o.clone(), r.clone());
            async move {
                let payload: Value = serde_json::from_slice(&body).unwrap();
                let data = &payload["data"];
                let order = data["aggregate_id"].as_i64().unwrap();
                let version = data["aggregate_version"].as_i64().unwrap();
                {
                    let mut busy = b.lock().unwrap();
                    let n = busy.entry(order).or_default();
                    *n += 1;
                    o.fetch_max(*n, Ordering::SeqCst);
                }
                // Long enough for a second request of the same order to overlap, if sent.
                tokio::time::sleep(Duration::from_millis(30)).await;
                let status = {
                    let mut refused = r.lock().unwrap();
                    let n = refused.entry(order).or_default();
                    if version == 2 && *n < 3 {
                        *n += 1;
                        500
                    } else {
                        200
                    }
                };
                l.lock().unwrap().push((order, version, status));
                *b.lock().unwrap().get_mut(&order).unwrap() -= 1;
                StatusCode::from_u16(status).unwrap()
            }
        }),
    );
    tokio::spawn(async move { axum::serve(listener, receiver).await });
    let resp = create_endpoint(
        &app.a,
        json!({"url": url, "event_types": ["order.*"], "fifo_per_aggregate": true}),
    )
    .await;
    assert_eq!(resp.status(), 201);
    let endpoint: Value = resp.json().await.unwrap();
    assert_eq!(endpoint["fifo_per_aggregate"], true, "{endpoint}");
    let customer = app.customer(&app.a).await;
    let mut orders: Vec<(i64, i64)> = Vec::new();
    for i in 0..3 {
        let body =
            json!({"customer_id": customer, "amount": format!("{}.00", i + 1), "currency": "EUR"});
        let resp = app.post_order_raw(&app.a, body.to_string()).await;
        assert_eq!(resp.status(), 201);
        let order: Value = resp.json().await.unwrap();
        orders.push((order["id"].as_i64().unwrap(), 1));
    }
    for round in 0..3 {
        for (id, version) in &mut orders {
            let resp = app
                .a
                .request(reqwest::Method::PATCH, &format!("/api/orders/{id}"))
                .json(&json!({"description": format!("revision {round}"), "version": *version}))
                .send()
                .await
                .unwrap();
            assert_eq!(resp.status(), 200);
            *version = resp.json::<Value>().await.unwrap()["version"]
                .as_i64()
                .unwrap();
        }
    }
    // Every order's four versions answered 200.
    let delivered = || {
        let log = log.lock().unwrap();
        log.iter().filter(|(_, _, status)| *status == 200).count()
    };
    for _ in 0..300 {
        if delivered() == 12 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let log = log.lock().unwrap().clone();
    assert_eq!(delivered(), 12, "{log:?}");
    assert_eq!(
        overlap.load(Ordering::SeqCst),
        1,
        "two requests of one order at once"
    );
    for (order, _) in &orders {
        let seen: Vec<(i64, u16)> = log
            .iter()
            .filter(|(o, _, _)| o == order)
            .map(|(_, v, s)| (*v, *s))
            .collect();
        assert_eq!(
            seen,
            vec![
                (1, 200),
                (2, 500),
                (2, 500),
                (2, 500),
                (2, 200),
                (3, 200),
                (4, 200)
            ],
            "order {order}"
        );
    }
    // The flag can be turned off again, like any other field.
    let id = endpoint["id"].as_i64().unwrap();
    let resp = app
        .a
        .request(
            reqwest::Method::PATCH,
            &format!("/api/webhook_endpoints/{id}"),
        )
        .json(&json!({"fifo_per_aggregate": false}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(
        resp.json::<Value>().await.unwrap()["fifo_per_aggregate"],
        false
    );
    app.stop().await;
}

/// Endpoints: SSRF refusals at creation (checklist 28), masked secrets (A9), tenant scope,
/// filters (B17), rotation with both signatures (A8), redelivery with the same id, and a
/// 410 disabling the endpoint (B19).
pub async fn webhook_endpoints_are_guarded_scoped_and_rotate(app: &TestApp) {
    let app = webhook_app(app).await;
    for url in [
        "http://10.1.2.3/x",
        "http://169.254.169.254/latest/meta-data",
        "http://[::1]/x",
        "http://[::ffff:10.0.0.1]/x",
        "http://100.64.0.1/x",
        "ftp://example.com/x",
        "http://user:pw@127.0.0.1/x",
        "not a url",
    ] {
        let resp = create_endpoint(&app.a, json!({"url": url})).await;
        let body = error_body(resp, 422, "validation_failed").await;
        assert_eq!(body["details"][0]["field"], "url", "{url}: {body}");
    }
    let resp = create_endpoint(
        &app.a,
        json!({"url": "https://example.com/x", "event_types": ["order.*", "bad type"]}),
    )
    .await;
    error_body(resp, 422, "validation_failed").await;

    let receiver = Receiver::start(200).await;
    let resp = create_endpoint(
        &app.a,
        json!({"url": receiver.url, "event_types": ["order.*"]}),
    )
    .await;
    assert_eq!(resp.status(), 201);
    let created: Value = resp.json().await.unwrap();
    let id = created["id"].as_i64().unwrap();
    let old_secret = created["secret"].as_str().unwrap().to_owned();
    let path = format!("/api/webhook_endpoints/{id}");
    let got: Value = call_json(&app.a, reqwest::Method::GET, &path).await;
    let masked = got["secret"].as_str().unwrap();
    assert_ne!(masked, old_secret);
    assert!(
        masked.starts_with("whsec_") && masked.len() < 16,
        "{masked}"
    );
    let other = app
        .b
        .request(reqwest::Method::GET, &path)
        .send()
        .await
        .unwrap();
    error_body(other, 404, "resource_not_found").await;

    // A customer event is filtered out; an order event arrives, signed with the one secret.
    let customer = app.customer(&app.a).await;
    let order = json!({"customer_id": customer, "amount": "1.00", "currency": "EUR"});
    assert_eq!(
        app.post_order_raw(&app.a, order.to_string()).await.status(),
        201
    );
    wait_for("the order event", || !receiver.received().is_empty()).await;
    let first = receiver.received()[0].clone();
    let payload: Value = serde_json::from_slice(&first.body).unwrap();
    assert_eq!(payload["type"], "order.created");
    assert_eq!(
        first.headers["webhook-signature"]
            .to_str()
            .unwrap()
            .split(' ')
            .count(),
        1
    );

    // Rotation: both signatures, either secret verifies.
    let rotate = format!("/api/webhook_endpoints/{id}/rotate_secret");
    let rotated: Value = call_json(&app.a, reqwest::Method::POST, &rotate).await;
    let new_secret = rotated["secret"].as_str().unwrap().to_owned();
    assert_ne!(new_secret, old_secret);
    assert!(rotated["previous_secret_expires_at"].is_string());
    let redeliver = format!("/api/webhook_endpoints/{id}/redeliver");
    let event_id = payload["id"].as_str().unwrap();
    let resp = app
        .a
        .request(reqwest::Method::POST, &redeliver)
        .json(&json!({"event_id": event_id}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 202);
    wait_for("the redelivery", || receiver.received().len() >= 2).await;
    let again = receiver.received()[1].clone();
    assert_eq!(again.headers["webhook-id"], event_id);
    assert_eq!(again.body, first.body);
    assert_eq!(
        again.headers["webhook-signature"]
            .to_str()
            .unwrap()
            .split(' ')
            .count(),
        2
    );
    assert!(again.headers.contains_key("x-webhook-signature-previous"));
    for secret in [&old_secret, &new_secret] {
        let v = Verifier::new([secret.as_str()]).unwrap();
        v.verify(&again.headers, &again.body, now_secs()).unwrap();
        v.verify_hex(&again.headers, &again.body).unwrap();
    }

    // Asked again while an attempt is in flight (the receiver now takes a second to answer,
    // so that attempt has reached it but is not recorded), the redelivery waits for the
    // attempt to be recorded and then queues: one more arrival, not none.
    receiver.delay_ms.store(1_000, Ordering::SeqCst);
    let again_please = || {
        app.a
            .request(reqwest::Method::POST, &redeliver)
            .json(&json!({"event_id": event_id}))
            .send()
    };
    assert_eq!(again_please().await.unwrap().status(), 202);
    let deliveries = format!("/api/webhook_endpoints/{id}/deliveries?limit=100");
    wait_json(&app.a, &deliveries, "the attempt in flight", |v| {
        v["data"][0]["state"] == "in_flight"
    })
    .await;
    let queued: Value = again_please().await.unwrap().json().await.unwrap();
    assert_ne!(queued["state"], "in_flight", "{queued}");
    wait_for("the redelivery after the one in flight", || {
        receiver.received().len() >= 4
    })
    .await;
    receiver.delay_ms.store(0, Ordering::SeqCst);

    // The `order.*` filter held: no customer event ever reached this endpoint.
    for r in receiver.received() {
        let payload: Value = serde_json::from_slice(&r.body).unwrap();
        assert_eq!(payload["type"], "order.created", "{payload}");
    }

    // 410 Gone disables the endpoint.
    receiver.status.store(410, Ordering::SeqCst);
    assert_eq!(
        app.post_order_raw(&app.a, order.to_string()).await.status(),
        201
    );
    wait_for("the 410", || receiver.received().len() >= 3).await;
    let mut disabled = Value::Null;
    for _ in 0..100 {
        disabled = call_json(&app.a, reqwest::Method::GET, &path).await;
        if disabled["enabled"] == json!(false) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(disabled["enabled"], json!(false), "{disabled}");
    assert_eq!(disabled["disabled_reason"], "gone");
    let resp = app
        .a
        .request(reqwest::Method::DELETE, &path)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 204);
    app.stop().await;
}

/// Creates a customer and `orders` orders for it: `1 + orders` events.
async fn produce(app: &TestApp, orders: usize) {
    let customer = app.customer(&app.a).await;
    for i in 0..orders {
        let body =
            json!({"customer_id": customer, "amount": format!("{}.00", i + 1), "currency": "EUR"});
        let resp = app.post_order_raw(&app.a, body.to_string()).await;
        assert_eq!(resp.status(), 201);
    }
}

/// Polls `GET path` until `done` holds for its JSON, which it returns.
async fn wait_json(
    client: &Client,
    path: &str,
    what: &str,
    done: impl Fn(&Value) -> bool,
) -> Value {
    for _ in 0..600 {
        let v = call_json(client, reqwest::Method::GET, path).await;
        if done(&v) {
            return v;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("timed out waiting for {what}");
}

/// Event bodies of the given type, through the events API.
async fn events_of_type(client: &Client, event_type: &str) -> Vec<Value> {
    let page = call_json(
        client,
        reqwest::Method::GET,
        &format!("/api/events?limit=100&types={event_type}"),
    )
    .await;
    page["data"].as_array().unwrap().clone()
}

/// Milliseconds from the server's now to an RFC 3339 time it rendered.
fn millis_until(app: &TestApp, rfc3339: &str) -> i64 {
    let at = chrono::DateTime::parse_from_rfc3339(rfc3339).unwrap();
    at.timestamp_millis() - app.state.clock.now().0
}

/// Spec checklist 24 (and 10's fast path): five failures in a row open the circuit; while it
/// is open the receiver gets nothing and no attempt is spent; after the cooldown exactly one
/// probe; once a probe succeeds the backlog drains at once, never more than the endpoint's
/// `max_concurrency` in flight (measured by the receiver).
pub async fn the_circuit_breaker_holds_back_probes_and_drains(app: &TestApp) {
    let app = webhook_app_with(app, |c| c.webhooks.circuit_cooldown_secs = 3).await;
    let receiver = Receiver::start(503).await;
    let resp = create_endpoint(
        &app.a,
        json!({"url": receiver.url, "event_types": ["*"], "max_concurrency": 2}),
    )
    .await;
    assert_eq!(resp.status(), 201);
    let created: Value = resp.json().await.unwrap();
    assert_eq!(created["max_concurrency"], 2);
    assert_eq!(created["circuit_state"], "closed");
    let id = created["id"].as_i64().unwrap();
    let path = format!("/api/webhook_endpoints/{id}");
    produce(&app, 9).await;
    let open = wait_json(&app.a, &path, "the circuit to open", |e| {
        e["circuit_state"] == "open"
    })
    .await;
    assert!(open["consecutive_failures"].as_i64() >= Some(5), "{open}");
    assert!(open["first_failure_at"].is_string(), "{open}");
    let until = open["circuit_open_until"].as_str().unwrap().to_owned();
    // Attempts that were in flight when it opened finish; then, until the cooldown ends,
    // nothing reaches the receiver and no delivery's attempt count moves.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let deliveries = format!("/api/webhook_endpoints/{id}/deliveries?limit=100");
    let counts = |page: &Value| -> Vec<(i64, i64)> {
        let mut c: Vec<_> = page["data"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| {
                (
                    d["id"].as_i64().unwrap(),
                    d["attempt_count"].as_i64().unwrap(),
                )
            })
            .collect();
        c.sort();
        c
    };
    let before = call_json(&app.a, reqwest::Method::GET, &deliveries).await;
    assert_eq!(before["data"].as_array().unwrap().len(), 10);
    let sent = receiver.received().len();
    let window = millis_until(&app, &until) - 300;
    assert!(
        window > 1_000,
        "the open window is mostly left: {window} ms"
    );
    tokio::time::sleep(Duration::from_millis(window as u64)).await;
    assert_eq!(
        receiver.received().len(),
        sent,
        "requests while the circuit was open"
    );
    let after = call_json(&app.a, reqwest::Method::GET, &deliveries).await;
    assert_eq!(counts(&after), counts(&before), "attempts spent while open");
    // After the cooldown: exactly one probe. It fails, and the circuit opens again.
    wait_for("the probe", || receiver.received().len() > sent).await;
    let reopened = wait_json(&app.a, &path, "the circuit to reopen", |e| {
        e["circuit_state"] == "open" && e["circuit_open_until"].as_str() != Some(until.as_str())
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(receiver.received().len(), sent + 1, "one probe, not more");
    // The receiver recovers (and answers slowly, so deliveries overlap): the next probe
    // succeeds, and the whole backlog follows at once, two at a time at most.
    receiver.status.store(200, Ordering::SeqCst);
    receiver.delay_ms.store(200, Ordering::SeqCst);
    receiver.peak.store(0, Ordering::SeqCst);
    let until = reopened["circuit_open_until"].as_str().unwrap();
    assert!(millis_until(&app, until) > 0);
    let delivered = wait_json(&app.a, &deliveries, "the backlog to drain", |page| {
        page["data"]
            .as_array()
            .unwrap()
            .iter()
            .all(|d| d["state"] == "succeeded")
    })
    .await;
    assert_eq!(delivered["data"].as_array().unwrap().len(), 10);
    let peak = receiver.peak.load(Ordering::SeqCst);
    assert!(
        (1..=2).contains(&peak),
        "{peak} requests at once; max_concurrency is 2"
    );
    let closed = call_json(&app.a, reqwest::Method::GET, &path).await;
    assert_eq!(closed["circuit_state"], "closed", "{closed}");
    assert_eq!(closed["consecutive_failures"], 0);
    assert!(closed["first_failure_at"].is_null());
    // Every event arrived once with a 200, and nothing about the endpoint reached it.
    let ok: Vec<String> = receiver
        .received()
        .iter()
        .filter(|r| r.answered == 200)
        .map(|r| r.headers["webhook-id"].to_str().unwrap().to_owned())
        .collect();
    let distinct: BTreeSet<_> = ok.iter().cloned().collect();
    assert_eq!((ok.len(), distinct.len()), (10, 10));
    for r in receiver.received() {
        let payload: Value = serde_json::from_slice(&r.body).unwrap();
        assert!(
            !payload["type"].as_str().unwrap().starts_with("webhook."),
            "{payload}"
        );
    }
    app.stop().await;
}

/// Spec checklist 23 and the operational events of §2.2: an endpoint that fails for longer
/// than `disable_after` is disabled (`failing`); `webhook.delivery.failing` and
/// `webhook.endpoint.disabled` are in the events API and reach another endpoint subscribed to
/// `*`, never the failing one; the disabled endpoint gets nothing more.
pub async fn a_failing_endpoint_is_disabled_with_an_event(app: &TestApp) {
    // Attempts about a second apart, then 4 s before the fifth: the fourth (and the failing
    // event) comes well within `disable_after`, the fifth well past it.
    let app = webhook_app_with(app, |c| {
        c.webhooks.schedule_secs = vec![1, 1, 1, 4, 1, 1, 1, 1, 1];
        c.webhooks.disable_after_secs = 5;
        c.webhooks.circuit_failure_threshold = 100;
    })
    .await;
    let failing = Receiver::start(500).await;
    let watcher = Receiver::start(200).await;
    let resp = create_endpoint(&app.a, json!({"url": failing.url, "event_types": ["*"]})).await;
    let id = resp.json::<Value>().await.unwrap()["id"].as_i64().unwrap();
    let resp = create_endpoint(
        &app.a,
        json!({"url": watcher.url, "event_types": ["webhook.*"]}),
    )
    .await;
    assert_eq!(resp.status(), 201);
    produce(&app, 0).await;
    let path = format!("/api/webhook_endpoints/{id}");
    let disabled = wait_json(&app.a, &path, "the endpoint to be disabled", |e| {
        e["enabled"] == json!(false)
    })
    .await;
    assert_eq!(disabled["disabled_reason"], "failing", "{disabled}");
    // In the event log (once the relay sequenced it), once each, with the endpoint's account.
    let listed = "/api/events?limit=100&types=webhook.endpoint.disabled";
    wait_json(&app.a, listed, "the disabled event", |page| {
        !page["data"].as_array().unwrap().is_empty()
    })
    .await;
    let gone = events_of_type(&app.a, "webhook.endpoint.disabled").await;
    assert_eq!(gone.len(), 1, "{gone:?}");
    let object = &gone[0]["data"]["object"];
    assert_eq!(object["id"], id);
    assert_eq!(object["disabled_reason"], "failing");
    assert_eq!(object["enabled"], false);
    assert_eq!(gone[0]["data"]["aggregate_type"], "webhook_endpoint");
    let failing_events = events_of_type(&app.a, "webhook.delivery.failing").await;
    assert_eq!(failing_events.len(), 1, "{failing_events:?}");
    assert_eq!(failing_events[0]["data"]["object"]["endpoint_id"], id);
    assert_eq!(failing_events[0]["data"]["object"]["attempt_count"], 4);
    let other = call_json(
        &app.b,
        reqwest::Method::GET,
        "/api/events?types=webhook.endpoint.disabled",
    )
    .await;
    assert_eq!(
        other["data"].as_array().unwrap().len(),
        0,
        "another account sees nothing"
    );
    // The other endpoint gets both by webhook; the failing one never gets one about itself.
    let want: BTreeSet<String> = [&gone[0], &failing_events[0]]
        .iter()
        .map(|e| e["id"].as_str().unwrap().to_owned())
        .collect();
    wait_for("the operational webhooks", || {
        let got: BTreeSet<String> = watcher
            .received()
            .iter()
            .map(|r| r.headers["webhook-id"].to_str().unwrap().to_owned())
            .collect();
        got == want
    })
    .await;
    let sent = failing.received().len();
    assert!(sent >= 4, "{sent}");
    for r in failing.received() {
        let payload: Value = serde_json::from_slice(&r.body).unwrap();
        assert_eq!(payload["type"], "customer.created", "{payload}");
    }
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    assert_eq!(
        failing.received().len(),
        sent,
        "a disabled endpoint gets nothing"
    );
    // Enabled again: healthy, and its paused delivery goes out.
    failing.status.store(200, Ordering::SeqCst);
    let resp = app
        .a
        .request(reqwest::Method::PATCH, &path)
        .json(&json!({"enabled": true}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let enabled: Value = resp.json().await.unwrap();
    assert_eq!(
        (
            &enabled["disabled_reason"],
            &enabled["first_failure_at"],
            &enabled["circuit_state"]
        ),
        (&Value::Null, &Value::Null, &json!("closed"))
    );
    wait_for("the paused delivery", || {
        failing.received().iter().any(|r| r.answered == 200)
    })
    .await;
    app.stop().await;
}

/// Spec checklist 27: a replay answers 202 with a job that can be fetched, resends the
/// endpoint's events with their original `webhook-id` and identical bodies, queues nothing
/// twice, and reaches events an endpoint never had.
pub async fn replay_resends_the_same_events(app: &TestApp) {
    let app = webhook_app(app).await;
    let receiver = Receiver::start(200).await;
    let resp = create_endpoint(&app.a, json!({"url": receiver.url, "event_types": ["*"]})).await;
    let id = resp.json::<Value>().await.unwrap()["id"].as_i64().unwrap();
    produce(&app, 2).await;
    let deliveries = format!("/api/webhook_endpoints/{id}/deliveries?limit=100");
    let all_succeeded = |page: &Value| {
        let data = page["data"].as_array().unwrap();
        data.len() == 3 && data.iter().all(|d| d["state"] == "succeeded")
    };
    wait_json(&app.a, &deliveries, "the first deliveries", all_succeeded).await;
    let since = bursar_domain::Timestamp(app.state.clock.now().0 - 3_600_000).rfc3339();
    let replay = |endpoint: i64, body: Value| {
        let a = app.a.clone();
        async move {
            a.request(
                reqwest::Method::POST,
                &format!("/api/webhook_endpoints/{endpoint}/replay"),
            )
            .json(&body)
            .send()
            .await
            .unwrap()
        }
    };
    // Everything was delivered: without include_succeeded nothing goes out again.
    let resp = replay(id, json!({"since": since})).await;
    assert_eq!(resp.status(), 202);
    let r: Value = resp.json().await.unwrap();
    assert_eq!(
        (
            &r["events_matched"],
            &r["deliveries_requeued"],
            &r["deliveries_created"]
        ),
        (&json!(3), &json!(0), &json!(0)),
        "{r}"
    );
    assert_eq!(
        (&r["status"], &r["max_events"], &r["capped"]),
        (&json!("completed"), &json!(10_000), &json!(false))
    );
    // With it, all three again, byte for byte, with their ids.
    let resp = replay(id, json!({"since": since, "include_succeeded": true})).await;
    assert_eq!(resp.status(), 202);
    let location = resp.headers()["location"].to_str().unwrap().to_owned();
    let r: Value = resp.json().await.unwrap();
    assert_eq!(r["deliveries_requeued"], 3, "{r}");
    assert_eq!(
        location,
        format!("/api/webhook_endpoints/{id}/replays/{}", r["id"])
    );
    let fetched = call_json(&app.a, reqwest::Method::GET, &location).await;
    assert_eq!(fetched, r);
    let foreign = app
        .b
        .request(reqwest::Method::GET, &location)
        .send()
        .await
        .unwrap();
    error_body(foreign, 404, "resource_not_found").await;
    wait_json(
        &app.a,
        &deliveries,
        "the replayed deliveries",
        all_succeeded,
    )
    .await;
    assert_eq!(receiver.received().len(), 6);
    let mut by_id: BTreeMap<String, Vec<Bytes>> = BTreeMap::new();
    for r in receiver.received() {
        let id = r.headers["webhook-id"].to_str().unwrap().to_owned();
        let payload: Value = serde_json::from_slice(&r.body).unwrap();
        assert_eq!(payload["id"], id.as_str());
        by_id.entry(id).or_default().push(r.body);
    }
    assert_eq!(by_id.len(), 3);
    for (id, bodies) in &by_id {
        assert_eq!(bodies.len(), 2, "{id}");
        assert_eq!(bodies[0], bodies[1], "{id} was re-serialised");
    }
    // Replaying while they are queued queues nothing twice.
    receiver.status.store(503, Ordering::SeqCst);
    let resp = replay(id, json!({"since": since, "include_succeeded": true})).await;
    assert_eq!(
        resp.json::<Value>().await.unwrap()["deliveries_requeued"],
        3
    );
    let resp = replay(id, json!({"since": since, "include_succeeded": true})).await;
    let r: Value = resp.json().await.unwrap();
    assert_eq!(
        (&r["deliveries_requeued"], &r["deliveries_created"]),
        (&json!(0), &json!(0))
    );
    let page = call_json(&app.a, reqwest::Method::GET, &deliveries).await;
    assert_eq!(
        page["data"].as_array().unwrap().len(),
        3,
        "one delivery per event"
    );
    // An endpoint created afterwards never had these events: a replay brings them, with the
    // same ids and bodies.
    let late = Receiver::start(200).await;
    let resp = create_endpoint(&app.a, json!({"url": late.url, "event_types": ["order.*"]})).await;
    let late_id = resp.json::<Value>().await.unwrap()["id"].as_i64().unwrap();
    let r: Value = replay(late_id, json!({"since": since}))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(
        (&r["events_matched"], &r["deliveries_created"]),
        (&json!(2), &json!(2)),
        "{r}"
    );
    wait_for("the late endpoint's deliveries", || {
        late.received().len() == 2
    })
    .await;
    for r in late.received() {
        let id = r.headers["webhook-id"].to_str().unwrap();
        assert_eq!(by_id[id][0], r.body);
    }
    // Bad requests.
    for (body, field) in [
        (json!({"since": "yesterday"}), "since"),
        (json!({"since": since, "until": since}), "until"),
    ] {
        let resp = replay(id, body).await;
        let e = error_body(resp, 422, "validation_failed").await;
        assert_eq!(e["details"][0]["field"], field, "{e}");
    }
    let resp = replay(id, json!({"since": since, "extra": 1})).await;
    assert!(resp.status().is_client_error());
    let foreign = app
        .b
        .request(
            reqwest::Method::POST,
            &format!("/api/webhook_endpoints/{id}/replay"),
        )
        .json(&json!({"since": since}))
        .send()
        .await
        .unwrap();
    error_body(foreign, 404, "resource_not_found").await;
    app.stop().await;
}

/// Checklist 19, 20 and 30: a 3xx is a failure and its `Location` is never requested; a
/// receiver slower than the timeout is recorded as `timeout` and retried no sooner than the
/// overload floor; a 10 MB answer is kept as a snippet of at most 16 KiB.
pub async fn answers_are_classified_and_capped(app: &TestApp) {
    let app = webhook_app_with(app, |c| {
        c.webhooks.timeout_ms = 500;
        c.webhooks.overload_floor_secs = 60;
    })
    .await;
    let followed = Arc::new(AtomicU64::new(0));
    let f = followed.clone();
    let router = axum::Router::new()
        .route(
            "/redirect",
            axum::routing::post(|| async {
                (
                    StatusCode::FOUND,
                    [(axum::http::header::LOCATION, "/target")],
                )
            }),
        )
        .route(
            "/target",
            axum::routing::post(move || {
                f.fetch_add(1, Ordering::SeqCst);
                async { StatusCode::OK }
            }),
        )
        .route(
            "/big",
            axum::routing::post(|| async { "x".repeat(10 * 1024 * 1024) }),
        )
        .route(
            "/slow",
            axum::routing::post(|| async {
                tokio::time::sleep(Duration::from_secs(3)).await;
                StatusCode::OK
            }),
        );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, router).await });
    let mut ids = BTreeMap::new();
    for path in ["redirect", "big", "slow"] {
        let resp = create_endpoint(
            &app.a,
            json!({"url": format!("{base}/{path}"), "event_types": ["customer.*"]}),
        )
        .await;
        assert_eq!(resp.status(), 201);
        let e: Value = resp.json().await.unwrap();
        ids.insert(path, e["id"].as_i64().unwrap());
    }
    app.customer(&app.a).await;
    let attempts = |id: i64| {
        let client = app.a.clone();
        async move {
            let path = format!("/api/webhook_endpoints/{id}/attempts");
            call_json(&client, reqwest::Method::GET, &path).await["data"]
                .as_array()
                .unwrap()
                .clone()
        }
    };
    let mut first = BTreeMap::new();
    for _ in 0..300 {
        for (path, id) in &ids {
            if let Some(a) = attempts(*id).await.last() {
                first.entry(*path).or_insert_with(|| a.clone());
            }
        }
        if first.len() == 3 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(first.len(), 3, "{first:?}");
    // 3xx: a failure, recorded with its status; the redirect is not followed, also by retries.
    assert_eq!(first["redirect"]["status_code"], 302, "{first:?}");
    assert_eq!(first["redirect"]["error_kind"], "http_status");
    // A 10 MB answer: success, and at most 16 KiB of it is kept.
    assert_eq!(first["big"]["status_code"], 200);
    let snippet = first["big"]["response_snippet"].as_str().unwrap();
    assert!(
        !snippet.is_empty() && snippet.len() <= 16 * 1024,
        "{}",
        snippet.len()
    );
    // Slower than the timeout: `timeout`, cut off near the limit, no status.
    assert_eq!(first["slow"]["error_kind"], "timeout", "{first:?}");
    assert!(first["slow"]["status_code"].is_null());
    let took = first["slow"]["duration_ms"].as_i64().unwrap();
    assert!((450..2_000).contains(&took), "{took} ms");
    let time = |v: &Value| {
        chrono::DateTime::parse_from_rfc3339(v.as_str().unwrap())
            .unwrap()
            .timestamp_millis()
    };
    let slow = deliveries(&app, &json!({"id": ids["slow"]})).await;
    let wait = time(&slow[0]["next_attempt_at"]) - time(&first["slow"]["created_at"]);
    assert!(
        wait >= 59_000,
        "retried after {wait} ms, under the overload floor"
    );
    // The redirect's retry (after about a second) does not follow it either.
    for _ in 0..100 {
        if attempts(ids["redirect"]).await.len() >= 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(attempts(ids["redirect"]).await.len() >= 2, "retried");
    assert_eq!(
        followed.load(Ordering::SeqCst),
        0,
        "the Location was requested"
    );
    // The attempts log pages by attempt id, newest first.
    let page = |after: Option<i64>| {
        let client = app.a.clone();
        let base = format!(
            "/api/webhook_endpoints/{}/attempts?limit=1",
            ids["redirect"]
        );
        async move {
            let path = match after {
                Some(id) => format!("{base}&starting_after={id}"),
                None => base,
            };
            call_json(&client, reqwest::Method::GET, &path).await
        }
    };
    let newest = page(None).await;
    assert_eq!(newest["has_more"], true, "{newest}");
    let cursor = newest["data"][0]["id"].as_i64().unwrap();
    let older = page(Some(cursor)).await;
    let older_id = older["data"][0]["id"].as_i64().unwrap();
    assert!(older_id < cursor, "{older}");
    assert!(older["data"][0]["attempt_no"].as_i64() < newest["data"][0]["attempt_no"].as_i64());
    app.stop().await;
}

/// Checklist 8, second point: once the rotation grace is over, only the new secret signs; a
/// receiver still holding the old one can no longer verify.
pub async fn a_rotated_secret_stops_signing_after_its_grace(app: &TestApp) {
    let app = webhook_app_with(app, |c| c.webhooks.rotation_grace_secs = 1).await;
    let receiver = Receiver::start(200).await;
    let endpoint = endpoint_at(&app, &receiver, json!(["customer.*"])).await;
    let old_secret = endpoint["secret"].as_str().unwrap().to_owned();
    let id = endpoint["id"].as_i64().unwrap();
    let rotate = format!("/api/webhook_endpoints/{id}/rotate_secret");
    let rotated: Value = call_json(&app.a, reqwest::Method::POST, &rotate).await;
    let new_secret = rotated["secret"].as_str().unwrap().to_owned();
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    app.customer(&app.a).await;
    wait_for("the delivery", || !receiver.received().is_empty()).await;
    let got = receiver.received()[0].clone();
    let signatures = got.headers["webhook-signature"].to_str().unwrap();
    assert_eq!(signatures.split(' ').count(), 1, "{signatures}");
    assert!(!got.headers.contains_key("x-webhook-signature-previous"));
    let new = Verifier::new([new_secret.as_str()]).unwrap();
    new.verify(&got.headers, &got.body, now_secs()).unwrap();
    new.verify_hex(&got.headers, &got.body).unwrap();
    let old = Verifier::new([old_secret.as_str()]).unwrap();
    assert!(old.verify(&got.headers, &got.body, now_secs()).is_err());
    assert!(old.verify_hex(&got.headers, &got.body).is_err());
    app.stop().await;
}

/// Checklist 31: shutting down with 20 deliveries in flight hands their leases back, so the
/// next process sends them at once instead of after the 90 s lease; none is lost.
pub async fn shutdown_hands_back_in_flight_deliveries(app: &TestApp) {
    let app = webhook_app_with(app, |c| c.http.shutdown_grace_ms = 300).await;
    assert_eq!(app.state.config.webhooks.lease_secs, 90);
    let slow = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let arrived = Arc::new(AtomicU64::new(0));
    let answered: Arc<Mutex<BTreeSet<String>>> = Arc::default();
    let (s, n, ok) = (slow.clone(), arrived.clone(), answered.clone());
    let router = axum::Router::new().route(
        "/hooks",
        axum::routing::post(move |headers: HeaderMap| {
            let (s, n, ok) = (s.clone(), n.clone(), ok.clone());
            async move {
                n.fetch_add(1, Ordering::SeqCst);
                if s.load(Ordering::SeqCst) {
                    tokio::time::sleep(Duration::from_secs(30)).await;
                }
                let id = headers["webhook-id"].to_str().unwrap().to_owned();
                ok.lock().unwrap().insert(id);
                StatusCode::OK
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/hooks", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, router).await });
    let resp = create_endpoint(
        &app.a,
        json!({"url": url, "event_types": ["customer.*"], "max_concurrency": 20}),
    )
    .await;
    assert_eq!(resp.status(), 201);
    let endpoint: Value = resp.json().await.unwrap();
    for _ in 0..20 {
        app.customer(&app.a).await;
    }
    wait_for("20 deliveries in flight", || {
        arrived.load(Ordering::SeqCst) >= 20
    })
    .await;
    slow.store(false, Ordering::SeqCst);
    // Stop (the sends cannot finish within the 300 ms grace) and start again.
    let app = app.restart().await;
    let mut data = Vec::new();
    for _ in 0..300 {
        data = deliveries(&app, &endpoint).await;
        if data.len() == 20 && data.iter().all(|d| d["state"] == "succeeded") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(data.len(), 20);
    for d in &data {
        assert_eq!(d["state"], "succeeded", "{d}");
        assert_eq!(
            d["attempt_count"], 2,
            "the handed-back send, then the resend: {d}"
        );
    }
    assert_eq!(answered.lock().unwrap().len(), 20);
    app.stop().await;
}

/// Attempts name what failed: an `https://` URL answered by a plain-HTTP server is `tls`; a
/// refused connection is `connect`, even when its URL happens to contain "tls".
pub async fn tls_failures_are_told_from_refused_connections(app: &TestApp) {
    let app = webhook_app(app).await;
    let plain = Receiver::start(200).await;
    let https_url = plain.url.replacen("http://", "https://", 1);
    let refused = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        format!("http://{}/tls/certificate", l.local_addr().unwrap())
    };
    let mut ids = Vec::new();
    for url in [&https_url, &refused] {
        let resp =
            create_endpoint(&app.a, json!({"url": url, "event_types": ["customer.*"]})).await;
        assert_eq!(resp.status(), 201);
        ids.push(resp.json::<Value>().await.unwrap()["id"].as_i64().unwrap());
    }
    app.customer(&app.a).await;
    let mut kinds = Vec::new();
    for _ in 0..200 {
        kinds.clear();
        for id in &ids {
            let path = format!("/api/webhook_endpoints/{id}/attempts");
            let page = call_json(&app.a, reqwest::Method::GET, &path).await;
            kinds.push(page["data"][0]["error_kind"].clone());
        }
        if kinds.iter().all(|k| !k.is_null()) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(kinds, vec![json!("tls"), json!("connect")]);
    app.stop().await;
}

/// Checklist 33 in a running server: with a retention of 0 days and the purge every second,
/// delivered deliveries leave the delivery log (their attempts with them) soon after they
/// succeed, while the events stay in the log.
pub async fn delivered_deliveries_are_purged_after_retention(app: &TestApp) {
    let app = webhook_app_with(app, |c| {
        c.webhooks.retention_days = 0;
        c.webhooks.purge_interval_secs = 1;
    })
    .await;
    let receiver = Receiver::start(200).await;
    let endpoint = endpoint_at(&app, &receiver, json!(["order.*"])).await;
    produce(&app, 3).await;
    wait_for("three deliveries", || receiver.received().len() >= 3).await;
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    while !deliveries(&app, &endpoint).await.is_empty() {
        assert!(
            std::time::Instant::now() < deadline,
            "still listed: {:?}",
            deliveries(&app, &endpoint).await
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let id = endpoint["id"].as_i64().unwrap();
    let path = format!("/api/webhook_endpoints/{id}/attempts?limit=100");
    let attempts: Value = call_json(&app.a, reqwest::Method::GET, &path).await;
    assert_eq!(
        attempts["data"].as_array().map(Vec::len),
        Some(0),
        "{attempts}"
    );
    assert_eq!(events_of_type(&app.a, "order.created").await.len(), 3);
    app.stop().await;
}

/// A write wakes this process's relay: with the poll an hour long, a created customer's event
/// is still sequenced (and listed by the events API) right after the create, not an hour later.
/// Two creates, each awaited until listed: the relay's first pass, at start, may find the
/// first one, but the second is made after a pass and can only be found by a wake-up.
pub async fn a_write_wakes_the_relay_before_its_poll(app: &TestApp) {
    let (mut config, dir) = crate::harness::test_config(app.backend).unwrap();
    config.webhooks.poll_interval_ms = 3_600_000;
    let slow = TestApp::start_with(
        app.backend,
        config,
        dir,
        Arc::new(SystemClock),
        bursar_server::services::operations::Operations::default(),
    )
    .await;
    for n in 1..=2 {
        slow.customer(&slow.a).await;
        let mut listed = Vec::new();
        for _ in 0..100 {
            listed = all_event_ids(&slow.a, "customer.created").await;
            if listed.len() == n {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(listed.len(), n, "the relay was not woken by create {n}");
    }
    slow.stop().await;
}
