//! The sandbox processor over real HTTP: deterministic test cards, its own idempotency, the
//! ledger tests rely on, and injected faults, changeable at runtime.

use std::time::Duration;

use bursar_sandbox::{FLAKY_FAILURES, Faults, Sandbox};
use serde_json::{Value, json};

struct Peer {
    url: String,
    sandbox: Sandbox,
    http: reqwest::Client,
}

async fn start(faults: Faults) -> Peer {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let sandbox = Sandbox::new(faults);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(bursar_sandbox::serve(listener, sandbox.clone()));
    Peer {
        url,
        sandbox,
        http: reqwest::Client::builder()
            .timeout(Duration::from_secs(5))
            .build()
            .unwrap(),
    }
}

impl Peer {
    async fn post(&self, path: &str, key: Option<&str>, body: Value) -> (u16, Value, bool) {
        let mut req = self.http.post(format!("{}{path}", self.url)).json(&body);
        if let Some(k) = key {
            req = req.header("idempotency-key", k);
        }
        let resp = req.send().await.unwrap();
        let replayed = resp.headers().contains_key("idempotent-replayed");
        (resp.status().as_u16(), resp.json().await.unwrap(), replayed)
    }

    async fn get(&self, path: &str) -> Value {
        let resp = self.http.get(format!("{}{path}", self.url)).send().await;
        resp.unwrap().json().await.unwrap()
    }

    fn kinds(&self) -> Vec<String> {
        self.sandbox.ledger().into_iter().map(|e| e.kind).collect()
    }
}

fn pay(method: &str, capture: bool) -> Value {
    json!({"amount_minor": 19900, "currency": "USD", "payment_method": method,
           "capture": capture})
}

#[tokio::test]
async fn a_retried_charge_is_charged_once() {
    let p = start(Faults::default()).await;
    let (status, first, replayed) = p
        .post("/v1/payments", Some("k1"), pay("pm_card_visa", true))
        .await;
    assert_eq!((status, replayed), (201, false));
    assert_eq!(first["status"], "captured");
    assert_eq!(first["captured_minor"], 19900);
    let (status, again, replayed) = p
        .post("/v1/payments", Some("k1"), pay("pm_card_visa", true))
        .await;
    assert_eq!((status, replayed), (201, true));
    assert_eq!(again, first);
    assert_eq!(p.kinds(), ["authorization", "capture"]);
    assert_eq!(p.sandbox.ledger()[0].idempotency_key.as_deref(), Some("k1"));
    // The same key on a different request is refused and charges nothing.
    let (status, err, _) = p
        .post("/v1/payments", Some("k1"), pay("pm_card_visa", false))
        .await;
    assert_eq!(
        (status, err["error"]["code"].as_str()),
        (422, Some("idempotency_key_reused"))
    );
    // The ledger is also served over HTTP.
    let ledger = p.get("/v1/ledger").await;
    assert_eq!(ledger["entries"].as_array().map(Vec::len), Some(2));
}

#[tokio::test]
async fn concurrent_calls_with_one_key_charge_once() {
    let p = std::sync::Arc::new(start(Faults::default()).await);
    let tasks: Vec<_> = (0..20)
        .map(|_| {
            let p = p.clone();
            tokio::spawn(async move {
                p.post("/v1/payments", Some("hot"), pay("pm_card_visa", false))
                    .await
            })
        })
        .collect();
    let mut ids = Vec::new();
    for t in tasks {
        let (status, body, _) = t.await.unwrap();
        assert_eq!(status, 201);
        ids.push(body["id"].clone());
    }
    ids.dedup();
    assert_eq!(ids.len(), 1);
    assert_eq!(p.kinds(), ["authorization"]);
}

#[tokio::test]
async fn test_cards_behave_deterministically() {
    let p = start(Faults::default()).await;
    for (method, code) in [
        ("pm_card_declined", "card_declined"),
        ("pm_card_insufficient_funds", "insufficient_funds"),
    ] {
        let (status, body, _) = p
            .post("/v1/payments", Some(method), pay(method, true))
            .await;
        assert_eq!((status, body["error"]["code"].as_str()), (402, Some(code)));
        // A decline is an answer: replayed, never re-run.
        let (status, _, replayed) = p
            .post("/v1/payments", Some(method), pay(method, true))
            .await;
        assert_eq!((status, replayed), (402, true));
    }
    assert!(p.kinds().is_empty(), "declines charge nothing");
    // Flaky: 503 for the first attempts under one key, then the charge.
    for _ in 0..FLAKY_FAILURES {
        let (status, _, _) = p
            .post("/v1/payments", Some("flaky"), pay("pm_card_flaky", true))
            .await;
        assert_eq!(status, 503);
    }
    let (status, _, replayed) = p
        .post("/v1/payments", Some("flaky"), pay("pm_card_flaky", true))
        .await;
    assert_eq!((status, replayed), (201, false));
    assert_eq!(p.kinds(), ["authorization", "capture"]);
    // Timeout: no answer at all.
    let slow = p
        .http
        .post(format!("{}/v1/payments", p.url))
        .timeout(Duration::from_millis(300))
        .json(&pay("pm_card_timeout", true))
        .send()
        .await;
    assert!(slow.is_err_and(|e| e.is_timeout()));
    let (status, body, _) = p
        .post("/v1/payments", None, pay("pm_card_unknown", true))
        .await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (422, Some("unknown_payment_method"))
    );
}

#[tokio::test]
async fn capture_void_and_refund_keep_their_bounds() {
    let p = start(Faults::default()).await;
    let (_, auth, _) = p
        .post("/v1/payments", Some("a"), pay("pm_card_visa", false))
        .await;
    let id = auth["id"].as_str().unwrap().to_owned();
    let (status, _, _) = p
        .post(
            &format!("/v1/payments/{id}/capture"),
            Some("c0"),
            json!({"amount_minor": 20000}),
        )
        .await;
    assert_eq!(status, 422, "more than authorized");
    let (status, cap, _) = p
        .post(
            &format!("/v1/payments/{id}/capture"),
            Some("c1"),
            json!({"amount_minor": 15000}),
        )
        .await;
    assert_eq!((status, cap["captured_minor"].as_i64()), (200, Some(15000)));
    let (status, _, _) = p
        .post(&format!("/v1/payments/{id}/void"), Some("v1"), json!({}))
        .await;
    assert_eq!(status, 409, "a captured payment cannot be voided");
    let (status, _, _) = p
        .post(
            "/v1/refunds",
            Some("r1"),
            json!({"payment_id": id, "amount_minor": 10000}),
        )
        .await;
    assert_eq!(status, 201);
    let (status, _, _) = p
        .post(
            "/v1/refunds",
            Some("r2"),
            json!({"payment_id": id, "amount_minor": 5001}),
        )
        .await;
    assert_eq!(status, 422, "never more than captured");
    let (status, _, replayed) = p
        .post(
            "/v1/refunds",
            Some("r1"),
            json!({"payment_id": id, "amount_minor": 10000}),
        )
        .await;
    assert_eq!((status, replayed), (201, true));
    let (status, _, _) = p
        .post("/v1/refunds", Some("r3"), json!({"payment_id": id}))
        .await;
    assert_eq!(status, 201, "the rest");
    let got = p.get(&format!("/v1/payments/{id}")).await;
    assert_eq!(
        (got["status"].as_str(), got["refunded_minor"].as_i64()),
        (Some("refunded"), Some(15000))
    );
    assert_eq!(p.kinds(), ["authorization", "capture", "refund", "refund"]);
    let (_, auth2, _) = p
        .post("/v1/payments", Some("b"), pay("pm_card_visa", false))
        .await;
    let id2 = auth2["id"].as_str().unwrap();
    let (status, voided, _) = p
        .post(&format!("/v1/payments/{id2}/void"), Some("v2"), json!({}))
        .await;
    assert_eq!((status, voided["status"].as_str()), (200, Some("voided")));
}

#[tokio::test]
async fn injected_faults_fail_without_charging() {
    let p = start(Faults {
        latency: Duration::from_millis(50),
        failure_percent: 100,
        ..Faults::default()
    })
    .await;
    let started = std::time::Instant::now();
    let (status, body, _) = p
        .post("/v1/payments", Some("x"), pay("pm_card_visa", true))
        .await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (503, Some("injected_failure"))
    );
    assert!(started.elapsed() >= Duration::from_millis(50));
    assert!(p.kinds().is_empty());
}

#[tokio::test]
async fn a_delayed_answer_charges_before_it_is_sent_and_a_retry_charges_nothing() {
    let p = std::sync::Arc::new(start(Faults::default()).await);
    let (status, set, _) = p
        .post("/v1/sandbox/faults", None, json!({"answer_delay_ms": 300}))
        .await;
    assert_eq!(
        (status, set),
        (
            200,
            json!({"latency_ms": 0, "failure_percent": 0, "answer_delay_ms": 300})
        )
    );
    assert_eq!(p.sandbox.faults().answer_delay, Duration::from_millis(300));
    let started = std::time::Instant::now();
    let first = {
        let p = p.clone();
        tokio::spawn(async move {
            p.post("/v1/payments", Some("slow"), pay("pm_card_visa", false))
                .await
        })
    };
    // The charge is in the ledger while the caller still waits for its answer.
    let charged = loop {
        let ledger = p.get("/v1/ledger").await;
        if ledger["entries"].as_array().is_some_and(|e| !e.is_empty()) {
            break ledger;
        }
        assert!(started.elapsed() < Duration::from_secs(2), "never charged");
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    assert!(!first.is_finished(), "answered before the delay ran out");
    assert_eq!(charged["entries"][0]["kind"], "authorization");
    // A retry meanwhile gets the stored answer and charges nothing.
    let (status, again, replayed) = p
        .post("/v1/payments", Some("slow"), pay("pm_card_visa", false))
        .await;
    assert_eq!((status, replayed), (201, true));
    let (status, body, replayed) = first.await.unwrap();
    assert_eq!((status, replayed), (201, false));
    assert!(started.elapsed() >= Duration::from_millis(300));
    assert_eq!(again["id"], body["id"]);
    assert_eq!(charged["entries"][0]["payment_id"], body["id"]);
    assert_eq!(p.kinds(), ["authorization"]);
    let ledger = p.get("/v1/ledger").await;
    assert_eq!(ledger["entries"].as_array().map(Vec::len), Some(1));
}

#[tokio::test]
async fn faults_change_at_runtime() {
    let p = start(Faults::default()).await;
    p.sandbox.set_faults(Faults {
        failure_percent: 100,
        ..Faults::default()
    });
    assert_eq!(p.sandbox.faults().failure_percent, 100);
    for key in ["f1", "f2"] {
        let (status, body, _) = p
            .post("/v1/payments", Some(key), pay("pm_card_visa", true))
            .await;
        assert_eq!(
            (status, body["error"]["code"].as_str()),
            (503, Some("injected_failure"))
        );
    }
    assert!(p.kinds().is_empty());
    // The admin route reports them and is never subject to them.
    assert_eq!(
        p.get("/v1/sandbox/faults").await,
        json!({"latency_ms": 0, "failure_percent": 100, "answer_delay_ms": 0})
    );
    p.sandbox.set_faults(Faults::default());
    let (status, _, replayed) = p
        .post("/v1/payments", Some("f1"), pay("pm_card_visa", true))
        .await;
    assert_eq!((status, replayed), (201, false));
    assert_eq!(p.kinds(), ["authorization", "capture"]);
    // Over HTTP too: missing fields are 0.
    let (status, set, _) = p
        .post("/v1/sandbox/faults", None, json!({"failure_percent": 100}))
        .await;
    assert_eq!((status, set["failure_percent"].as_u64()), (200, Some(100)));
    let (status, _, _) = p
        .post("/v1/payments", Some("f3"), pay("pm_card_visa", true))
        .await;
    assert_eq!(status, 503);
    let (status, set, _) = p.post("/v1/sandbox/faults", None, json!({})).await;
    assert_eq!(
        (status, set),
        (
            200,
            json!({"latency_ms": 0, "failure_percent": 0, "answer_delay_ms": 0})
        )
    );
    assert_eq!(p.sandbox.faults(), Faults::default());
    let (status, _, _) = p
        .post("/v1/payments", Some("f3"), pay("pm_card_visa", true))
        .await;
    assert_eq!(status, 201);
}

#[tokio::test]
async fn bad_fault_settings_are_refused() {
    let p = start(Faults::default()).await;
    let url = format!("{}/v1/sandbox/faults", p.url);
    let not_json = p.http.post(&url).body("{latency").send().await.unwrap();
    assert_eq!(not_json.status().as_u16(), 400);
    let body: Value = not_json.json().await.unwrap();
    assert_eq!(body["error"]["code"], "invalid_request");
    for bad in [
        json!({"failure_percent": 101}),
        json!({"failure_percent": 1000}),
        json!({"latency_ms": -1}),
        json!({"latency_ms": "50"}),
        json!({"delay_ms": 50}),
    ] {
        let (status, body, _) = p.post("/v1/sandbox/faults", None, bad.clone()).await;
        assert_eq!(
            (status, body["error"]["code"].as_str()),
            (400, Some("invalid_request")),
            "{bad}"
        );
    }
    assert_eq!(p.sandbox.faults(), Faults::default(), "nothing changed");
}
