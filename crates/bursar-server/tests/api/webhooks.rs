//! Events and webhooks end to end (issue 5): a real receiver over HTTP, Bursar's relay and
//! worker inside the test server, and the SDK's verifier on every delivery.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::http::{HeaderMap, StatusCode};
use bursar_sdk::Client;
use bursar_sdk::webhooks::Verifier;
use bursar_server::SystemClock;
use serde_json::{Value, json};

use crate::harness::{TestApp, error_body};

/// One request as the receiver got it.
#[derive(Clone)]
pub struct Received {
    pub headers: HeaderMap,
    pub body: Bytes,
    pub answered: u16,
}

/// A webhook receiver: records every request and answers with the current status.
pub struct Receiver {
    pub url: String,
    pub status: Arc<AtomicU16>,
    pub got: Arc<Mutex<Vec<Received>>>,
}

impl Receiver {
    pub async fn start(status: u16) -> Receiver {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/hooks", listener.local_addr().unwrap());
        let status = Arc::new(AtomicU16::new(status));
        let got: Arc<Mutex<Vec<Received>>> = Arc::default();
        let (s, g) = (status.clone(), got.clone());
        let app = axum::Router::new().route(
            "/hooks",
            axum::routing::post(move |headers: HeaderMap, body: Bytes| {
                let (s, g) = (s.clone(), g.clone());
                async move {
                    let answered = s.load(Ordering::SeqCst);
                    g.lock().unwrap().push(Received {
                        headers,
                        body,
                        answered,
                    });
                    StatusCode::from_u16(answered).unwrap()
                }
            }),
        );
        tokio::spawn(async move { axum::serve(listener, app).await });
        Receiver { url, status, got }
    }

    pub fn received(&self) -> Vec<Received> {
        self.got.lock().unwrap().clone()
    }
}

/// A server of the same backend whose worker may reach 127.0.0.1 over plain HTTP and
/// retries after about a second.
async fn webhook_app(app: &TestApp) -> TestApp {
    app.sibling(
        |c| {
            c.webhooks.allow_cidrs = vec!["127.0.0.0/8".into()];
            c.webhooks.schedule_secs = vec![1; 9];
            c.webhooks.timeout_ms = 5_000;
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

/// Every event id of the account, through the events API (all pages).
async fn all_event_ids(client: &Client) -> Vec<String> {
    let mut ids = Vec::new();
    let mut after: Option<i64> = None;
    loop {
        let path = match after {
            Some(seq) => format!("/api/events?limit=100&starting_after={seq}"),
            None => "/api/events?limit=100".into(),
        };
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

/// Spec checklist B10 (503 variant) with A1–A4 and A7 on every delivery: a receiver that
/// fails while 100 events are produced gets all of them once it recovers, every request
/// verifies in both schemes, and duplicates are identical retries.
pub async fn a_receiver_outage_loses_no_event(app: &TestApp) {
    let app = webhook_app(app).await;
    let receiver = Receiver::start(503).await;
    let resp = create_endpoint(&app.a, json!({"url": receiver.url, "event_types": ["*"]})).await;
    assert_eq!(resp.status(), 201);
    let endpoint: Value = resp.json().await.unwrap();
    let secret = endpoint["secret"].as_str().unwrap().to_owned();
    assert!(secret.starts_with("whsec_"), "{endpoint}");
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
    // Events are listed once the relay has sequenced them (within a poll interval).
    let mut produced = BTreeSet::new();
    for _ in 0..100 {
        produced = all_event_ids(&app.a).await.into_iter().collect();
        if produced.len() == 100 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(produced.len(), 100);
    wait_for("every event delivered", || {
        let ok: BTreeSet<String> = receiver
            .received()
            .iter()
            .filter(|r| r.answered == 200)
            .map(|r| r.headers["webhook-id"].to_str().unwrap().to_owned())
            .collect();
        ok == produced
    })
    .await;
    let verifier = Verifier::new([secret.as_str()]).unwrap();
    let mut bodies: BTreeMap<String, Bytes> = BTreeMap::new();
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
    }
    // The delivery log agrees: every delivery succeeded, after failed attempts.
    let id = endpoint["id"].as_i64().unwrap();
    let path = format!("/api/webhook_endpoints/{id}/deliveries?limit=100");
    let page: Value = call_json(&app.a, reqwest::Method::GET, &path).await;
    let data = page["data"].as_array().unwrap();
    assert_eq!(data.len(), 100);
    assert!(data.iter().all(|d| d["state"] == "succeeded"), "{page}");
    assert!(
        data.iter().any(|d| d["attempt_count"].as_i64() >= Some(2)),
        "{page}"
    );
    let path = format!("/api/webhook_endpoints/{id}/attempts?limit=100");
    let page: Value = call_json(&app.a, reqwest::Method::GET, &path).await;
    let attempts = page["data"].as_array().unwrap();
    assert_eq!(attempts.len(), 100);
    assert!(
        attempts
            .iter()
            .all(|a| a["status_code"] == 200 && a["error_kind"].is_null())
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
