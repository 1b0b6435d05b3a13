//! Idempotency-Key on `POST /api/orders`, against the real server (spec `idempotency.md` §4).

use std::sync::Arc;

use bursar_sdk::ListOrders;
use reqwest::Method;
use serde_json::Value;

use crate::harness::{ManualClock, TestApp, error_body};

async fn post(
    app: &TestApp,
    client: &bursar_sdk::Client,
    key: &str,
    body: &str,
) -> reqwest::Response {
    client
        .request(Method::POST, "/api/orders")
        .header("Idempotency-Key", key)
        .header("Content-Type", "application/json")
        .body(body.to_owned())
        .send()
        .await
        .unwrap_or_else(|e| panic!("{} unreachable: {e}", app.url))
}

async fn order_count(client: &bursar_sdk::Client) -> usize {
    let all = ListOrders {
        limit: Some(100),
        ..Default::default()
    };
    client.list_orders(&all).await.unwrap().body.data.len()
}

pub async fn retries_replay_the_first_response(app: &TestApp) {
    let c = app.customer(&app.a).await;
    let body = format!(r#"{{"customer_id": {c}, "amount": 199.00, "currency": "USD"}}"#);
    let key = "order-20260325-00091";
    let first = post(app, &app.a, key, &body).await;
    assert_eq!(first.status(), 201);
    assert!(first.headers().get("idempotent-replayed").is_none());
    let h1 = first.headers().clone();
    let b1 = first.bytes().await.unwrap();
    assert!(String::from_utf8_lossy(&b1).contains(r#""amount":199.00"#));

    // The same request again, then with keys reordered and whitespace changed, then with the
    // key as a quoted string: all replays of the first answer, byte for byte.
    let reordered = format!(r#"{{"currency":"USD","amount":199.00,"customer_id":{c}}}"#);
    for (k, b) in [
        (key.to_owned(), &body),
        (key.to_owned(), &reordered),
        (format!("\"{key}\""), &body),
    ] {
        let again = post(app, &app.a, &k, b).await;
        assert_eq!(again.status(), 201);
        assert_eq!(again.headers()["idempotent-replayed"], "true");
        for name in ["location", "etag", "content-type"] {
            assert_eq!(again.headers()[name], h1[name], "{name}");
        }
        // This exchange's own identifiers, not the first one's.
        assert_ne!(again.headers()["x-request-id"], h1["x-request-id"]);
        assert_eq!(again.bytes().await.unwrap(), b1);
    }

    // The same key on another request is refused, and changes nothing.
    let changed = format!(r#"{{"customer_id": {c}, "amount": 199.01, "currency": "USD"}}"#);
    let v = error_body(
        post(app, &app.a, key, &changed).await,
        422,
        "idempotency_key_reused",
    )
    .await;
    assert_eq!(
        (v["original_method"].as_str(), v["original_path"].as_str()),
        (Some("POST"), Some("/api/orders"))
    );
    assert_eq!(order_count(&app.a).await, 1);
    let order: Value = serde_json::from_slice(&b1).unwrap();
    let events = app
        .store
        .events_for(app.account_a, "order", order["id"].as_i64().unwrap())
        .await
        .unwrap();
    assert_eq!(events.len(), 1, "one outbox event for all those requests");
}

pub async fn malformed_keys_are_400_and_store_nothing(app: &TestApp) {
    let c = app.customer(&app.a).await;
    let body = format!(r#"{{"customer_id": {c}, "amount": 5, "currency": "EUR"}}"#);
    let long = "k".repeat(256);
    for key in ["", &long, "tab\there", "\"broken"] {
        let resp = post(app, &app.a, key, &body).await;
        error_body(resp, 400, "idempotency_key_invalid").await;
    }
    let resp = app
        .a
        .request(Method::POST, "/api/orders")
        .header("Idempotency-Key", "one")
        .header("Idempotency-Key", "two")
        .header("Content-Type", "application/json")
        .body(body.clone())
        .send()
        .await
        .unwrap();
    error_body(resp, 400, "idempotency_key_invalid").await;
    let non_ascii = app
        .a
        .request(Method::POST, "/api/orders")
        .header(
            "Idempotency-Key",
            reqwest::header::HeaderValue::from_bytes(b"caf\xc3\xa9").unwrap(),
        )
        .header("Content-Type", "application/json")
        .body(body.clone())
        .send()
        .await
        .unwrap();
    error_body(non_ascii, 400, "idempotency_key_invalid").await;
    assert_eq!(order_count(&app.a).await, 0);
    // GET ignores the header.
    let resp = app
        .a
        .request(Method::GET, "/api/orders")
        .header("Idempotency-Key", "")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    // A server configured to require keys refuses a create without one.
    let strict = app
        .sibling(
            |c| c.idempotency.required_routes = vec!["POST /api/orders".into()],
            Arc::new(bursar_server::SystemClock),
        )
        .await;
    let c2 = strict.customer(&strict.a).await;
    let resp = strict
        .a
        .request(Method::POST, "/api/orders")
        .json(&serde_json::json!({"customer_id": c2, "amount": 5, "currency": "EUR"}))
        .send()
        .await
        .unwrap();
    error_body(resp, 400, "idempotency_key_missing").await;
    assert_eq!(
        post(
            &strict,
            &strict.a,
            "k-1",
            &format!(r#"{{"customer_id":{c2},"amount":5,"currency":"EUR"}}"#)
        )
        .await
        .status(),
        201
    );
    strict.stop().await;
}

pub async fn scope_and_what_is_stored(app: &TestApp) {
    let ca = app.customer(&app.a).await;
    let cb = app.customer(&app.b).await;
    // Refused authentication is not stored: the same key then runs with a valid key.
    let body = format!(r#"{{"customer_id":{ca},"amount":9,"currency":"USD"}}"#);
    let resp = app
        .anon(Method::POST, "/api/orders")
        .header(
            "Authorization",
            "Bearer bsr_test_000000000000000000000000000000000000",
        )
        .header("Idempotency-Key", "k-auth")
        .header("Content-Type", "application/json")
        .body(body.clone())
        .send()
        .await
        .unwrap();
    error_body(resp, 401, "invalid_api_key").await;
    let resp = post(app, &app.a, "k-auth", &body).await;
    assert_eq!(resp.status(), 201);
    assert!(resp.headers().get("idempotent-replayed").is_none());
    // One key, two accounts: two independent orders.
    let ra = post(
        app,
        &app.a,
        "shared",
        &format!(r#"{{"customer_id":{ca},"amount":1,"currency":"USD"}}"#),
    )
    .await;
    let rb = post(
        app,
        &app.b,
        "shared",
        &format!(r#"{{"customer_id":{cb},"amount":2,"currency":"USD"}}"#),
    )
    .await;
    assert_eq!((ra.status().as_u16(), rb.status().as_u16()), (201, 201));
    let (oa, ob): (Value, Value) = (ra.json().await.unwrap(), rb.json().await.unwrap());
    assert_ne!(oa["id"], ob["id"]);
    assert_eq!(ob["amount_minor"], 200);
    // A request refused before any work is not stored: the corrected request then runs.
    let bad = format!(r#"{{"customer_id":{ca},"amount":1.001,"currency":"USD"}}"#);
    error_body(
        post(app, &app.a, "k-fix", &bad).await,
        422,
        "validation_failed",
    )
    .await;
    error_body(
        post(app, &app.a, "k-fix", &bad).await,
        422,
        "validation_failed",
    )
    .await;
    let good = format!(r#"{{"customer_id":{ca},"amount":1.00,"currency":"USD"}}"#);
    assert_eq!(post(app, &app.a, "k-fix", &good).await.status(), 201);
    // A business refusal is stored and replayed as it was, original request id included.
    let foreign = format!(r#"{{"customer_id":{cb},"amount":3,"currency":"USD"}}"#);
    let first = post(app, &app.a, "k-foreign", &foreign).await;
    let request_id = first.headers()["x-request-id"].to_str().unwrap().to_owned();
    let v = error_body(first, 422, "unknown_customer").await;
    let again = post(app, &app.a, "k-foreign", &foreign).await;
    assert_eq!(again.status(), 422);
    assert_eq!(again.headers()["idempotent-replayed"], "true");
    let replayed: Value = again.json().await.unwrap();
    assert_eq!(replayed, v);
    assert_eq!(replayed["request_id"], request_id.as_str());
    assert_eq!(order_count(&app.a).await, 3);
}

pub async fn concurrent_identical_requests_create_once(app: &TestApp) {
    let c = app.customer(&app.a).await;
    let body = format!(r#"{{"customer_id": {c}, "amount": 199.00, "currency": "USD"}}"#);
    let tasks: Vec<_> = (0..100)
        .map(|_| {
            let client = app.a.clone();
            let body = body.clone();
            tokio::spawn(async move {
                let resp = client
                    .request(Method::POST, "/api/orders")
                    .header("Idempotency-Key", "hot-key")
                    .header("Content-Type", "application/json")
                    .body(body)
                    .send()
                    .await
                    .unwrap();
                let replayed = resp.headers().contains_key("idempotent-replayed");
                (
                    resp.status().as_u16(),
                    replayed,
                    resp.bytes().await.unwrap(),
                )
            })
        })
        .collect();
    let mut bodies = Vec::new();
    let mut originals = 0;
    for t in tasks {
        let (status, replayed, bytes) = t.await.unwrap();
        // Concurrent claimers wait for the first to commit, then replay it.
        assert!(status == 201 || status == 409, "got {status}");
        if status == 201 {
            originals += usize::from(!replayed);
            bodies.push(bytes);
        }
    }
    assert_eq!(originals, 1, "exactly one request ran");
    assert!(
        bodies.windows(2).all(|w| w[0] == w[1]),
        "every 201 is the same response"
    );
    assert_eq!(order_count(&app.a).await, 1);
    let order: Value = serde_json::from_slice(&bodies[0]).unwrap();
    let events = app
        .store
        .events_for(app.account_a, "order", order["id"].as_i64().unwrap())
        .await
        .unwrap();
    assert_eq!(events.len(), 1);
}

pub async fn expired_keys_run_as_new_requests(app: &TestApp) {
    let clock = ManualClock::new();
    let timed = app.sibling(|_| {}, clock.clone()).await;
    let c = timed.customer(&timed.a).await;
    let one = format!(r#"{{"customer_id":{c},"amount":1,"currency":"USD"}}"#);
    let two = format!(r#"{{"customer_id":{c},"amount":2,"currency":"USD"}}"#);
    assert_eq!(post(&timed, &timed.a, "k-day", &one).await.status(), 201);
    clock.advance_hours(23);
    error_body(
        post(&timed, &timed.a, "k-day", &two).await,
        422,
        "idempotency_key_reused",
    )
    .await;
    clock.advance_hours(2);
    // Past the 24 h retention the key is free again, even for another request.
    let resp = post(&timed, &timed.a, "k-day", &two).await;
    assert_eq!(resp.status(), 201);
    assert!(resp.headers().get("idempotent-replayed").is_none());
    assert_eq!(order_count(&timed.a).await, 2);
    timed.stop().await;
}

pub async fn concurrent_keys_and_bodies(app: &TestApp) {
    let c = app.customer(&app.a).await;
    // One key, two different bodies at once: one runs, the other is refused (or replays the
    // first if it was that request) — never two orders.
    let one = format!(r#"{{"customer_id":{c},"amount":1,"currency":"USD"}}"#);
    let two = format!(r#"{{"customer_id":{c},"amount":2,"currency":"USD"}}"#);
    let (r1, r2) = tokio::join!(
        post(app, &app.a, "k-race", &one),
        post(app, &app.a, "k-race", &two)
    );
    let mut statuses = [r1.status().as_u16(), r2.status().as_u16()];
    statuses.sort_unstable();
    assert_eq!(statuses, [201, 422]);
    assert_eq!(order_count(&app.a).await, 1);
    // Ninety-nine distinct keys at once: ninety-nine more orders, all 201.
    let tasks: Vec<_> = (0..99)
        .map(|i| {
            let client = app.a.clone();
            let body = one.clone();
            tokio::spawn(async move {
                client
                    .request(Method::POST, "/api/orders")
                    .header("Idempotency-Key", format!("k-many-{i}"))
                    .header("Content-Type", "application/json")
                    .body(body)
                    .send()
                    .await
                    .unwrap()
                    .status()
                    .as_u16()
            })
        })
        .collect();
    for t in tasks {
        assert_eq!(t.await.unwrap(), 201);
    }
    assert_eq!(order_count(&app.a).await, 100);
}
