//! Several delivery workers on one database (spec checklist B15 on PostgreSQL, B16 on
//! SQLite): thousands of due deliveries, half the workers sharing the server's store (tokio
//! workers of one process) and half with a store of their own (as other processes would have),
//! against a healthy receiver that counts every copy and watches for two copies of one
//! delivery in flight at once.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use bursar_server::webhooks::{relay, worker};
use bursar_server::{AppState, Config, SystemClock};
use bursar_storage::PageRequest;
use bursar_storage::events::state as delivery;
use serde_json::{Value, json};

use crate::harness::{Backend, TestApp};

/// (endpoint tag, webhook-id).
type Key = (String, String);

/// What the receiver saw.
#[derive(Default)]
struct Seen {
    /// Copies received per delivery.
    copies: Mutex<HashMap<Key, usize>>,
    /// Deliveries being received right now.
    in_flight: Mutex<HashSet<Key>>,
    /// Times a copy arrived while another copy of the same delivery was in flight.
    overlaps: AtomicUsize,
    /// `X-Bursar-Delivery-Id` of every request (one per attempt).
    attempt_ids: Mutex<Vec<String>>,
    requests: AtomicUsize,
    /// Requests being answered now, and the most there ever were at once.
    open: AtomicUsize,
    peak: AtomicUsize,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap()
}

/// A healthy receiver at `<base>/<tag>`: answers 200 after a pause (so that a second copy sent
/// concurrently would overlap the first, and so that the sends of workers that run side by side
/// overlap even where the database, not the receiver, sets the pace: SQLite).
async fn receiver() -> (String, Arc<Seen>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}/hooks", listener.local_addr().unwrap());
    let seen = Arc::new(Seen::default());
    let app = axum::Router::new()
        .route(
            "/hooks/{tag}",
            axum::routing::post(
                |State(seen): State<Arc<Seen>>, Path(tag): Path<String>, headers: HeaderMap| async move {
                    let header = |name: &str| {
                        headers
                            .get(name)
                            .and_then(|v| v.to_str().ok())
                            .unwrap_or_default()
                            .to_owned()
                    };
                    let copy = (tag, header("webhook-id"));
                    seen.requests.fetch_add(1, Ordering::SeqCst);
                    let open = seen.open.fetch_add(1, Ordering::SeqCst) + 1;
                    seen.peak.fetch_max(open, Ordering::SeqCst);
                    lock(&seen.attempt_ids).push(header("x-bursar-delivery-id"));
                    if !lock(&seen.in_flight).insert(copy.clone()) {
                        seen.overlaps.fetch_add(1, Ordering::SeqCst);
                    }
                    *lock(&seen.copies).entry(copy.clone()).or_default() += 1;
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    lock(&seen.in_flight).remove(&copy);
                    seen.open.fetch_sub(1, Ordering::SeqCst);
                    StatusCode::OK
                },
            ),
        )
        .with_state(seen.clone());
    tokio::spawn(async move { axum::serve(listener, app).await });
    (base, seen)
}

/// A sibling of `app` with no relay or worker in the server (the test fans out and runs the
/// workers itself), receivers on loopback allowed, a 10 s send timeout, and `change`.
async fn without_workers(app: &TestApp, change: impl FnOnce(&mut Config)) -> TestApp {
    app.sibling(
        |c| {
            c.webhooks.run_workers = false;
            c.webhooks.allow_cidrs = vec!["127.0.0.0/8".into()];
            c.webhooks.timeout_ms = 10_000;
            change(c);
        },
        Arc::new(SystemClock),
    )
    .await
}

/// B15/B16: `workers` delivery workers (8 on PostgreSQL, 4 on SQLite; every other one with a
/// store of its own) drain 2 × `events` due deliveries: every (endpoint, webhook-id) reaches the
/// receiver exactly once, never two copies at a time, each request is attempt 1 of its
/// delivery, the attempts log holds each (delivery, attempt_no) once, and every delivery
/// succeeded after one attempt.
pub async fn many_workers_send_each_delivery_once(app: &TestApp) {
    let (workers, events) = match app.backend {
        Backend::Postgres => (8, 2500),
        Backend::Sqlite => (4, 2500),
    };
    let app = without_workers(app, |c| {
        c.webhooks.concurrency = 16;
        c.database.max_connections = 4;
    })
    .await;
    let (base, seen) = receiver().await;
    let mut endpoints = BTreeMap::new();
    for tag in ["one", "two"] {
        let resp = app
            .a
            .request(reqwest::Method::POST, "/api/webhook_endpoints")
            .json(
                &json!({"url": format!("{base}/{tag}"), "event_types": ["customer.*"],
                           // The cap would otherwise keep all workers to 4 sends per endpoint.
                           "max_concurrency": 100}),
            )
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 201);
        let endpoint: Value = resp.json().await.unwrap();
        endpoints.insert(tag.to_owned(), endpoint["id"].as_i64().unwrap());
    }

    // `events` customer.created events, from 8 concurrent clients.
    let started = Instant::now();
    let mut creating = tokio::task::JoinSet::new();
    for _ in 0..8 {
        let client = app.a.clone();
        creating.spawn(async move {
            for _ in 0..events / 8 {
                client.create_customer(&Default::default()).await.unwrap();
            }
        });
    }
    while let Some(done) = creating.join_next().await {
        done.unwrap();
    }
    for _ in 0..events % 8 {
        app.a.create_customer(&Default::default()).await.unwrap();
    }
    // Sequence and fan out every event now, so all deliveries are due when the workers start.
    while relay::relay_once(&app.state).await.unwrap() > 0 {}
    let produced = Instant::now();
    let all = PageRequest {
        limit: 100_000,
        starting_after: None,
    };
    let mut event_ids = BTreeSet::new();
    for id in endpoints.values() {
        let due = app
            .store
            .list_deliveries(app.account_a, *id, all)
            .await
            .unwrap();
        assert_eq!(due.len(), events);
        assert!(due.iter().all(|d| d.state == delivery::PENDING));
        event_ids.extend(due.into_iter().map(|d| d.event_id));
    }
    assert_eq!(event_ids.len(), events);

    // The workers: every other one over a store of its own, like a process of its own; the
    // rest share the server's (one pool; on SQLite, one writer connection).
    let config = (*app.state.config).clone();
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let mut running = Vec::new();
    let mut stores = Vec::new();
    for i in 0..workers {
        let store = if i % 2 == 0 {
            app.store.clone()
        } else {
            let own = bursar_server::store::open(&config).await.unwrap();
            stores.push(own.clone());
            own
        };
        let state = AppState::new(store, Arc::new(SystemClock), config.clone()).unwrap();
        running.push(tokio::spawn(worker::run(
            state,
            stopped.clone(),
            Duration::from_secs(10),
        )));
    }
    let expected = 2 * events;
    let deadline = Instant::now() + Duration::from_secs(90);
    while lock(&seen.copies).len() < expected {
        assert!(
            Instant::now() < deadline,
            "{} of {expected} deliveries received",
            lock(&seen.copies).len()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The last completions land a moment after the receiver answered.
    let mut unfinished = Vec::new();
    for _ in 0..200 {
        unfinished.clear();
        for id in endpoints.values() {
            let rows = app
                .store
                .list_deliveries(app.account_a, *id, all)
                .await
                .unwrap();
            assert_eq!(rows.len(), events);
            unfinished.extend(rows.into_iter().filter(|d| d.state != delivery::SUCCEEDED));
        }
        if unfinished.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let delivered = Instant::now();
    let _ = stop.send(true);
    for task in running {
        task.await.unwrap();
    }
    for store in stores {
        store.close().await;
    }
    assert!(unfinished.is_empty(), "not succeeded: {unfinished:#?}");
    eprintln!(
        "{:?}: {events} events × 2 endpoints, {workers} workers: produced in {:?}, delivered in {:?}, \
         at most {} requests at once",
        app.backend,
        produced - started,
        delivered - produced,
        seen.peak.load(Ordering::SeqCst)
    );

    // The receiver: each (endpoint, webhook-id) exactly once, never overlapping.
    let copies = lock(&seen.copies).clone();
    let wanted: BTreeSet<Key> = endpoints
        .keys()
        .flat_map(|tag| event_ids.iter().map(|e| (tag.clone(), e.clone())))
        .collect();
    let got: BTreeSet<Key> = copies.keys().cloned().collect();
    assert_eq!(got, wanted, "received a different set of deliveries");
    let twice: Vec<_> = copies.iter().filter(|(_, n)| **n != 1).collect();
    assert!(twice.is_empty(), "received more than once: {twice:?}");
    assert_eq!(seen.overlaps.load(Ordering::SeqCst), 0, "concurrent copies");
    // More requests at once than one worker sends: the workers really ran side by side.
    assert!(seen.peak.load(Ordering::SeqCst) > config.webhooks.concurrency);
    assert_eq!(seen.requests.load(Ordering::SeqCst), expected);
    // Every request was the first attempt of a distinct delivery (`dlv_<delivery>_<attempt>`).
    let attempt_ids = lock(&seen.attempt_ids).clone();
    let distinct: BTreeSet<&String> = attempt_ids.iter().collect();
    assert_eq!(distinct.len(), expected, "an attempt was sent twice");
    assert!(
        attempt_ids
            .iter()
            .all(|a| a.starts_with("dlv_") && a.ends_with("_1")),
        "a delivery needed more than one attempt"
    );

    // The attempts log: each (delivery, attempt_no) once; one successful attempt per delivery.
    for id in endpoints.values() {
        let attempts = app
            .store
            .list_attempts(app.account_a, *id, all)
            .await
            .unwrap();
        let keys: BTreeSet<(i64, i64)> = attempts
            .iter()
            .map(|a| (a.delivery_id, a.attempt_no))
            .collect();
        assert_eq!(keys.len(), attempts.len(), "an attempt recorded twice");
        assert_eq!(attempts.len(), events, "one attempt per delivery");
        for a in &attempts {
            assert_eq!(
                (a.attempt_no, a.status_code, a.error_kind.as_deref()),
                (1, Some(200), None),
                "{a:?}"
            );
        }
        let rows = app
            .store
            .list_deliveries(app.account_a, *id, all)
            .await
            .unwrap();
        assert!(rows.iter().all(|d| d.attempt_count == 1), "retried");
    }
    app.stop().await;
}

/// Serves `router` as a receiver, registers it for `customer.*` with one slot, and makes
/// three deliveries due to it before any worker runs, so a worker's first claim sees them
/// together. Returns the endpoint's id.
async fn one_slot_endpoint_with_three_due(app: &TestApp, router: axum::Router) -> i64 {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/hooks", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, router).await });
    let resp = app
        .a
        .request(reqwest::Method::POST, "/api/webhook_endpoints")
        .json(&json!({"url": url, "event_types": ["customer.*"], "max_concurrency": 1}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 201);
    let endpoint_id = resp.json::<Value>().await.unwrap()["id"].as_i64().unwrap();
    for _ in 0..3 {
        app.a.create_customer(&Default::default()).await.unwrap();
    }
    while relay::relay_once(&app.state).await.unwrap() > 0 {}
    endpoint_id
}

/// A 410 ends an endpoint's sends at once: the slot that got it sends nothing more of what it
/// holds (PostgreSQL leases one ahead), and what it held is cancelled with the endpoint's
/// other due deliveries. The receiver sees exactly one request.
pub async fn a_slot_sends_nothing_it_holds_after_a_410(app: &TestApp) {
    let app = without_workers(app, |_| {}).await;
    let arrived = Arc::new(AtomicUsize::new(0));
    let n = arrived.clone();
    let router = axum::Router::new().route(
        "/hooks",
        axum::routing::post(move || {
            let n = n.clone();
            async move {
                n.fetch_add(1, Ordering::SeqCst);
                StatusCode::GONE
            }
        }),
    );
    let endpoint_id = one_slot_endpoint_with_three_due(&app, router).await;
    let all = PageRequest {
        limit: 100,
        starting_after: None,
    };
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let task = tokio::spawn(worker::run(
        app.state.clone(),
        stopped,
        Duration::from_secs(5),
    ));
    let deadline = Instant::now() + Duration::from_secs(10);
    let done = loop {
        let listed = app
            .store
            .list_deliveries(app.account_a, endpoint_id, all)
            .await
            .unwrap();
        if listed.iter().all(|d| d.state == delivery::CANCELLED) {
            break listed;
        }
        assert!(Instant::now() < deadline, "{listed:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    // Every delivery is settled only once the one held behind the 410 is: given back (and
    // cancelled), or sent and recorded.
    stop.send(true).unwrap();
    task.await.unwrap();
    assert_eq!(arrived.load(Ordering::SeqCst), 1, "{done:?}");
    let attempts: Vec<i64> = done.iter().map(|d| d.attempt_count).collect();
    assert_eq!(attempts.iter().sum::<i64>(), 1, "{done:?}");
    let ep = app
        .a
        .request(
            reqwest::Method::GET,
            &format!("/api/webhook_endpoints/{endpoint_id}"),
        )
        .send()
        .await
        .unwrap()
        .json::<Value>()
        .await
        .unwrap();
    assert_eq!(ep["enabled"], json!(false), "{ep}");
}

/// A worker stopped while a slot's send hangs past the grace: the delivery the slot held
/// behind that send (PostgreSQL leases one ahead) goes back as it was, so the next worker
/// sends it as its first attempt and its log shows no lost attempt that never happened; the
/// hanging one is resent. Without leasing ahead every other delivery simply waits.
pub async fn a_stopped_worker_gives_back_what_a_slot_held_unsent(app: &TestApp) {
    let app = without_workers(app, |_| {}).await;
    let hang = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let arrived = Arc::new(AtomicUsize::new(0));
    let (h, n) = (hang.clone(), arrived.clone());
    let router = axum::Router::new().route(
        "/hooks",
        axum::routing::post(move || {
            let (h, n) = (h.clone(), n.clone());
            async move {
                n.fetch_add(1, Ordering::SeqCst);
                if h.swap(false, Ordering::SeqCst) {
                    tokio::time::sleep(Duration::from_secs(30)).await;
                }
                StatusCode::OK
            }
        }),
    );
    let endpoint_id = one_slot_endpoint_with_three_due(&app, router).await;
    let all = PageRequest {
        limit: 100,
        starting_after: None,
    };
    let listed = || app.store.list_deliveries(app.account_a, endpoint_id, all);
    let run = |grace| {
        let (stop, stopped) = tokio::sync::watch::channel(false);
        let task = tokio::spawn(worker::run(app.state.clone(), stopped, grace));
        (stop, task)
    };
    let (stop, task) = run(Duration::from_millis(300));
    let deadline = Instant::now() + Duration::from_secs(10);
    while arrived.load(Ordering::SeqCst) < 1 {
        assert!(Instant::now() < deadline, "the first send never arrived");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let leased: Vec<_> = listed()
        .await
        .unwrap()
        .into_iter()
        .filter(|d| d.state == delivery::IN_FLIGHT)
        .collect();
    let ahead = matches!(app.backend, Backend::Postgres);
    assert_eq!(leased.len(), if ahead { 2 } else { 1 }, "{leased:?}");
    let hanging = leased.iter().map(|d| d.id).min().unwrap();
    // Stop: the hanging send outlasts the grace.
    stop.send(true).unwrap();
    task.await.unwrap();
    assert_eq!(
        arrived.load(Ordering::SeqCst),
        1,
        "one slot, one send at a time"
    );
    let back = listed().await.unwrap();
    for d in back.iter().filter(|d| d.id != hanging) {
        assert_eq!(
            (d.state.as_str(), d.attempt_count),
            (delivery::PENDING, 0),
            "{d:?}"
        );
    }
    // The next worker delivers all three.
    let (stop, task) = run(Duration::from_secs(5));
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let done = listed().await.unwrap();
        if done.iter().all(|d| d.state == delivery::SUCCEEDED) {
            for d in &done {
                let expected = if d.id == hanging { 2 } else { 1 };
                assert_eq!(d.attempt_count, expected, "{d:?}");
            }
            break;
        }
        assert!(Instant::now() < deadline, "{done:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    stop.send(true).unwrap();
    task.await.unwrap();
    let attempts = app
        .store
        .list_attempts(app.account_a, endpoint_id, all)
        .await
        .unwrap();
    for a in attempts.iter().filter(|a| a.delivery_id != hanging) {
        assert_eq!((a.attempt_no, a.error_kind.as_deref()), (1, None), "{a:?}");
    }
}
