//! Payments, refunds, the ledger and conversions end to end (issue 4): the real server over
//! HTTP, paying through the sandbox processor over real HTTP, on both backends.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use bursar_domain::Clock;
use bursar_sandbox::{Faults, Sandbox};
use bursar_server::Config;
use bursar_server::processor::{HttpProcessor, RetryPolicy};
use bursar_server::services::money::load_rates;
use bursar_server::services::operations::Operations;
use rand::{RngExt, SeedableRng};
use reqwest::Method;
use serde_json::{Value, json};

use crate::harness::{ManualClock, TestApp, error_body, test_config};

/// A rates file (`services::money::load_rates`) of `(base, quote, rate)` lines.
fn rates_json(rates: &[(&str, &str, &str)]) -> String {
    let lines: Vec<Value> = rates
        .iter()
        .map(|(b, q, r)| json!({"base": b, "quote": q, "rate": r}))
        .collect();
    json!({ "rates": lines }).to_string()
}

pub struct Rig {
    pub app: TestApp,
    pub sandbox: Sandbox,
    pub clock: Arc<ManualClock>,
}

/// A server paying through its own sandbox, with quick processor timeouts, a controllable
/// clock and no background completer unless `change` asks for one.
pub async fn rig(base: &TestApp, change: impl FnOnce(&mut Config)) -> Rig {
    let sandbox = Sandbox::new(Faults::default());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(bursar_sandbox::serve(listener, sandbox.clone()));
    let policy = RetryPolicy {
        attempts: 3,
        timeout: Duration::from_millis(300),
        base_delay: Duration::from_millis(10),
        max_delay: Duration::from_millis(40),
    };
    let processor = Arc::new(HttpProcessor::new(&url, policy).unwrap());
    let (mut config, dir) = test_config(base.backend).unwrap();
    config.idempotency.completer_interval_secs = 3600;
    config.fx.spread_bps = 0;
    change(&mut config);
    let clock = ManualClock::new();
    let app = TestApp::start_full(
        base.backend,
        config,
        dir,
        clock.clone(),
        Operations::money(),
        Some(processor),
    )
    .await;
    Rig {
        app,
        sandbox,
        clock,
    }
}

pub async fn post(app: &TestApp, path: &str, key: &str, body: Value) -> reqwest::Response {
    app.a
        .request(Method::POST, path)
        .header("content-type", "application/json")
        .header("idempotency-key", key)
        .body(body.to_string())
        .send()
        .await
        .unwrap()
}

pub async fn get(app: &TestApp, path: &str) -> Value {
    let resp = app.a.request(Method::GET, path).send().await.unwrap();
    assert_eq!(resp.status(), 200, "GET {path}");
    resp.json().await.unwrap()
}

async fn status_json(resp: reqwest::Response, status: u16) -> Value {
    assert_eq!(resp.status().as_u16(), status);
    resp.json().await.unwrap()
}

/// A pending order of account A for `amount` `currency`.
pub async fn order(app: &TestApp, amount: &str, currency: &str) -> i64 {
    let customer = app.customer(&app.a).await;
    let resp = app
        .post_order_raw(
            &app.a,
            json!({"customer_id": customer, "amount": amount, "currency": currency}).to_string(),
        )
        .await;
    status_json(resp, 201).await["id"].as_i64().unwrap()
}

fn kinds(s: &Sandbox, kind: &str) -> usize {
    s.ledger().iter().filter(|e| e.kind == kind).count()
}

/// Card flows for every test payment method: statuses, codes, and stored business answers.
pub async fn card_flows_for_every_test_payment_method(base: &TestApp) {
    let r = rig(base, |_| {}).await;
    let app = &r.app;
    // pm_card_visa, captured at once: the order is paid, the money available.
    let o = order(app, "25.00", "USD").await;
    let body = json!({"order_id": o, "payment_method": "pm_card_visa"});
    let first = post(app, "/api/payments", "visa-1", body.clone()).await;
    assert_eq!(first.status(), 201);
    let location = first.headers()["location"].to_str().unwrap().to_owned();
    let paid: Value = first.json().await.unwrap();
    assert_eq!(paid["status"], "succeeded");
    assert_eq!(paid["amount_captured_minor"], 2500);
    assert_eq!(location, format!("/api/payments/{}", paid["id"]));
    assert_eq!(
        get(app, &format!("/api/orders/{o}")).await["status"],
        "paid"
    );
    let replay = post(app, "/api/payments", "visa-1", body).await;
    assert_eq!(replay.headers()["idempotent-replayed"], "true");
    assert_eq!(status_json(replay, 201).await, paid);
    assert_eq!(kinds(&r.sandbox, "authorization"), 1);
    // A paid order takes no second payment: a stored 409.
    let again = post(
        app,
        "/api/payments",
        "visa-2",
        json!({"order_id": o, "payment_method": "pm_card_visa"}),
    )
    .await;
    error_body(again, 409, "invalid_state").await;

    // Declines are stored 402 answers naming the failed payment, replayed to retries.
    for (method, decline) in [
        ("pm_card_declined", "card_declined"),
        ("pm_card_insufficient_funds", "insufficient_funds"),
    ] {
        let o = order(app, "10.00", "USD").await;
        let body = json!({"order_id": o, "payment_method": method});
        let declined = error_body(
            post(app, "/api/payments", method, body.clone()).await,
            402,
            "card_declined",
        )
        .await;
        assert_eq!(declined["decline_code"], decline);
        assert_eq!(declined["payment_status"], "failed");
        let id = declined["payment_id"].as_i64().unwrap();
        let p = get(app, &format!("/api/payments/{id}")).await;
        assert_eq!(
            (p["status"].clone(), p["failure_code"].clone()),
            (json!("failed"), json!(decline))
        );
        let replay = post(app, "/api/payments", method, body).await;
        assert_eq!(replay.headers()["idempotent-replayed"], "true");
        // The stored answer, byte for byte: the first request's ids included.
        assert_eq!(status_json(replay, 402).await, declined);
        assert_eq!(
            get(app, &format!("/api/orders/{o}")).await["status"],
            "pending"
        );
    }

    // pm_card_flaky: the client retries the 503s under one key; one charge.
    let o = order(app, "7.50", "USD").await;
    let flaky = post(
        app,
        "/api/payments",
        "flaky",
        json!({"order_id": o, "payment_method": "pm_card_flaky"}),
    )
    .await;
    assert_eq!(status_json(flaky, 201).await["status"], "succeeded");
    assert_eq!(kinds(&r.sandbox, "authorization"), 2);

    // pm_card_timeout never answers: 503 with Retry-After, and the work waits unfinished.
    let o = order(app, "3.00", "USD").await;
    let body = json!({"order_id": o, "payment_method": "pm_card_timeout"});
    let slow = post(app, "/api/payments", "timeout", body.clone()).await;
    assert!(slow.headers().contains_key("retry-after"));
    error_body(slow, 503, "service_unavailable").await;
    let listed = get(app, &format!("/api/payments?order_id={o}")).await;
    assert_eq!(
        listed["data"],
        json!([]),
        "nothing recorded while the outcome is unknown"
    );

    // Authorize, then capture part: the rest is released, the order stays pending.
    let o = order(app, "40.00", "USD").await;
    let auth = post(
        app,
        "/api/payments",
        "auth-1",
        json!({"order_id": o, "payment_method": "pm_card_visa", "capture": false}),
    )
    .await;
    let auth = status_json(auth, 201).await;
    assert_eq!(auth["status"], "requires_capture");
    let id = auth["id"].as_i64().unwrap();
    let balances = get(app, "/api/balances").await;
    let usd = &balances["data"][0];
    assert_eq!(
        (usd["available_minor"].clone(), usd["pending_minor"].clone()),
        (json!(3250), json!(4000))
    );
    let captured = post(
        app,
        &format!("/api/payments/{id}/capture"),
        "cap-1",
        json!({"amount": "30.00"}),
    )
    .await;
    assert_eq!(captured.headers()["etag"], "\"2\"");
    let captured = status_json(captured, 200).await;
    assert_eq!(
        (
            captured["status"].clone(),
            captured["amount_captured_minor"].clone()
        ),
        (json!("succeeded"), json!(3000))
    );
    assert_eq!(
        get(app, &format!("/api/orders/{o}")).await["status"],
        "pending"
    );
    let usd = &get(app, "/api/balances").await["data"][0];
    assert_eq!(
        (usd["available_minor"].clone(), usd["pending_minor"].clone()),
        (json!(6250), json!(0))
    );
    // Capturing twice under a new key is a stored 409; cancel of a captured payment too.
    error_body(
        post(
            app,
            &format!("/api/payments/{id}/capture"),
            "cap-2",
            json!({}),
        )
        .await,
        409,
        "invalid_state",
    )
    .await;
    error_body(
        post(
            app,
            &format!("/api/payments/{id}/cancel"),
            "cancel-1",
            json!({}),
        )
        .await,
        409,
        "invalid_state",
    )
    .await;
    // Cancel an authorization.
    let o = order(app, "5.00", "USD").await;
    let auth = post(
        app,
        "/api/payments",
        "auth-2",
        json!({"order_id": o, "payment_method": "pm_card_visa", "capture": false}),
    )
    .await;
    let id = status_json(auth, 201).await["id"].as_i64().unwrap();
    // Actions take a bare request: no body, no Content-Type.
    let canceled = app
        .a
        .request(Method::POST, &format!("/api/payments/{id}/cancel"))
        .header("idempotency-key", "cancel-2")
        .send()
        .await
        .unwrap();
    assert_eq!(status_json(canceled, 200).await["status"], "canceled");
    // A create needs its body.
    let bare = app
        .a
        .request(Method::POST, "/api/payments")
        .header("idempotency-key", "bare")
        .send()
        .await
        .unwrap();
    error_body(bare, 400, "malformed_json").await;
    assert_eq!(kinds(&r.sandbox, "void"), 1);

    // Bad requests are refused before anything is stored: the key stays usable.
    let bad = post(
        app,
        "/api/payments",
        "bad-1",
        json!({"order_id": o, "payment_method": "", "colour": "red"}),
    )
    .await;
    error_body(bad, 422, "validation_failed").await;
    let too_much = post(
        app,
        "/api/payments",
        "bad-2",
        json!({"order_id": o, "payment_method": "pm_card_visa", "amount": "5.001"}),
    )
    .await;
    error_body(too_much, 422, "validation_failed").await;
    // Another account's order, or none, is a 404.
    let theirs = r.app.customer(&r.app.b).await;
    let resp = r
        .app
        .post_order_raw(
            &r.app.b,
            json!({"customer_id": theirs, "amount": "1.00", "currency": "USD"}).to_string(),
        )
        .await;
    let their_order = status_json(resp, 201).await["id"].as_i64().unwrap();
    error_body(
        post(
            app,
            "/api/payments",
            "theirs",
            json!({"order_id": their_order, "payment_method": "pm_card_visa"}),
        )
        .await,
        404,
        "resource_not_found",
    )
    .await;
    let other = r
        .app
        .b
        .request(Method::GET, &format!("/api/payments/{id}"))
        .send()
        .await
        .unwrap();
    error_body(other, 404, "resource_not_found").await;
    // Each list takes its own filters only.
    for path in [
        "/api/refunds?order_id=1",
        "/api/ledger_entries?payment_id=1",
    ] {
        let resp = app.a.request(Method::GET, path).send().await.unwrap();
        error_body(resp, 400, "invalid_parameter").await;
    }
    // Spec H42: the processor call continues the caller's trace with a new parent-id and
    // the caller's flags.
    let o = order(app, "2.00", "USD").await;
    let inbound = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00";
    let traced = app
        .a
        .request(Method::POST, "/api/payments")
        .header("content-type", "application/json")
        .header("idempotency-key", "traced")
        .header("traceparent", inbound)
        .body(json!({"order_id": o, "payment_method": "pm_card_visa"}).to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(traced.status(), 201);
    let ledger = r.sandbox.ledger();
    let outbound = ledger
        .last()
        .unwrap()
        .traceparent
        .clone()
        .expect("traceparent sent");
    let parts: Vec<&str> = outbound.split('-').collect();
    assert_eq!(parts[0], "00");
    assert_eq!(parts[1], "4bf92f3577b34da6a3ce929d0e0e4736", "same trace");
    assert!(
        parts[2].len() == 16 && parts[2] != "00f067aa0ba902b7",
        "new parent-id"
    );
    assert_eq!(parts[3], "00", "flags kept");
    check_ledger(app).await;
    r.app.stop().await;
}

/// The processor charges, then its answer is too slow for Bursar's timeout (three times);
/// the request ends in 503 with the outcome unknown. The processor recovers; the retry with
/// the same key completes the payment, and the processor's own records show one charge.
pub async fn a_processor_that_times_out_then_recovers_charges_once(base: &TestApp) {
    let r = rig(base, |_| {}).await;
    let app = &r.app;
    let o = order(app, "12.00", "USD").await;
    r.sandbox.set_faults(Faults {
        answer_delay: Duration::from_millis(1500),
        ..Faults::default()
    });
    let body = json!({"order_id": o, "payment_method": "pm_card_visa"});
    error_body(
        post(app, "/api/payments", "slow", body.clone()).await,
        503,
        "service_unavailable",
    )
    .await;
    assert_eq!(
        kinds(&r.sandbox, "authorization"),
        1,
        "the processor did charge"
    );
    assert_eq!(get(app, "/api/payments").await["data"], json!([]));
    r.sandbox.set_faults(Faults::default());
    let done = post(app, "/api/payments", "slow", body).await;
    assert_eq!(status_json(done, 201).await["status"], "succeeded");
    assert_eq!(kinds(&r.sandbox, "authorization"), 1, "and only once");
    assert_eq!(
        get(app, "/api/payments").await["data"]
            .as_array()
            .unwrap()
            .len(),
        1
    );
    assert_eq!(
        get(app, &format!("/api/orders/{o}")).await["status"],
        "paid"
    );
    check_ledger(app).await;
    r.app.stop().await;
}

/// 50 concurrent refunds of random amounts against one captured payment: the refunded
/// total never exceeds the capture, in Bursar and at the processor.
pub async fn concurrent_refunds_never_exceed_the_capture(base: &TestApp) {
    let r = rig(base, |_| {}).await;
    let app = &r.app;
    let o = order(app, "50.00", "USD").await;
    let paid = post(
        app,
        "/api/payments",
        "pay",
        json!({"order_id": o, "payment_method": "pm_card_visa"}),
    )
    .await;
    let payment = status_json(paid, 201).await["id"].as_i64().unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(4);
    let mut tasks = Vec::new();
    for i in 0..50 {
        let cents: i64 = rng.random_range(50..=250);
        let a = app.a.clone();
        tasks.push(tokio::spawn(async move {
            let resp = a
                .request(Method::POST, "/api/refunds")
                .header("content-type", "application/json")
                .header("idempotency-key", format!("refund-{i}"))
                .body(
                    json!({"payment_id": payment, "amount": format!("{}.{:02}", cents / 100, cents % 100)})
                        .to_string(),
                )
                .send()
                .await
                .unwrap();
            let status = resp.status().as_u16();
            (status, cents, resp.json::<Value>().await.unwrap())
        }));
    }
    let mut refunded = 0;
    let mut refused = 0;
    for t in tasks {
        let (status, cents, body) = t.await.unwrap();
        match status {
            201 => {
                assert_eq!(body["amount_minor"], cents);
                refunded += cents;
            }
            422 => {
                assert_eq!(body["error_code"], "refund_exceeds_captured", "{body}");
                refused += 1;
            }
            other => panic!("unexpected {other}: {body}"),
        }
    }
    assert!(refunded <= 5000, "refunded {refunded} of 5000");
    assert!(
        refused > 0,
        "50 refunds of at least 0.50 cannot all fit in 50.00"
    );
    let p = get(app, &format!("/api/payments/{payment}")).await;
    assert_eq!(p["amount_refunded_minor"], refunded);
    let at_processor: i64 = r
        .sandbox
        .ledger()
        .iter()
        .filter(|e| e.kind == "refund")
        .map(|e| e.amount_minor)
        .sum();
    assert_eq!(at_processor, refunded);
    let listed = get(app, &format!("/api/refunds?payment_id={payment}&limit=100")).await;
    assert_eq!(listed["data"].as_array().unwrap().len(), 50 - refused);
    check_ledger(app).await;
    r.app.stop().await;
}

/// Rounding per currency pair (half-even to the target's minor unit), expired quotes,
/// insufficient funds, replays and the one-conversion rule.
pub async fn conversions_round_half_even_and_refuse_cleanly(base: &TestApp) {
    let r = rig(base, |c| c.fx.quote_ttl_secs = 30).await;
    let app = &r.app;
    load_rates(
        app.store.as_ref(),
        &rates_json(&[
            ("USD", "EUR", "0.925"),
            ("USD", "JPY", "150.5"),
            ("KWD", "USD", "3.2545"),
        ]),
        r.clock.now(),
    )
    .await
    .unwrap();
    let rates = get(app, "/api/rates").await;
    assert_eq!(rates["data"].as_array().unwrap().len(), 3);
    assert_eq!(rates["data"][0]["rate"], "3.2545");
    // Fund USD: pay an order of 100.00.
    let o = order(app, "100.00", "USD").await;
    status_json(
        post(
            app,
            "/api/payments",
            "fund",
            json!({"order_id": o, "payment_method": "pm_card_visa"}),
        )
        .await,
        201,
    )
    .await;
    let quote = |key: &'static str, from: &'static str, to: &'static str, amount: &'static str| {
        post(
            app,
            "/api/quotes",
            key,
            json!({"from_currency": from, "to_currency": to, "amount": amount}),
        )
    };
    // Half-even to the target's minor unit, exact products shown:
    // USD→EUR at 0.925: 0.10 → 0.0925 → 0.09; 0.20 → 0.185 (tie) → 0.18; 0.60 → 0.555 (tie)
    // → 0.56. USD→JPY at 150.5: 0.01 → 1.505 → 2; 1.00 → 150.5 (tie) → 150; 3.00 → 451.5
    // (tie) → 452. KWD→USD at 3.2545 (3 decimals in): 0.200 → 0.6509 → 0.65. USD→KWD by
    // the inverse, 1/3.2545 = 0.307266861269: 1.00 → 0.307 (3 decimals out).
    let cases = [
        ("q1", "USD", "EUR", "0.10", 9),
        ("q2", "USD", "EUR", "0.20", 18),
        ("q3", "USD", "EUR", "0.60", 56),
        ("q4", "USD", "JPY", "0.01", 2),
        ("q5", "USD", "JPY", "1.00", 150),
        ("q6", "USD", "JPY", "3.00", 452),
        ("q7", "KWD", "USD", "0.200", 65),
        ("q8", "USD", "KWD", "1.00", 307),
    ];
    for (key, from, to, amount, want_minor) in cases {
        let q = status_json(quote(key, from, to, amount).await, 201).await;
        assert_eq!(q["to_amount_minor"], want_minor, "{key}: {q}");
        assert_eq!(q["rate"], q["market_rate"], "no spread configured");
    }
    // A result that rounds to nothing is refused: 0.001 KWD × 3.2545 = 0.0032545 USD.
    let small = error_body(
        quote("q9", "KWD", "USD", "0.001").await,
        422,
        "validation_failed",
    )
    .await;
    assert_eq!(small["details"][0]["code"], "conversion_too_small");
    // Too many decimals for the source currency, before anything is stored.
    let jpy = error_body(
        quote("q10", "JPY", "USD", "1.5").await,
        422,
        "validation_failed",
    )
    .await;
    assert_eq!(jpy["details"][0]["field"], "amount");
    // No rate for a pair: a stored 422.
    let none = quote("q11", "EUR", "JPY", "1.00").await;
    error_body(none, 422, "rate_unavailable").await;
    // Convert 20.00 USD at 0.925: 18.50 EUR.
    let q = status_json(quote("q12", "USD", "EUR", "20.00").await, 201).await;
    assert_eq!(q["to_amount_minor"], 1850);
    let body = json!({"quote_id": q["id"]});
    let converted = status_json(post(app, "/api/conversions", "c1", body.clone()).await, 201).await;
    assert_eq!(
        (
            converted["from_amount_minor"].clone(),
            converted["to_amount_minor"].clone()
        ),
        (json!(2000), json!(1850))
    );
    let replay = post(app, "/api/conversions", "c1", body.clone()).await;
    assert_eq!(replay.headers()["idempotent-replayed"], "true");
    assert_eq!(status_json(replay, 201).await, converted);
    error_body(
        post(app, "/api/conversions", "c2", body).await,
        409,
        "quote_used",
    )
    .await;
    let balances = get(app, "/api/balances").await;
    let by: BTreeMap<String, Value> = balances["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| {
            (
                b["currency"].as_str().unwrap().to_owned(),
                b["available_minor"].clone(),
            )
        })
        .collect();
    assert_eq!(by["USD"], 8000);
    assert_eq!(by["EUR"], 1850);
    // More than is available: 422 insufficient_funds; nothing moves.
    let q = status_json(quote("q13", "USD", "JPY", "80.01").await, 201).await;
    let poor = post(app, "/api/conversions", "c3", json!({"quote_id": q["id"]})).await;
    assert_eq!(
        error_body(poor, 422, "insufficient_funds").await["available_minor"],
        8000
    );
    // A quote older than its lifetime: 409 quote_expired.
    let q = status_json(quote("q14", "USD", "JPY", "1.00").await, 201).await;
    r.clock.advance_secs(31);
    let late = post(app, "/api/conversions", "c4", json!({"quote_id": q["id"]})).await;
    error_body(late, 409, "quote_expired").await;
    // Unknown quote (or another account's): 404.
    error_body(
        post(app, "/api/conversions", "c5", json!({"quote_id": 999_999})).await,
        404,
        "resource_not_found",
    )
    .await;
    check_ledger(app).await;
    r.app.stop().await;
}

/// Reads the whole ledger through the API and checks the invariants: every entry sums to
/// zero per currency, and every balance is the sum of its postings.
pub async fn check_ledger(app: &TestApp) {
    let mut sums: BTreeMap<(String, String), i64> = BTreeMap::new();
    let mut after: Option<i64> = None;
    loop {
        let path = match after {
            Some(id) => format!("/api/ledger_entries?limit=100&starting_after={id}"),
            None => "/api/ledger_entries?limit=100".to_owned(),
        };
        let page = get(app, &path).await;
        for entry in page["data"].as_array().unwrap() {
            let mut per_currency: BTreeMap<String, i64> = BTreeMap::new();
            for p in entry["postings"].as_array().unwrap() {
                let currency = p["currency"].as_str().unwrap().to_owned();
                let minor = p["amount_minor"].as_i64().unwrap();
                *per_currency.entry(currency.clone()).or_default() += minor;
                *sums
                    .entry((p["ledger_account"].as_str().unwrap().to_owned(), currency))
                    .or_default() += minor;
            }
            assert!(
                per_currency.values().all(|s| *s == 0),
                "unbalanced entry {entry}"
            );
            after = entry["id"].as_i64();
        }
        if page["has_more"] != true {
            break;
        }
    }
    let balances = get(app, "/api/balances").await;
    let mut stored: BTreeMap<(String, String), i64> = BTreeMap::new();
    for b in balances["data"].as_array().unwrap() {
        let currency = b["currency"].as_str().unwrap().to_owned();
        for account in ["available", "pending", "processor_clearing", "fx_clearing"] {
            let minor = b[format!("{account}_minor")].as_i64().unwrap();
            if minor != 0 || sums.contains_key(&(account.to_owned(), currency.clone())) {
                stored.insert((account.to_owned(), currency.clone()), minor);
            }
        }
    }
    sums.retain(|k, v| *v != 0 || stored.contains_key(k));
    assert_eq!(
        stored, sums,
        "balances must equal the sum of their postings"
    );
}

/// The property test: random sequences of payments, captures, refunds and conversions,
/// with processor faults injected and the server restarted, checking after every step that
/// each journal entry balances per currency and every balance is the sum of its postings;
/// and at the end that retried keys never moved money twice. The seed is printed, and
/// `BURSAR_TEST_SEED` replays one.
pub async fn random_money_traffic_keeps_the_ledger_balanced(base: &TestApp) {
    let seeds: Vec<u64> = match std::env::var("BURSAR_TEST_SEED") {
        Ok(s) => vec![s.parse().unwrap()],
        Err(_) => vec![rand::rng().random(), rand::rng().random()],
    };
    for seed in seeds {
        eprintln!("random money traffic: BURSAR_TEST_SEED={seed}");
        run_traffic(base, seed, 30).await;
    }
}

async fn run_traffic(base: &TestApp, seed: u64, steps: usize) {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let r = rig(base, |_| {}).await;
    let sandbox = r.sandbox.clone();
    let clock = r.clock.clone();
    let mut app = r.app;
    load_rates(
        app.store.as_ref(),
        &rates_json(&[
            ("USD", "EUR", "0.9213"),
            ("USD", "JPY", "151.37"),
            ("EUR", "KWD", "0.3311"),
        ]),
        clock.now(),
    )
    .await
    .unwrap();
    let mut t = Traffic::default();
    for step in 0..steps {
        let key = format!("k{seed}-{step}");
        let faulty = rng.random_range(0..4) == 0;
        sandbox.set_faults(Faults {
            failure_percent: if faulty { 60 } else { 0 },
            ..Faults::default()
        });
        let (path, body) = match rng.random_range(0..10) {
            0..=3 => {
                let currency = ["USD", "EUR", "JPY"][rng.random_range(0..3)];
                let amount = match currency {
                    "JPY" => format!("{}", rng.random_range(100..5000)),
                    _ => format!(
                        "{}.{:02}",
                        rng.random_range(1..90),
                        rng.random_range(0..100)
                    ),
                };
                let o = order(&app, &amount, currency).await;
                let method = [
                    "pm_card_visa",
                    "pm_card_visa",
                    "pm_card_flaky",
                    "pm_card_declined",
                ][rng.random_range(0..4)];
                let capture = rng.random_range(0..3) != 0;
                (
                    "/api/payments".to_owned(),
                    json!({"order_id": o, "payment_method": method, "capture": capture}),
                )
            }
            4 if !t.authorized.is_empty() => {
                let id = t
                    .authorized
                    .swap_remove(rng.random_range(0..t.authorized.len()));
                let verb = if rng.random_range(0..3) == 0 {
                    "cancel"
                } else {
                    "capture"
                };
                (format!("/api/payments/{id}/{verb}"), json!({}))
            }
            5 | 6 if !t.captured.is_empty() => {
                let id = t.captured[rng.random_range(0..t.captured.len())];
                let body = if rng.random_range(0..2) == 0 {
                    json!({"payment_id": id})
                } else {
                    json!({"payment_id": id, "amount": "1"})
                };
                ("/api/refunds".to_owned(), body)
            }
            7 => {
                let (from, to) = [
                    ("USD", "EUR"),
                    ("EUR", "USD"),
                    ("USD", "JPY"),
                    ("EUR", "KWD"),
                ][rng.random_range(0..4)];
                let amount = format!(
                    "{}.{:02}",
                    rng.random_range(0..30),
                    rng.random_range(1..100)
                );
                (
                    "/api/quotes".to_owned(),
                    json!({"from_currency": from, "to_currency": to, "amount": amount}),
                )
            }
            8 if !t.quotes.is_empty() => {
                let id = t.quotes.swap_remove(rng.random_range(0..t.quotes.len()));
                ("/api/conversions".to_owned(), json!({"quote_id": id}))
            }
            9 if !t.unfinished.is_empty() => {
                let (k, p, b) = t.unfinished.remove(0);
                sandbox.set_faults(Faults::default());
                t.send(&app, &k, &p, b).await;
                check_ledger(&app).await;
                continue;
            }
            _ => {
                // A restart: in-memory state is gone, the database is not.
                app = app.restart().await;
                check_ledger(&app).await;
                continue;
            }
        };
        t.send(&app, &key, &path, body).await;
        check_ledger(&app).await;
    }
    // Finish what is left, then check no key moved money twice at the processor.
    sandbox.set_faults(Faults::default());
    for (k, p, b) in std::mem::take(&mut t.unfinished) {
        let resp = post(&app, &p, &k, b.clone()).await;
        let status = resp.status().as_u16();
        assert_ne!(
            status, 503,
            "{p} {k} did not finish with a healthy processor"
        );
    }
    check_ledger(&app).await;
    // The processor saw each payment once: the sandbox dedupes a repeated key by itself, so
    // count what Bursar recorded against what the processor did, not keys.
    let mut payments = Vec::new();
    let mut after: Option<i64> = None;
    loop {
        let path = match after {
            Some(id) => format!("/api/payments?limit=100&starting_after={id}"),
            None => "/api/payments?limit=100".to_owned(),
        };
        let page = get(&app, &path).await;
        payments.extend(page["data"].as_array().unwrap().iter().cloned());
        after = payments.last().and_then(|p| p["id"].as_i64());
        if page["has_more"] != true {
            break;
        }
    }
    let charged = payments.iter().filter(|p| p["status"] != "failed").count();
    let captured = payments
        .iter()
        .filter(|p| p["amount_captured_minor"].as_i64() > Some(0))
        .count();
    let refunded: i64 = payments
        .iter()
        .map(|p| p["amount_refunded_minor"].as_i64().unwrap())
        .sum();
    let ledger = sandbox.ledger();
    let at_processor = |kind: &str| ledger.iter().filter(|e| e.kind == kind).count();
    assert_eq!(
        at_processor("authorization"),
        charged,
        "one authorization per payment"
    );
    assert_eq!(
        at_processor("capture"),
        captured,
        "one capture per captured payment"
    );
    let processor_refunds: i64 = ledger
        .iter()
        .filter(|e| e.kind == "refund")
        .map(|e| e.amount_minor)
        .sum();
    assert_eq!(
        processor_refunds, refunded,
        "refunds recorded as the processor made them"
    );
    app.stop().await;
}

/// What the random traffic has produced so far, to draw the next steps from.
#[derive(Default)]
struct Traffic {
    /// Requests whose last answer was 503 (or in progress): retried later, same key and body.
    unfinished: Vec<(String, String, Value)>,
    captured: Vec<i64>,
    authorized: Vec<i64>,
    quotes: Vec<i64>,
}

impl Traffic {
    /// Sends one request and files its outcome. Only 503 may be a 5xx.
    async fn send(&mut self, app: &TestApp, key: &str, path: &str, body: Value) {
        let resp = post(app, path, key, body.clone()).await;
        let status = resp.status().as_u16();
        let v: Value = resp.json().await.unwrap();
        assert!(status < 500 || status == 503, "{path} {body}: {status} {v}");
        if status == 503 || status == 409 && v["error_code"] == "idempotency_request_in_progress" {
            self.unfinished
                .push((key.to_owned(), path.to_owned(), body));
            return;
        }
        if status >= 300 {
            return;
        }
        let id = v["id"].as_i64();
        match (v["object"].as_str(), v["status"].as_str(), id) {
            (Some("payment"), Some("succeeded"), Some(id)) => self.captured.push(id),
            (Some("payment"), Some("requires_capture"), Some(id)) => self.authorized.push(id),
            (Some("quote"), _, Some(id)) => self.quotes.push(id),
            _ => {}
        }
    }
}

/// Ten payments of one order sent at once under different keys (a double-clicked pay
/// button): one is charged; the others are told the order has a payment in progress.
pub async fn an_order_is_charged_once_under_concurrent_payments(base: &TestApp) {
    let r = rig(base, |_| {}).await;
    let app = &r.app;
    let o = order(app, "19.99", "USD").await;
    let mut tasks = Vec::new();
    for i in 0..10 {
        let a = app.a.clone();
        tasks.push(tokio::spawn(async move {
            let resp = a
                .request(Method::POST, "/api/payments")
                .header("content-type", "application/json")
                .header("idempotency-key", format!("click-{i}"))
                .body(json!({"order_id": o, "payment_method": "pm_card_visa"}).to_string())
                .send()
                .await
                .unwrap();
            let status = resp.status().as_u16();
            (status, resp.json::<Value>().await.unwrap())
        }));
    }
    let mut paid = 0;
    for t in tasks {
        match t.await.unwrap() {
            (201, _) => paid += 1,
            (409, body) => assert_eq!(body["error_code"], "invalid_state", "{body}"),
            (status, body) => panic!("unexpected {status}: {body}"),
        }
    }
    assert_eq!(paid, 1);
    assert_eq!(kinds(&r.sandbox, "authorization"), 1, "one charge");
    assert_eq!(
        get(app, &format!("/api/orders/{o}")).await["status"],
        "paid"
    );
    check_ledger(app).await;
    r.app.stop().await;
}

/// The SDK's typed calls cover the money API: pay, capture part, refund, read the ledger,
/// quote and convert; a decline comes back as a typed API error.
pub async fn the_sdk_pays_refunds_and_converts(base: &TestApp) {
    use bursar_api::{
        Amount, CapturePayment, CreateConversion, CreatePayment, CreateQuote, CreateRefund,
        PaymentStatus, RefundStatus,
    };
    let r = rig(base, |_| {}).await;
    let (app, sdk) = (&r.app, &r.app.a);
    load_rates(
        app.store.as_ref(),
        &rates_json(&[("USD", "JPY", "150")]),
        r.clock.now(),
    )
    .await
    .unwrap();
    let o = order(app, "30.00", "USD").await;
    let pay = |capture, method: &str| CreatePayment {
        order_id: o,
        amount: None,
        payment_method: method.into(),
        capture: Some(capture),
    };
    let declined = sdk
        .create_payment(&pay(true, "pm_card_declined"), "sdk-declined")
        .await
        .unwrap_err();
    assert_eq!(declined.code(), Some("card_declined"));
    let p = sdk
        .create_payment(&pay(false, "pm_card_visa"), "sdk-pay")
        .await
        .unwrap()
        .body;
    assert_eq!(p.status, PaymentStatus::RequiresCapture);
    let captured = sdk
        .capture_payment(
            p.id,
            &CapturePayment {
                amount: Amount::number("20.00"),
            },
            "sdk-capture",
        )
        .await
        .unwrap();
    assert_eq!(captured.etag_version(), Some(2));
    assert_eq!(captured.body.amount_captured_minor, 2000);
    let refund = sdk
        .create_refund(
            &CreateRefund {
                payment_id: p.id,
                amount: Amount::number("5.00"),
            },
            "sdk-refund",
        )
        .await
        .unwrap()
        .body;
    assert_eq!(
        (refund.status, refund.amount_minor),
        (RefundStatus::Succeeded, 500)
    );
    let quote = sdk
        .create_quote(
            &CreateQuote {
                from_currency: "USD".into(),
                to_currency: "JPY".into(),
                amount: Amount::number("10.00").unwrap(),
            },
            "sdk-quote",
        )
        .await
        .unwrap()
        .body;
    assert_eq!(quote.to_amount_minor, 1500);
    let conversion = sdk
        .create_conversion(&CreateConversion { quote_id: quote.id }, "sdk-convert")
        .await
        .unwrap()
        .body;
    assert_eq!(conversion.to_amount_minor, 1500);
    let balances = sdk.balances().await.unwrap().body.data;
    let usd = balances.iter().find(|b| b.currency == "USD").unwrap();
    assert_eq!(usd.available_minor, 2000 - 500 - 1000);
    let jpy = balances.iter().find(|b| b.currency == "JPY").unwrap();
    assert_eq!(jpy.available_minor, 1500);
    let journal = sdk
        .ledger_entries(bursar_sdk::PageParams {
            limit: Some(100),
            starting_after: None,
        })
        .await
        .unwrap()
        .body;
    let kinds: Vec<&str> = journal.data.iter().map(|e| e.kind.as_str()).collect();
    assert_eq!(kinds, ["conversion", "refund", "capture", "authorization"]);
    let o2 = order(app, "1.00", "USD").await;
    let auth = sdk
        .create_payment(
            &CreatePayment {
                order_id: o2,
                ..pay(false, "pm_card_visa")
            },
            "sdk-auth-2",
        )
        .await
        .unwrap()
        .body;
    let voided = sdk
        .cancel_payment(auth.id, "sdk-cancel")
        .await
        .unwrap()
        .body;
    assert_eq!(voided.status, PaymentStatus::Canceled);
    assert_eq!(
        sdk.get_payment(auth.id).await.unwrap().body.status,
        PaymentStatus::Canceled
    );
    check_ledger(app).await;
    r.app.stop().await;
}
